"""Churn on a real loopback swarm (SkipPipe: 3 stages, each microbatch visits 2), in one run:

1. kill -9 one replica of the 2-replica stage 1 in the middle of a round: that round still completes
   every microbatch (re-routed to the other replica), and no round is lost;
2. restart it with the same identity and checkpoint directory: it resumes from its checkpoint, then
   catches up from its replica and trains in lock-step with it;
3. kill -9 the only node of stage 2: training continues on paths that skip it, and the log says so;
   a new node taking stage 2 rebuilds it (no replica and no checkpoint is left: CheckFree) and says so.
Steps 2 and 3 overlap, so that the nodes' start-ups do too.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from node.process.local_swarm import LocalSwarm
from tests.helpers import metric, rounds, run_cli, wait_for

pytestmark = pytest.mark.slow

COMMON = ["--num-stages", "3", "--visits", "2", "--microbatches", "4", "--max-inflight", "4",
          "--torch-threads", "1", "--device", "cpu", "--round-timeout", "60", "--heartbeat-interval", "1",
          "--record-ttl", "30", "--checkpoint-every", "2", "--seq-len", "32",
          # Deaths here are found by pings and failed sends. A generous hop deadline keeps a loaded machine's
          # slow hops from being re-routed early, which would leave the killed node holding only stale work.
          "--hop-deadline-min", "20"]


def log(n) -> str:
    return n.log_path.read_text()


def test_kill_restart_and_lose_a_stage(tmp_path):
    swarm = LocalSwarm(tmp_path, "churn", common_args=COMMON)

    def start(name, stage, identity=True):
        extra = ["--checkpoint-dir", str(tmp_path / f"{name}.ckpt")]
        if identity:
            extra += ["--identity-path", str(tmp_path / f"{name}.key")]
        return swarm.start_node(name, stage, extra=extra,
                                initial_peers=swarm.initial_peers() if swarm.nodes else None)

    try:
        data = start("data", "0")
        swarm.wait_started([data], timeout=120)
        s1a, s1b, s2 = (start(n, s) for n, s in [("s1a", "1"), ("s1b", "1"), ("s2", "2")])
        swarm.wait_started([s1a, s1b, s2], timeout=180)
        wait_for(lambda: len(rounds(data)) >= 4, 240, "4 rounds")

        # 1. Kill the stage-1 replica that the plans use while it holds activations of the round in flight.
        victim = wait_for(lambda: next((n for n in (s1a, s1b) if n.events()[-1]["event"] == "round"), None), 60,
                          "a stage-1 replica in the plans")
        survivor = s1b if victim is s1a else s1a
        victim_peer = victim.started()["peer_id"]
        # A round here lasts a fraction of a second, so a kill that follows a reading of the gauge could land
        # after the round's hops through the victim were done. So the data node (the origin: it computes the
        # loss and sends the gradient back, --visits 2) is frozen for a moment right after the gauge shows
        # activations held: no gradient can come back to release them, and if they are still held after a
        # gradient already on its way had time to land, the victim dies holding work in flight. The data node
        # resumes at once (far below the 3 missed pings that make a peer hung), and its gradients find the
        # victim gone.
        def held() -> int:
            return metric(victim, "swarm_node_activation_microbatches", timeout=10)

        def frozen_while_held() -> bool:
            if held() <= 0:
                return False
            os.kill(data.process.pid, signal.SIGSTOP)
            time.sleep(0.05)
            if held() > 0:
                return True
            os.kill(data.process.pid, signal.SIGCONT)
            return False
        try:
            wait_for(frozen_while_held, 60, "activations held behind a frozen origin", interval=0.01)
            os.killpg(victim.process.pid, signal.SIGKILL)
            victim.process.wait()
        finally:
            os.kill(data.process.pid, signal.SIGCONT)
        killed_round = max(rounds(data)) + 1
        wait_for(lambda: max(rounds(data)) >= killed_round + 2, 120, "two rounds after the kill")
        history = rounds(data)
        assert sorted(history) == list(range(min(history), max(history) + 1)), "a round is missing"
        for r, e in history.items():  # every microbatch of every round trained, the kill's round included
            assert e["failed"] == 0 and e["loss"] is not None, (r, e)
        assert history[killed_round]["wall_s"] < 30, history[killed_round]  # far below the 60 s round timeout
        alive = [data, survivor, s2]
        assert sum(metric(n, "swarm_node_peers_declared_dead_total", timeout=10) for n in alive) >= 1
        assert sum(metric(n, "swarm_node_failed_hops_total", timeout=10) for n in alive) >= 1
        assert metric(data, "swarm_node_reroutes_total", timeout=10) >= 1
        assert sum(e.get("reroutes", 0) for e in history.values()) >= 1
        assert metric(data, "swarm_node_rounds_aborted_total", timeout=10) == 0

        # 2. Restart it with the same identity and checkpoint directory, and meanwhile (3.) kill the only
        # node of stage 2, then start a new node for stage 2.
        back = swarm.start_node(f"{victim.name}-again", "1", initial_peers=swarm.initial_peers(), extra=[
            "--checkpoint-dir", str(tmp_path / f"{victim.name}.ckpt"),
            "--identity-path", str(tmp_path / f"{victim.name}.key")])
        os.killpg(s2.process.pid, signal.SIGKILL)
        s2.process.wait()
        wait_for(lambda: "stage 2 has no live replica; training continues on paths that skip it" in log(data), 60,
                 "the planner to say stage 2 is skipped")
        mark = max(rounds(data))
        status = run_cli("status", "--swarm", "churn", "--json", "--initial-peers", *swarm.initial_peers())
        assert status.returncode == 0 and json.loads(status.stdout)["missing_stages"] == [2], status.stdout
        new2 = swarm.start_node("s2new", "2", initial_peers=swarm.initial_peers())

        # The restarted node resumed from its checkpoint, then copied its replica's newer state, and follows.
        swarm.wait_started([back], timeout=120)
        assert back.started()["peer_id"] == victim_peer
        wait_for(lambda: back.events("serving"), 120, "the restarted node to join")
        assert "resumed from its checkpoint" in log(back)
        assert [e["source"] for e in back.events("stage_recovered")] == ["checkpoint", "replica"]
        e = wait_for(lambda: next((e for e in back.events() if e["event"] in ("round", "caught_up")), None), 120,
                     "the restarted node to follow a round")
        other = wait_for(lambda: rounds(survivor).get(e["round"]), 60, "the replica's matching round")
        assert e["digests"]["1"] == other["digests"]["1"]

        # Without stage 2, rounds go on along paths that skip it.
        wait_for(lambda: max(rounds(data)) >= mark + 2, 120, "two rounds without stage 2")
        skipped = [e for r, e in rounds(data).items() if mark < r <= mark + 2]
        assert all(e["stage_visits"][2] == 0 and e["failed"] == 0 and e["missing_stages"] == [2] for e in skipped)

        # The new stage-2 node found no replica or checkpoint left: CheckFree rebuilt it from stage 1.
        swarm.wait_started([new2], timeout=120)
        wait_for(lambda: new2.events("serving"), 120, "the new stage-2 node to join")
        assert "rebuilt by CheckFree" in log(new2)
        assert [e["source"] for e in new2.events("stage_recovered")] == ["checkfree"]
        wait_for(lambda: any(e["stage_visits"][2] > 0 for e in rounds(data).values() if e["round"] > mark), 120,
                 "stage 2 back in the plans")
        assert all(e["failed"] == 0 for e in rounds(data).values())
    finally:
        swarm.stop()
