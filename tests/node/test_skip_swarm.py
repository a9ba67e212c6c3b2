"""SkipPipe in the daemon: with --visits L < S, every microbatch visits L stages, visits stay balanced,
and the swarm still learns."""

from __future__ import annotations

import pytest

from node.local_swarm import LocalSwarm
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def test_partial_pipeline_training(tmp_path):
    swarm = LocalSwarm(tmp_path, "skip", common_args=[
        "--num-stages", "4", "--visits", "3", "--microbatches", "3", "--rounds", "6", "--torch-threads", "1",
        "--device", "cpu", "--round-timeout", "30"])
    try:
        first = swarm.start_node("data", "0")
        swarm.wait_started([first], timeout=120)
        others = [swarm.start_node(f"s{s}", str(s), initial_peers=swarm.initial_peers()) for s in (1, 2, 3)]
        swarm.wait_started(others, timeout=120)
        wait_for(lambda: len(first.events("round")) >= 6, 240, "six rounds")
    finally:
        swarm.stop()
    rounds = first.events("round")
    for e in rounds:
        # 3 microbatches x 2 visits beyond stage 0, spread evenly over stages 1..3 (a full pipeline: 3, 3, 3, 3).
        assert e["stage_visits"] == [3, 2, 2, 2], e["stage_visits"]
        assert e["failed"] == 0
    losses = [e["loss"] for e in rounds]
    assert losses[-1] < losses[0], losses
