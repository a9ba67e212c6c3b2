"""Members behind NAT: what a relayed hop costs, and what NAT'd stage nodes cost a training swarm.

    sudo python bench/bench_nat.py [--quick] [--json PATH] [--out bench/results]

Part 1, hops (loopback, separate processes): a Forward of a float32 tensor of 1 and 16 MiB, sent as the
node sends it (`StageStub.Forward` over `encode_frames`) to a receiver that decodes it as the node does
(bench_transport's gRPC server), timed to the receiver's Ack:
  * direct  - to the receiver's own port;
  * relayed - to the port a relay member (a RelayServer in a process of its own, --relay-limit high enough not
              to bind) keeps for the receiver, whose RelayTunnel (a third process) takes each connection back
              and splices it to the receiver: two extra splices and two extra loopback legs per byte;
  * relayed at the default cap - the same through a relay at the default --relay-limit.
Repeats are interleaved; medians. No hole punching is implemented, so there is no hole-punched column.

Part 2, a swarm (needs root: network namespaces and nftables, as the NAT tests): 4 stages over 6 real node
processes (data node, stage 1 twice, stage 2 twice, stage 3), every node's endpoint placed in a region of
bench/instances/gcp12-20nodes.json with that instance's latency and bandwidth emulated in the data plane, at both
balances in one run: the links as given, and their bandwidth divided by --link-slowdown (default 12, as
bench_swarm). At each, three runs, same seed, same layout: 0, 1 (the second stage-1
replica) and 2 (both second replicas) stage nodes behind the NAT of tests/netns.py, with no port forwarded,
relayed by the stage-3 node (the only relay). A relayed node's relay ports sit in the NAT'd node's own region
in the emulation: the relay is taken to be near it, so what relaying adds is what the relay process does.
Reported: the median whole round (the data node's round_s, warm-up rounds excluded), its ratio to the
all-direct run, the share of the plans' stage visits that went to the NAT'd nodes (with the share an even
split across replicas would give), and the node processes' CPU seconds per round.

Writes bench/results/nat.md and, with --json, {"hop_mb_s": {...}, "round_s": {...}, "nat_visit_share": {...},
"cpu_s_per_round": {...}, "balances": {"1": {the same three}, "12": {...}}} (the top-level three: --link-slowdown's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_swarm import LINK_SLOWDOWN, emulation_file, link_slowdown_option  # noqa: E402
from bench.bench_transport import Children, _child_setup, _tensor_shape, grpc_server_main  # noqa: E402

MiB = 1 << 20
SIZES_MIB = (1, 16)
REPEATS = {1: 15, 16: 9}
QUICK_REPEATS = {1: 7, 16: 5}
UNBOUND_LIMIT_MIB_S = 100_000.0  # a relay limit no loopback transfer reaches: the mechanism's own speed
TIMEOUT_S = 60.0

# Part 2: stage of each node; which of them sit behind the NAT in each run.
LAYOUT = (0, 1, 2, 3, 1, 2)
RELAY = 3  # the node that relays (the others run --relay-limit 0)
NAT_RUNS = {0: (), 1: (4,), 2: (4, 5)}
NUM_STAGES = 4
ROUNDS, QUICK_ROUNDS = 14, 8
WARMUP_ROUNDS = 3  # first plans run on default link estimates; a NAT'd node joins once relayed
NODE_ARGS = ["--model", "tiny", "--microbatches", "4", "--max-inflight", "2", "--batch-size", "4", "--seq-len", "64",
             "--torch-threads", "1", "--device", "cpu", "--round-timeout", "120", "--seed", "0",
             "--links-refresh-rounds", "2", "--log-level", "warning", "--heartbeat-interval", "1",
             "--reachability-timeout", "3", "--num-stages", str(NUM_STAGES)]
ROUND_RATIO_TARGET = 1.3
HOP_SHARE_TARGET = 0.30


# ---- part 1: hops --------------------------------------------------------------------------------------------------
def relay_main(conn, limit_mib_s: float) -> None:
    """A relay member's gRPC server with the relay service, as the host registers it."""
    _child_setup()
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from node.config import RelayConfig
    from node.host.metrics import NodeMetrics
    from node.relay.server import RelayServer
    from protocol.grpc_options import server_options
    from protocol.limits import WireLimits
    from protocol.service import relay_service_handler

    relay = RelayServer.create(RelayConfig(limit=limit_mib_s), "127.0.0.1", "127.0.0.1", "bench", NodeMetrics(), 0.25)
    # the node's server options: they admit the members' keepalive pings
    server = grpc.server(ThreadPoolExecutor(max_workers=8), options=server_options(WireLimits()))
    server.add_generic_rpc_handlers((relay_service_handler(relay),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        conn.send(("ready", (f"127.0.0.1:{port}", [os.getpid()])))
        conn.recv()
    except (EOFError, OSError):
        pass
    finally:
        server.stop(grace=None).wait(5)
        relay.close()


def member_main(conn, relay_endpoint: str, target: str) -> None:
    """The member behind NAT: its RelayTunnel to the relay, spliced to its own server at `target`."""
    _child_setup()
    import threading

    from node.config import RelayConfig
    from node.dataplane.transport import StageClients
    from node.relay.tunnel import RelayTunnel
    from protocol.limits import WireLimits
    from protocol.records import NodeRecord, NodeState, Reach

    record = NodeRecord(peer_id="relay", endpoint=relay_endpoint, stages=(3,), compute_s={}, memory_slots=1,
                        role="stage", version="0", swarm="bench", round=0, state=NodeState.SERVING, reach=Reach.DIRECT)
    attached = threading.Event()
    endpoints: list[str] = []
    clients = StageClients(WireLimits())
    tunnel = RelayTunnel.create("member", "bench", lambda: {"relay": record}, clients, target, RelayConfig(),
                                threading.Event(), on_attached=lambda e, r: (endpoints.append(e), attached.set()),
                                on_detached=lambda why: None)
    try:
        if not attached.wait(TIMEOUT_S):
            raise TimeoutError("the member did not attach to the relay")
        conn.send(("ready", (endpoints[0], [os.getpid()])))
        conn.recv()
    except (EOFError, OSError):
        pass
    finally:
        tunnel.close()
        clients.close()


def hop_client_main(conn, targets: dict[str, str], repeats: dict[int, int]) -> None:
    """Forward the same tensor to each target in turn (the order rotates every repeat); seconds per transfer."""
    _child_setup()
    import grpc
    import torch

    from protocol.envelope import HopSpec, make_envelope
    from protocol.grpc_options import channel_options
    from protocol.limits import WireLimits
    from protocol.service import StageStub
    from protocol.tensor_frames import encode_frames

    from bench.bench_transport import RECEIVER

    torch.set_num_threads(1)
    limits = WireLimits()
    forwards = {}
    for name, endpoint in targets.items():
        channel = grpc.insecure_channel(endpoint, options=channel_options(limits))
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
        forwards[name] = StageStub(channel).Forward
    origin = HopSpec(0, "origin", "127.0.0.1:1")
    envelope = make_envelope("bench", 0, 0, [origin, HopSpec(1, RECEIVER, "127.0.0.1:2"), origin], hop=1)
    names = list(targets)
    results: dict[int, dict[str, list[float]]] = {}
    for size, count in repeats.items():
        tensor = torch.randn(_tensor_shape(size), generator=torch.Generator().manual_seed(size))
        for name in names:  # warm-up: connections made, buffers grown
            forwards[name](encode_frames(envelope, tensor, limits), timeout=TIMEOUT_S)
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(count):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                forwards[name](encode_frames(envelope, tensor, limits), timeout=TIMEOUT_S)
                times[name].append(time.perf_counter() - started)
        results[size] = times
        print(f"  {size:>2} MiB, median MB/s: " + ", ".join(
            f"{n} {size * MiB / statistics.median(t) / 1e6:,.0f}" for n, t in times.items()), flush=True)
    conn.send(("done", results))


def run_hops(repeats: dict[int, int]) -> dict[str, dict[str, float]]:
    """MB/s per target and size (median over repeats)."""
    from node.config import RelayConfig

    children = Children()
    try:
        receiver = children.start("receiver", grpc_server_main, None)
        port = children.wait_for(receiver, "receiver")[1][0]
        target = f"127.0.0.1:{port}"
        targets = {"direct": target}
        for name, limit in (("relayed", UNBOUND_LIMIT_MIB_S), ("relayed_default_cap", RelayConfig().limit)):
            relay = children.start(f"{name}-relay", relay_main, limit)
            relay_endpoint = children.wait_for(relay, f"{name} relay")[1][0]
            member = children.start(f"{name}-member", member_main, relay_endpoint, target)
            targets[name] = children.wait_for(member, f"{name} member")[1][0]
        client = children.start("client", hop_client_main, targets, repeats)
        _, results = children.wait_for(client, "client", kinds=("done",), timeout=600)
    finally:
        children.stop_all()
    return {name: {str(size): size * MiB / statistics.median(results[size][name]) / 1e6 for size in results}
            for name in targets}


# ---- part 2: a swarm with NAT'd stage nodes ------------------------------------------------------------------------
def run_swarm(workdir: Path, nat_nodes: tuple[int, ...], rounds: int, slowdown: float, nat) -> dict:
    """One run: returns {"round_s": median whole round, "nat_visit_share": ..., "even_share": ...}."""
    from node.process.local_swarm import LocalSwarm, free_port
    from protocol.records import RoundPlan

    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in LAYOUT]
    relay_port = free_port()
    hosts = [nat.home_ip if i in nat_nodes else nat.public_ip for i in range(len(LAYOUT))]
    endpoints = [f"{host}:{port}" for host, port in zip(hosts, ports)]
    # The relay gives its k-th attached member port relay_port + k; members attach in node order.
    relayed = {i: f"{nat.public_ip}:{relay_port + k}" for k, i in enumerate(nat_nodes, 1)}
    links = emulation_file(workdir / "links.json", endpoints + list(relayed.values()), slowdown=slowdown)
    spec = json.loads(links.read_text())
    for entry, i in zip(spec["nodes"][len(LAYOUT):], relayed):  # a relay port sits where its member does
        entry["location"] = spec["nodes"][i]["location"]
    links.write_text(json.dumps(spec))
    swarm = LocalSwarm(workdir, swarm=f"bench-nat-{len(nat_nodes)}", common_args=[
        *NODE_ARGS, "--rounds", str(rounds), "--min-nodes", str(len(LAYOUT)), "--emulate-links", str(links)])

    def start(i: int, peers: list[str] | None):
        extra = ["--port", str(ports[i])]
        if i in nat_nodes:
            extra += ["--host", "0.0.0.0", "--relay-limit", "0"]
            return swarm.start_node(f"node{i}", str(LAYOUT[i]), extra=extra, initial_peers=peers,
                                    prefix=nat.home_cmd())
        extra += ["--host", nat.public_ip]
        extra += ["--relay-port", str(relay_port)] if i == RELAY else ["--relay-limit", "0"]
        return swarm.start_node(f"node{i}", str(LAYOUT[i]), extra=extra, initial_peers=peers)

    try:
        first = start(0, None)
        swarm.wait_started([first], timeout=180)
        peers = swarm.initial_peers()
        public = [start(i, peers) for i in range(1, len(LAYOUT)) if i not in nat_nodes]
        swarm.wait_started(public, timeout=300)
        for i in nat_nodes:  # one at a time, so that each gets its relay port in order
            n = start(i, peers)
            swarm.wait_started([n], timeout=180)
            deadline = time.monotonic() + 60
            while not [e for e in n.events("reachability") if e["reach"] == "relayed"]:
                if time.monotonic() > deadline or not n.alive():
                    raise RuntimeError(f"node{i} did not attach to the relay; logs in {workdir}")
                time.sleep(0.5)
            got = [e for e in n.events("reachability") if e["reach"] == "relayed"][0]["endpoint"]
            if got != relayed[i]:
                raise RuntimeError(f"node{i} is relayed at {got}, not {relayed[i]} as the emulation file says")
        deadline = time.monotonic() + 900
        while any(n.alive() for n in swarm.nodes) and time.monotonic() < deadline:
            time.sleep(1.0)
    finally:
        swarm.stop()
    events = {e["round"]: e for e in swarm.nodes[0].events("round")}
    done = sorted(events)
    if len(done) < rounds:
        raise RuntimeError(f"only {len(done)} of {rounds} rounds finished; logs in {workdir}")
    counted = [events[r] for r in done[WARMUP_ROUNDS:]]
    if any(e["failed"] or not e["tokens"] for e in counted):
        raise RuntimeError(f"rounds lost microbatches: {[(e['round'], e['failed']) for e in counted]}")
    peer_of = {int(n.name.removeprefix("node")): n.started()["peer_id"] for n in swarm.nodes}
    nat_peers = {peer_of[i] for i in nat_nodes}
    visits = to_nat = 0
    for e in counted:
        for mb in RoundPlan.from_value(e["plan"]).microbatches:
            for hop in mb.path[1:-1]:  # the stages between the origin's two visits
                visits += 1
                to_nat += hop.peer_id in nat_peers
    # An even split: each NAT'd node takes 1/replicas of its stage's visits; stages are visited alike.
    even = sum(1 / LAYOUT.count(LAYOUT[i]) for i in nat_nodes) / (NUM_STAGES - 1)
    return {"round_s": statistics.median(e["round_s"] for e in counted), "nat_visit_share": to_nat / visits,
            "even_share": even, "rounds": len(counted), **cpu_per_round(swarm.nodes, done[WARMUP_ROUNDS])}


def cpu_per_round(nodes, first_round: int) -> dict:
    """CPU seconds per round of the node processes over the counted rounds, from the CPU clock each node logs in its
    round events (`cpu_s`): their sum, and the busiest one's (the 2 shared cores show as contention here)."""
    per_node = {}
    for n in nodes:
        clock = sorted((e["round"], e["cpu_s"]) for e in n.events("round") if e["round"] >= first_round)
        if len(clock) >= 2:
            per_node[n.name] = (clock[-1][1] - clock[0][1]) / (clock[-1][0] - clock[0][0])
    return {"cpu_s_per_round": sum(per_node.values()), "busiest_cpu_s_per_round": max(per_node.values())}


def run_swarms(rounds: int, slowdowns: list[float]) -> dict[float, dict[int, dict]]:
    """Every run of NAT_RUNS at each balance (bandwidth divided by each of `slowdowns`), behind one NAT."""
    from tests.netns import NatUnavailable, build, teardown

    try:
        nat = build()
    except NatUnavailable as e:
        raise SystemExit(f"bench_nat: {e}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-nat-") as tmp:
            out: dict[float, dict[int, dict]] = {}
            for slowdown in slowdowns:
                out[slowdown] = {}
                for count, nat_nodes in NAT_RUNS.items():
                    print(f"bandwidth / {slowdown:g}: swarm with {count} NAT'd stage node(s) ...", flush=True)
                    r = run_swarm(Path(tmp) / f"{slowdown:g}-{count}", nat_nodes, rounds, slowdown, nat)
                    out[slowdown][count] = r
                    print(f"  median round {r['round_s']:.2f} s, NAT'd visit share {r['nat_visit_share']:.2f}, "
                          f"{r['cpu_s_per_round']:.2f} CPU s per round", flush=True)
            return out
    finally:
        teardown(nat)


def balance_name(slowdown: float) -> str:
    return "links as given" if slowdown == 1 else f"bandwidth / {slowdown:g}"


# ---- report --------------------------------------------------------------------------------------------------------
def render(hops: dict, balances: dict[float, dict[int, dict]], command: str, elapsed: float) -> str:
    share16 = hops["relayed"]["16"] / hops["direct"]["16"]
    lines = [
        "# Members behind NAT: relayed hops and NAT'd stage nodes",
        "",
        f"`{command}` on {platform.node() or 'this machine'} ({os.cpu_count()} cores), {elapsed / 60:.1f} min.",
        "",
        "## Hops on loopback (MB/s, median)",
        "",
        "| path | 1 MiB | 16 MiB | vs direct at 16 MiB |",
        "|---|---|---|---|",
    ]
    for name, label in (("direct", "direct"), ("relayed", "relayed"),
                        ("relayed_default_cap", "relayed, default --relay-limit (64 MiB/s both ways)")):
        lines.append(f"| {label} | {hops[name]['1']:,.0f} | {hops[name]['16']:,.0f} | "
                     f"{hops[name]['16'] / hops['direct']['16']:.2f} |")
    lines += [
        "| hole-punched | - | - | none: no hole punching here |",
        "",
        f"Target: a relayed hop >= {HOP_SHARE_TARGET:.0%} of a direct hop at 16 MiB: {share16:.0%} -> "
        f"{'met' if share16 >= HOP_SHARE_TARGET else 'MISSED'}.",
        "",
        "## A 4-stage swarm over emulated GCP links, stage nodes behind NAT, at both balances",
        "",
        "| balance | NAT'd stage nodes | median round s | vs all direct | NAT'd share of visits | even split would be "
        "| CPU s / round (6 node processes) | busiest process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for slowdown, swarms in balances.items():
        base = swarms[0]["round_s"]
        for k, r in swarms.items():
            share = f"{r['nat_visit_share']:.2f}" if k else "-"
            even = f"{r['even_share']:.2f}" if k else "-"
            lines.append(f"| {balance_name(slowdown)} | {k} | {r['round_s']:.2f} | {r['round_s'] / base:.2f} | {share} "
                         f"| {even} | {r['cpu_s_per_round']:.2f} | {r['busiest_cpu_s_per_round']:.2f} |")
        worst = max(swarms[k]["round_s"] for k in swarms if k) / base
        verdicts.append(f"{balance_name(slowdown)}: worst {worst:.2f}x -> "
                        f"{'met' if worst <= ROUND_RATIO_TARGET else 'MISSED'}")
    rounds = next(iter(balances.values()))[0]["rounds"]
    lines += [
        "",
        f"Target: with NAT'd nodes (a direct replica of each), round time <= {ROUND_RATIO_TARGET}x the all-direct "
        f"swarm's at each balance: {'; '.join(verdicts)}. Every counted round delivered every microbatch ({rounds} "
        f"rounds per run after {WARMUP_ROUNDS} warm-up rounds). The links as given are the instance's; bandwidth / "
        f"{LINK_SLOWDOWN:g} puts each hop's bytes on the wire for as long as a llama-160m activation would take "
        f"(bench_swarm's --link-slowdown). CPU s per round: the node processes' own CPU clocks over the counted "
        f"rounds (their DHT children and p2pd not counted).",
        "",
    ]
    return "\n".join(lines)


def balance_figures(swarms: dict[int, dict]) -> dict:
    """The JSON figures of one balance's runs, keyed by the number of NAT'd stage nodes."""
    return {"round_s": {str(k): r["round_s"] for k, r in swarms.items()},
            "nat_visit_share": {str(k): r["nat_visit_share"] for k, r in swarms.items() if k},
            "cpu_s_per_round": {str(k): r["cpu_s_per_round"] for k, r in swarms.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and rounds (a few minutes)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="where nat.md goes")
    ap.add_argument("--hops-only", action="store_true", help="part 1 only (no root needed)")
    link_slowdown_option(ap)
    args = ap.parse_args(argv)
    started = time.monotonic()
    print("hops: direct and relayed, 1 and 16 MiB ...", flush=True)
    hops = run_hops(QUICK_REPEATS if args.quick else REPEATS)
    slowdowns = sorted({1.0, args.link_slowdown})
    balances = {} if args.hops_only else run_swarms(QUICK_ROUNDS if args.quick else ROUNDS, slowdowns)
    figures = {"hop_mb_s": hops, **balance_figures(balances.get(args.link_slowdown, {})),
               "balances": {f"{s:g}": balance_figures(swarms) for s, swarms in balances.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if args.hops_only:
        print(json.dumps(figures, indent=2))
        return 0
    command = "python bench/bench_nat.py" + (" --quick" if args.quick else "") + \
        (f" --link-slowdown {args.link_slowdown:g}" if args.link_slowdown != LINK_SLOWDOWN else "")
    report = render(hops, balances, command, time.monotonic() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nat.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
