"""--identity-path keeps a node's peer id across restarts."""

import pytest

from node.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow


def test_peer_id_is_stable_across_restarts(tmp_path):
    identity = tmp_path / "node.key"
    peer_ids = []
    for attempt in range(2):
        swarm = LocalSwarm(tmp_path / f"run{attempt}", "identity",
                           common_args=["--num-stages", "1", "--identity-path", str(identity), "--device", "cpu"])
        swarm.workdir.mkdir()
        try:
            node = swarm.start_node("node", "0")
            swarm.wait_started([node], timeout=120)
            peer_ids.append(node.started()["peer_id"])
        finally:
            swarm.stop()
    assert identity.is_file()
    assert peer_ids[0] == peer_ids[1]
    other = LocalSwarm(tmp_path / "other", "identity", common_args=["--num-stages", "1", "--device", "cpu"])
    other.workdir.mkdir()
    try:
        node = other.start_node("node", "0")
        other.wait_started([node], timeout=120)
        assert node.started()["peer_id"] != peer_ids[0]
    finally:
        other.stop()
