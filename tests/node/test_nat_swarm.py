"""A volunteer behind a real NAT (tests/netns.py) joins a training swarm with no port forwarded.

The swarm (a data node and a stage node) serves on a veth in the root namespace; the volunteer runs in the
home namespace behind a masquerading router, on `--host 0.0.0.0`. It must announce a dialable address, learn
that it is `unreachable` (record and `status`), print the one-line fix, say once why it gets no work, and not
copy its stage's state every round; the swarm trains on without it. Then its port is forwarded: it finds
itself `direct` at the router's address, is planned again, copies the state once, and trains.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from node.commands.status import node_table
from node.process.local_swarm import LocalSwarm
from protocol.records import RoundPlan
from tests.helpers import node, rounds, run_cli, wait_for
from tests.netns import forward_port, home_behind_nat

pytestmark = pytest.mark.slow

SWARM = "nat-swarm"
COMMON = ["--num-stages", "2", "--torch-threads", "1", "--device", "cpu", "--microbatches", "2",
          "--batch-size", "2", "--seq-len", "32", "--round-timeout", "20", "--heartbeat-interval", "1",
          "--record-ttl", "30", "--log-level", "info"]


@pytest.fixture(scope="module")
def nat():
    with home_behind_nat() as built:  # torn down after a failure too
        yield built


@pytest.fixture(scope="module")
def swarm(nat, tmp_path_factory):
    swarm = LocalSwarm(tmp_path_factory.mktemp("nat"), SWARM, common_args=COMMON)
    try:
        public = ["--host", nat.public_ip]
        data = swarm.start_node("data0", "0", extra=public)
        swarm.wait_started([data], timeout=60)
        peers = swarm.initial_peers()
        stage = swarm.start_node("s1", "1", initial_peers=peers, extra=public)
        home = swarm.start_node("home1", "1", initial_peers=peers, prefix=nat.home_cmd(),
                                extra=["--host", "0.0.0.0", "--reachability-recheck", "2"])
        swarm.wait_started([stage, home], timeout=60)
        yield swarm
    finally:
        swarm.stop()


def status(swarm) -> tuple[dict[str, dict], str]:
    """`swarm-node status --json` by peer, and the table `swarm-node status` prints from the same rows (one
    command: each joins the DHT, which takes seconds)."""
    shown = run_cli("status", "--swarm", SWARM, "--json", "--initial-peers", *swarm.initial_peers())
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)["nodes"]
    return {row["peer"]: row for row in rows}, node_table(rows)


def test_a_volunteer_behind_nat_is_classified_unreachable_and_idles_quietly(nat, swarm):
    started = time.monotonic()
    data, home = node(swarm, "data0"), node(swarm, "home1")
    me = home.started()
    assert me["endpoint"].startswith(f"{nat.home_ip}:"), me  # its own routable address, not 0.0.0.0
    checked = wait_for(lambda: home.events("reachability"), 30, "the volunteer's reachability check")
    assert checked[0]["reach"] == "unreachable" and not checked[0]["ok"], checked
    port = me["endpoint"].rsplit(":", 1)[1]
    assert f"not reachable at {nat.router_wan_ip}:{port} from {nat.public_ip}" in checked[0]["message"], checked
    # Training goes on without it, and it idles through the rounds it is left out of.
    first = max(rounds(data), default=-1)
    wait_for(lambda: len([r for r in rounds(data) if r > first]) >= 3, 60, "3 more rounds on the data node")
    assert all(me["peer_id"] not in RoundPlan.from_value(e["plan"]).participants() for e in rounds(data).values()
               if e["round"] > first), "the unreachable volunteer was planned"
    asked = time.monotonic()
    shown, table = status(swarm)
    print(f"status took {time.monotonic() - asked:.1f} s")
    assert shown[me["peer_id"]]["reach"] == "unreachable" and shown[me["peer_id"]]["state"] == "serving", shown
    assert sorted(row["reach"] for p, row in shown.items() if p != me["peer_id"]) == ["direct", "unchecked"]
    assert re.search(rf"{me['peer_id'][-12:]}\s.*unreachable", table), table
    log = home.log_path.read_text()
    fixes = [line for line in log.splitlines() if "not reachable at" in line and "forward TCP port" in line]
    assert len(fixes) == 1, fixes  # one line, not one per check or per round
    left_out = [line for line in log.splitlines() if "left out of round" in line]
    assert len(left_out) == 1 and " WARN " in left_out[0] and "unreachable" in left_out[0], left_out
    assert len(home.events("left_out")) == 1
    loaded = [line for line in log.splitlines() if "loaded the state" in line]
    assert len(loaded) <= 1, loaded  # no copy of the stage every round while left out
    losses = [e["loss"] for e in rounds(data).values() if e["round"] > first]
    assert all(loss is not None for loss in losses), losses

    # The operator forwards the port: the next check finds the node `direct` at the router's address, which
    # it then announces; it is planned again, copies the state it starts from once, and trains.
    forward_port(nat, int(port))
    direct = wait_for(lambda: [e for e in home.events("reachability") if e["reach"] == "direct"], 20,
                      "the volunteer to find itself reachable")
    assert direct[0]["endpoint"] == f"{nat.router_wan_ip}:{port}", direct
    trained = wait_for(lambda: rounds(home), 30, "a round the volunteer worked in")
    plan = RoundPlan.from_value(rounds(data)[min(trained)]["plan"])
    assert plan.endpoints()[me["peer_id"]] == f"{nat.router_wan_ip}:{port}"
    # One copy: after the last round it was left out of (once its record says `direct`), or, when the first plan
    # with it came first, before that round ("planned again ... copying the state it starts from").
    log = home.log_path.read_text()
    assert len([line for line in log.splitlines() if "loaded the state" in line]) == len(loaded) + 1, log
    print(f"NAT test body took {time.monotonic() - started:.1f} s")
