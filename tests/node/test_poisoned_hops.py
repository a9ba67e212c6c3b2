"""A stage replica that scales the activations it forwards (`--misbehave scale-activations`) from round 3, in a
real swarm: a data node and two stage-1 replicas, separate processes. The data node's hop checks refuse the
scaled hops, it bans the sender (and only it), its plans leave the sender out for the ban's rounds, its
microbatches go through the honest replica, and the loss stays finite and falls. Back after its ban, the
sender offends again and is banned for twice as long. The clean rounds before round 3 are the control:
nobody is refused or banned in them."""

from __future__ import annotations

import json
import math

import pytest

from node.process.local_swarm import LocalSwarm
from tests.helpers import rounds, run_cli, sample, wait_for

pytestmark = pytest.mark.slow

SWARM = "poisoned"
COMMON = ["--num-stages", "2", "--torch-threads", "1", "--device", "cpu", "--microbatches", "3", "--seq-len", "32",
          "--round-timeout", "30", "--heartbeat-interval", "1", "--min-nodes", "3", "--log-level", "info",
          "--ban-rounds", "3"]
FROM_ROUND = 3
BATCH, SEQ = 4, 32  # tokens of a hop: --batch-size (default) sequences of --seq-len


def _peers_planned(event: dict) -> set[str]:
    return {hop[1] for mb in event["plan"]["microbatches"] for hop in mb["path"]}


def test_a_replica_that_scales_its_activations_is_banned_left_out_and_banned_longer_when_it_returns(tmp_path):
    swarm = LocalSwarm(tmp_path, SWARM, common_args=COMMON)
    try:
        data = swarm.start_node("data0", "0")
        swarm.wait_started([data], timeout=120)
        peers = swarm.initial_peers()
        honest = swarm.start_node("s1a", "1", initial_peers=peers)
        bad = swarm.start_node("bad", "1", initial_peers=peers,
                               extra=["--misbehave", "scale-activations", "--misbehave-from", str(FROM_ROUND)])
        swarm.wait_started([honest, bad], timeout=180)
        bad_id = bad.started()["peer_id"]

        wait_for(lambda: len(data.events("banned")) >= 2, 300, "a second ban of the scaling replica")
        first, second = data.events("banned")[:2]
        for ban in (first, second):
            assert ban["peer"] == bad_id and ban["accuser"] == data.started()["peer_id"], ban
            assert "checked: forward hop from stage 1" in ban["reason"], ban
        assert FROM_ROUND <= first["round"] <= FROM_ROUND + 1  # detected in the first round it misbehaved in
        assert (first["offences"], first["until"]) == (1, first["round"] + 1 + 3)
        assert (second["offences"], second["until"]) == (2, second["round"] + 1 + 6)
        assert second["round"] >= first["until"]  # it offended again only once planned again

        wait_for(lambda: max(rounds(data)) >= second["round"] + 3, 120, "rounds after the second ban")
        done = rounds(data)
        for r in range(first["round"] + 1, first["until"]):  # out of the plans for the whole ban
            assert bad_id not in _peers_planned(done[r]), r
        assert bad_id in _peers_planned(done[first["until"]])  # and planned again after it
        for r in range(second["round"] + 1, min(max(done) + 1, second["until"])):
            assert bad_id not in _peers_planned(done[r]), r
        # Control: before it misbehaved, the same replica was planned and nothing was refused.
        clean = [r for r in done if r < FROM_ROUND and bad_id in _peers_planned(done[r])]
        assert clean, "the replica took part in clean rounds"
        assert all(done[r]["failed"] == 0 and done[r]["reroutes"] == 0 for r in done if r < FROM_ROUND)
        # Every round trained on all its tokens (refused microbatches were re-routed), with a finite, falling loss.
        losses = [done[r]["loss"] for r in sorted(done)]
        assert all(done[r]["failed"] == 0 for r in done), {r: done[r]["failed"] for r in done}
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
        assert sample(data, 'swarm_node_hops_refused_total{reason="size"}') >= 2
        assert sample(data, "swarm_node_accusations_total") >= 2
        assert sample(data, "swarm_node_banned_peers") == 1
        assert not (sample(honest, 'swarm_node_hops_refused_total{reason="size"}') or 0)

        shown = run_cli("status", "--swarm", SWARM, "--json", "--initial-peers", *peers)
        assert shown.returncode == 0, shown.stderr
        rows = {row["peer"]: row for row in json.loads(shown.stdout)["nodes"]}
        assert set(rows[data.started()["peer_id"]]["bans"]) == {bad_id}
        assert rows[data.started()["peer_id"]]["bans"][bad_id]["offences"] >= 2  # more, if it returned again
        assert not rows[honest.started()["peer_id"]]["bans"]
        # Work as its receivers counted it: the scaler's refused hops count against it; the honest replica's
        # hops passed, and its own receipts count at least what the record (a heartbeat older) says.
        bad_work, honest_work = rows[bad_id]["witnessed"], rows[honest.started()["peer_id"]]["witnessed"]
        assert bad_work["failed"] >= 2 and honest_work["failed"] == 0, (bad_work, honest_work)
        assert 0 < honest_work["passed"] <= honest_work["hops"], honest_work
        assert honest_work["tokens"] == honest_work["hops"] * BATCH * SEQ, honest_work
        receipts = sum(sample(honest, f'swarm_node_hops_acknowledged_total{{direction="{d}"}}')
                       for d in ("forward", "backward"))
        assert receipts >= honest_work["hops"], (receipts, honest_work)
        assert sample(honest, 'swarm_node_tokens_acknowledged_total{direction="forward"}') >= BATCH * SEQ
    finally:
        swarm.stop()
