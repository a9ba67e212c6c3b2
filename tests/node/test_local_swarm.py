"""The test harness itself: a wait fails at once, naming the node and its log, when a node crashes meanwhile."""

from __future__ import annotations

import time

import pytest

from node.process.local_swarm import LocalSwarm
from tests.helpers import wait_for


def test_a_wait_fails_at_once_when_a_node_exits_with_an_error(tmp_path):
    swarm = LocalSwarm(tmp_path, "harness")
    swarm.start_node("bad", "0", extra=["--round-timeout", "-1"])  # refused by the CLI: exit code 2
    started = time.monotonic()
    with pytest.raises(AssertionError, match="node bad exited with code 2 while waiting for a round") as e:
        wait_for(lambda: False, 60, "a round")
    assert time.monotonic() - started < 30 and "round-timeout" in str(e.value)  # the log's end names the flag
    swarm.stop()  # a stopped swarm's nodes are no longer watched: the next wait times out as usual
    with pytest.raises(AssertionError, match="timed out"):
        wait_for(lambda: False, 0.5, "nothing")
