"""The outer loop (`--sync outer`) in a real swarm: a data node and two stage-1 replicas whose link to each other
is emulated far (0.5 s each way: about 2 s per sync), so a sync visibly overlaps the next round and a kill lands
inside one.
Three microbatches a round: with the third replica, every replica is on a path each round.

In order: replicas leave every sync with one anchor and differ between syncs, the loss falls and the bytes are
int8 pseudo-gradients every 4 rounds; a replica killed during a sync costs the survivor no wait; the killed
replica restarts from its checkpoint and a new replica joins, and both are in step at the next sync.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.helpers import free_port, rounds, run_cli, sample, wait_for
from tests.node.test_swarm import _stage_gradient_bytes
from node.process.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow

SWARM = "outer-swarm"
EVERY = 4
COMMON = ["--num-stages", "2", "--torch-threads", "1", "--device", "cpu", "--microbatches", "3",
          "--round-timeout", "20", "--heartbeat-interval", "1", "--record-ttl", "20", "--log-level", "info",
          "--sync", "outer", "--sync-every", str(EVERY), "--checkpoint-every", "1"]
# int8 pseudo-gradients (1 byte and a 4-byte scale per 64 values), reduce-scatter and all-gather between two
PER_SYNC = 2 * _stage_gradient_bytes(1, 2) / 4 * (1 + 4 / 64) / 2


def _emulation(path, ports: dict[str, int]):
    """data0 close to both replicas; the replicas 0.5 s apart (a call waits it both ways: a sync, two rounds of
    pulls, takes about 2 s; a state copy about 1 s). Nodes started on other ports are not emulated."""
    spec = {"nodes": [{"endpoint": f"127.0.0.1:{port}", "location": name} for name, port in ports.items()],
            "links": [{"a": "data0", "b": "s1a", "latency_ms": 1, "bandwidth_GiBps": 1.0},
                      {"a": "data0", "b": "s1b", "latency_ms": 1, "bandwidth_GiBps": 1.0},
                      {"a": "s1a", "b": "s1b", "latency_ms": 500, "bandwidth_GiBps": 1.0}],
            "same_location_link": {"latency_ms": 0.1, "bandwidth_GiBps": 2.0}}
    path.write_text(json.dumps(spec))
    return path


def _synced_at(n, sync_round: int) -> dict | None:
    """n's round event in which it applied `sync_round`'s sync."""
    return next((e for e in rounds(n).values() if e["synced_rounds"].get("1") == sync_round), None)


def test_outer_syncs_overlap_survive_a_kill_and_bring_joiners_in_step(tmp_path):
    ports = {name: free_port() for name in ("data0", "s1a", "s1b")}
    links = _emulation(tmp_path / "links.json", ports)
    swarm = LocalSwarm(tmp_path, SWARM, common_args=COMMON + ["--emulate-links", str(links)])

    def start(name: str, stage: str, port: int | None = None, identity: str | None = None):
        extra = ["--checkpoint-dir", str(tmp_path / f"{identity or name}.ckpt"),
                 "--identity-path", str(tmp_path / f"{identity or name}.key")] + (["--port", str(port)] if port else [])
        return swarm.start_node(name, stage, extra=extra, initial_peers=swarm.initial_peers() if swarm.nodes else None)

    try:
        data = start("data0", "0", ports["data0"])
        swarm.wait_started([data], timeout=120)
        s1a, s1b = start("s1a", "1", ports["s1a"]), start("s1b", "1", ports["s1b"])
        swarm.wait_started([s1a, s1b], timeout=180)
        # The first two syncs both replicas took part in (one may be planned a few rounds after the other).
        def together() -> list[int] | None:
            # Every node here is honest: a ban would take a replica out of the syncs this waits for (an outer
            # step moves the weights at once, and hop checks judge each epoch by its own band).
            banned = [(n.name, e) for n in (data, s1a, s1b) for e in n.events("banned")]
            assert not banned, banned
            syncs = [r for r in range(EVERY - 1, 10 * EVERY, EVERY)
                     if all(_synced_at(n, r) and _synced_at(n, r)["averaged_with"]["1"] == 2 for n in (s1a, s1b))]
            return syncs[:2] if len(syncs) >= 2 else None

        first, second = wait_for(together, 240, "two syncs of both replicas")
        assert second == first + EVERY

        # Every replica leaves each sync with the same anchor, and their weights differ between syncs.
        for sync_round in (first, second):
            a, b = _synced_at(s1a, sync_round), _synced_at(s1b, sync_round)
            assert a["round"] == b["round"] == sync_round + 1, (a, b)  # applied one round later: overlapped
            assert a["anchors"]["1"] == b["anchors"]["1"]
            assert a["sync"] == "outer" and set(a["averaged_with"]) == {"1"}
            assert abs(a["sync_bytes"]["1"] - PER_SYNC) <= 0.15 * PER_SYNC, (a["sync_bytes"], PER_SYNC)
        between = [r for r in range(first + 2, second) if r in rounds(s1a) and r in rounds(s1b)]
        assert between and all(rounds(s1a)[r]["digests"]["1"] != rounds(s1b)[r]["digests"]["1"] for r in between)
        assert all(rounds(s1a)[r]["sync_bytes"]["1"] == 0 for r in between)  # nothing travels between syncs
        losses = [rounds(data)[r]["loss"] for r in sorted(rounds(data))]
        assert sum(losses[-2:]) < sum(losses[:2]), losses
        assert sample(s1a, 'swarm_node_sync_strategy{strategy="outer"}') == 1
        assert sample(s1a, 'swarm_node_last_sync_round{stage="1"}') >= second
        assert sample(s1a, 'swarm_node_replica_drift{stage="1"}') > 0

        # Kill s1b right after it began a sync (its round event is written once the sync is under way): the
        # survivor's pulls fail at once, and it applies the sync without waiting for its replica.
        sync_round = wait_for(lambda: next((r for r in sorted(rounds(s1b), reverse=True)
                                            if (r + 1) % EVERY == 0 and r > second), None), 120,
                              "s1b to begin a third sync")
        os.killpg(s1b.process.pid, signal.SIGKILL)
        s1b.process.wait()
        applied = wait_for(lambda: _synced_at(s1a, sync_round), 60, "the survivor to apply the sync")
        assert applied["sync_s"]["1"] < 5 and applied["wall_s"] < 10, applied  # not the 20 s round timeout

        # The killed replica restarts from its checkpoint (outer state included); a new replica joins. Both
        # are in step with the survivor at the next sync.
        back = start("s1b-again", "1", identity="s1b")
        joiner = start("s1c", "1")
        swarm.wait_started([back, joiner], timeout=120)
        wait_for(lambda: back.events("serving") and joiner.events("serving"), 120, "both to serve")
        assert [e["source"] for e in back.events("stage_recovered")][0] == "checkpoint"
        first = max(min(rounds(back), default=0), min(rounds(joiner), default=0))
        # The first sync all three took part in (a replica that copied while a sync was in flight sits that one
        # out: it copies the state again once the others applied it).
        later = wait_for(lambda: next((r for r in sorted(rounds(s1a)) if r > first and
                                       rounds(s1a)[r]["synced_rounds"].get("1") is not None
                                       and rounds(s1a)[r]["averaged_with"]["1"] == 3
                                       and r in rounds(back) and r in rounds(joiner)), None), 120,
                         "a sync applied by all three replicas")
        anchors = {n.name: rounds(n)[later]["anchors"]["1"] for n in (s1a, back, joiner)}
        assert len(set(anchors.values())) == 1, anchors
        assert all(rounds(n)[later]["averaged_with"]["1"] == 3 for n in (back, joiner)), rounds(back)[later]

        status = run_cli("status", "--swarm", SWARM, "--json", "--initial-peers", *swarm.initial_peers())
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["sync"]["strategy"] == "outer" and shown["sync"]["every"] == EVERY
        row = next(r for r in shown["nodes"] if r["peer"] == s1a.started()["peer_id"])
        assert row["sync_state"]["1"]["round"] >= sync_round and row["sync_state"]["1"]["bytes"] > 0
    finally:
        swarm.stop()
