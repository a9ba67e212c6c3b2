"""Volunteers behind a real NAT (tests/netns.py) serve stages through relay members, in a private swarm.

Public side (a veth in the root namespace): r2a (starts the swarm) and r2b host stage 2 and relay; p1 hosts
stage 1 and relays for nobody (--relay-limit 0). Behind the masquerading router, with no port forwarded and
`--host 0.0.0.0`: the data node data0 (stage 0) and h1 (stage 1). Both find themselves unreachable, attach to
a relay and announce their port there; data0 plans, h1 is planned, and the hops between the two NAT'd nodes
go through relays (no hole punching here). A stranger at home without the key is refused everywhere; status
and experts list work from home; killing h1's relay mid-round loses no microbatch; a forwarded port makes
h1 direct.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from node.commands.status import node_table
from node.process.local_swarm import LocalSwarm
from protocol.records import RoundPlan
from tests.helpers import REPO, node, rounds, run_cli, wait_for
from tests.netns import forward_port, home_behind_nat

pytestmark = pytest.mark.slow

SWARM = "nat-swarm"
MICROBATCHES, BATCH, SEQ = 4, 2, 32
COMMON = ["--num-stages", "3", "--torch-threads", "1", "--device", "cpu", "--microbatches", str(MICROBATCHES),
          "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--round-timeout", "20", "--heartbeat-interval", "1",
          "--record-ttl", "6", "--reachability-timeout", "3", "--log-level", "info"]
FULL_TOKENS = MICROBATCHES * BATCH * SEQ


@pytest.fixture(scope="module")
def nat():
    with home_behind_nat() as built:  # torn down after a failure too
        yield built


@pytest.fixture(scope="module")
def swarm(nat, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nat")
    key = workdir / "swarm.key"
    assert run_cli("keygen", str(key)).returncode == 0
    swarm = LocalSwarm(workdir, SWARM, common_args=[*COMMON, "--swarm-key", str(key)])
    swarm.key = key
    try:
        public = ["--host", nat.public_ip]
        first = swarm.start_node("r2a", "2", extra=public)
        swarm.wait_started([first], timeout=60)
        peers = swarm.initial_peers()
        others = [swarm.start_node("r2b", "2", initial_peers=peers, extra=public),
                  swarm.start_node("p1", "1", initial_peers=peers, extra=[*public, "--relay-limit", "0"])]
        home = ["--host", "0.0.0.0", "--reachability-recheck", "3"]
        data = swarm.start_node("data0", "0", initial_peers=peers, prefix=nat.home_cmd(), extra=home)
        swarm.wait_started([*others, data], timeout=90)
        h1 = swarm.start_node("h1", "1", initial_peers=peers, prefix=nat.home_cmd(), extra=home)
        swarm.wait_started([h1], timeout=60)
        yield swarm
    finally:
        swarm.stop()


def relayed(n) -> list[dict]:
    return [e for e in n.events("reachability") if e["reach"] == "relayed"]


def at_home(nat, swarm, *args: str) -> subprocess.CompletedProcess:
    """`swarm-node ARGS` run from the home namespace, as a volunteer behind the NAT would."""
    return subprocess.run(nat.home_cmd(sys.executable, "-m", "node", *args, "--swarm", SWARM, "--swarm-key",
                                       str(swarm.key), "--initial-peers", *swarm.initial_peers()),
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_nodes_behind_nat_serve_through_relays_and_the_loss_falls(nat, swarm):
    data, h1, p1 = node(swarm, "data0"), node(swarm, "h1"), node(swarm, "p1")
    public = {node(swarm, name).started()["peer_id"] for name in ("r2a", "r2b")}
    for n in (data, h1):
        assert n.started()["endpoint"].startswith(f"{nat.home_ip}:")  # its own address, never 0.0.0.0
        first = wait_for(lambda n=n: relayed(n), 30, f"{n.name} to attach to a relay")[0]
        assert first["via"] in public, first  # not p1 (it relays for nobody), not the other NAT'd node
        assert first["endpoint"].startswith(f"{nat.public_ip}:"), first
        assert n.events("reachability")[0]["reach"] == "unreachable"
    log = h1.log_path.read_text()
    assert len([line for line in log.splitlines() if " WARN " in line and "forward TCP port" in line]) == 1
    assert "reachable through relay" in log
    # The data node behind NAT plans; h1 is planned at its relay's port and computes its visits.
    me = h1.started()["peer_id"]
    wait_for(lambda: sum(sum(e["counts"].values()) for e in rounds(h1).values()) >= 6, 90, "h1's visits")
    done = [e for _, e in sorted(rounds(data).items())]
    with_h1 = [e for e in done if me in RoundPlan.from_value(e["plan"]).participants()]
    assert with_h1, "h1 was never planned"
    assert RoundPlan.from_value(with_h1[-1]["plan"]).endpoints()[me].startswith(f"{nat.public_ip}:")
    assert all(e["failed"] == 0 and e["tokens"] == FULL_TOKENS for e in done[1:]), done
    assert p1.events("round"), "p1 takes part too"
    # Its loss falls well below its first rounds' (learning past the unigram level is tests/node/test_skip_swarm.py's).
    wait_for(lambda: len(rounds(data)) >= 12, 90, "12 rounds")
    losses = [e["loss"] for _, e in sorted(rounds(data).items())]
    assert statistics.mean(losses[-3:]) < 0.9 * statistics.mean(losses[:3]), losses
    # status, from behind the NAT, shows both as relayed, through the relay each names.
    shown = at_home(nat, swarm, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {row["peer"]: row for row in json.loads(shown.stdout)["nodes"]}
    for n in (data, h1):
        row = rows[n.started()["peer_id"]]
        assert row["reach"] == f"relayed via {relayed(n)[-1]['via'][-8:]}" and row["reachable"], row
    assert f"{me[-12:]}" in node_table(list(rows.values()))


STRANGER = """
import json, sys, grpc
from protocol.generated.swarm.v1 import relay_pb2, stage_pb2
from protocol.service import RelayStub, StageStub
codes = {}
for endpoint in sys.argv[1:]:
    with grpc.insecure_channel(endpoint) as channel:
        for name, call in (("Ping", lambda: StageStub(channel).Ping(stage_pb2.PingRequest(), timeout=5)),
                           ("Attach", lambda: next(RelayStub(channel).Attach(relay_pb2.AttachRequest(
                               swarm_id="nat-swarm"), timeout=5)))):
            try:
                call()
                codes[f"{name} {endpoint}"] = "OK"
            except grpc.RpcError as e:
                codes[f"{name} {endpoint}"] = e.code().name
print(json.dumps(codes))
"""


def test_a_stranger_at_home_without_the_key_is_refused_on_every_path(nat, swarm):
    """Directly (a public node), through a relay (both NAT'd nodes' relayed endpoints) and at home (their own
    ports, reachable from inside): every call is UNAUTHENTICATED, and the swarm trains on."""
    endpoints = [node(swarm, "p1").started()["endpoint"], node(swarm, "r2a").started()["endpoint"]]
    for name in ("data0", "h1"):
        n = node(swarm, name)
        endpoints += [relayed(n)[-1]["endpoint"], n.started()["endpoint"]]
    tried = subprocess.run(nat.home_cmd(sys.executable, "-c", STRANGER, *endpoints), capture_output=True, text=True,
                           timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert tried.returncode == 0, tried.stderr
    codes = json.loads(tried.stdout)
    assert len(codes) == 2 * len(endpoints) and set(codes.values()) == {"UNAUTHENTICATED"}, codes
    before = max(rounds(node(swarm, "data0")))
    wait_for(lambda: max(rounds(node(swarm, "data0"))) > before, 30, "another round")


def test_experts_list_works_from_behind_the_nat(nat, swarm):
    listed = at_home(nat, swarm, "experts", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"swarm '{SWARM}': 0 expert(s)" in listed.stdout, listed.stdout  # a pipeline swarm, read in full


def test_killing_the_relay_of_a_nat_node_mid_round_loses_no_microbatch(nat, swarm):
    data, h1 = node(swarm, "data0"), node(swarm, "h1")
    wait_for(lambda: sum(sum(e["counts"].values()) for e in rounds(h1).values()) >= 2, 90, "h1 to serve")
    via = relayed(h1)[-1]["via"]
    victim = next(n for n in swarm.nodes if n.started() and n.started()["peer_id"] == via)
    usual = statistics.median(e["round_s"] for e in list(rounds(data).values())[-5:])
    last = max(rounds(data))
    wait_for(lambda: max(rounds(data)) > last, 30, "a round to end")
    time.sleep(min(1.0, usual / 3))  # into the next round
    killed_at = time.monotonic()
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    moved = wait_for(lambda: [e for e in relayed(h1) if e["via"] != via], 15, "h1 to attach to another relay")
    print(f"h1 re-attached {time.monotonic() - killed_at:.1f} s after the kill (upper bound)")
    assert moved[0]["via"] != via
    hit = max(rounds(data)) + 1  # the round in flight when the relay died
    wait_for(lambda: len([r for r in rounds(data) if r >= hit]) >= 4, 90, "4 rounds from the kill on")
    after = [rounds(data)[r] for r in sorted(rounds(data)) if r >= hit][:4]
    assert all(e["failed"] == 0 and e["tokens"] == FULL_TOKENS for e in after), after
    assert after[0]["round_s"] <= usual + 5, (after[0]["round_s"], usual)
    assert any(e["counts"] for e in list(rounds(h1).values())[-2:]), "h1 serves through its new relay"


def test_a_forwarded_port_makes_the_nat_node_direct(nat, swarm):
    data, h1 = node(swarm, "data0"), node(swarm, "h1")
    port = h1.started()["endpoint"].rsplit(":", 1)[1]
    forward_port(nat, int(port))
    direct = wait_for(lambda: [e for e in h1.events("reachability") if e["reach"] == "direct"], 20,
                      "h1 to find itself reachable")
    assert direct[0]["endpoint"] == f"{nat.router_wan_ip}:{port}", direct
    me = h1.started()["peer_id"]

    def planned_direct():
        return [e for e in rounds(data).values() if e["round"] > 0 and
                RoundPlan.from_value(e["plan"]).endpoints().get(me) == f"{nat.router_wan_ip}:{port}"]
    found = wait_for(planned_direct, 30, "a plan with h1 at its forwarded port")
    assert found[-1]["failed"] == 0 and found[-1]["tokens"] == FULL_TOKENS
