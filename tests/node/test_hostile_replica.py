"""A replica that posts huge gradients (`--misbehave huge-gradient`), in a real swarm: a data node and three
stage-1 replicas, separate processes. Every replica, the hostile one too, leaves its gradients out of each
average, counts them as outliers, and the three stay bit-identical while the loss falls."""

from __future__ import annotations

import pytest

from node.process.local_swarm import LocalSwarm
from tests.helpers import rounds, sample, wait_for

pytestmark = pytest.mark.slow

COMMON = ["--num-stages", "2", "--torch-threads", "1", "--device", "cpu", "--microbatches", "3", "--seq-len", "32",
          "--round-timeout", "30", "--heartbeat-interval", "1", "--min-nodes", "4", "--log-level", "info"]
ROUNDS = 6


def test_huge_gradients_are_left_out_and_the_replicas_stay_identical(tmp_path):
    swarm = LocalSwarm(tmp_path, "hostile", common_args=COMMON)
    try:
        data = swarm.start_node("data0", "0")
        swarm.wait_started([data], timeout=120)
        peers = swarm.initial_peers()
        replicas = [swarm.start_node("s1a", "1", initial_peers=peers), swarm.start_node("s1b", "1", initial_peers=peers),
                    swarm.start_node("bad", "1", initial_peers=peers, extra=["--misbehave", "huge-gradient"])]
        swarm.wait_started(replicas, timeout=180)

        def together() -> list[int]:  # rounds all three replicas ran, the hostile one's gradients left out
            common = set(rounds(replicas[0])) & set(rounds(replicas[1])) & set(rounds(replicas[2]))
            return sorted(r for r in common if all(rounds(n)[r]["averaged_with"]["1"] == 2 for n in replicas))
        wait_for(lambda: len(together()) >= ROUNDS, 240, f"{ROUNDS} rounds run by all three replicas")
        both = together()
        for r in both:  # the hostile replica's gradients moved nobody: the same weights everywhere
            assert len({rounds(n)[r]["digests"]["1"] for n in replicas}) == 1, r
        for n in replicas:  # one outlier per shard, seen by every shard's owner: at least one a round each
            assert sample(n, 'swarm_node_sync_refused_total{reason="outlier"}') >= len(both), n.name
        assert (sample(data, 'swarm_node_sync_refused_total{reason="outlier"}') or 0) == 0  # one replica: no rule
        losses = [rounds(data)[r]["loss"] for r in sorted(rounds(data))]
        assert losses[-1] < losses[0], losses
    finally:
        swarm.stop()
