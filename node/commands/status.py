"""`swarm-node status`: read the swarm's node records from the DHT and print them as a table."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("status", help="print the swarm's nodes as seen in the DHT")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="any peer of the swarm")
    p.add_argument("--swarm", default="swarm-node", help="swarm id (default: swarm-node)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--links", action="store_true",
                   help="print the measured link matrix (RTT ms / MB/s, sender row to receiver column)")
    p.add_argument("--swarm-key", metavar="PATH", default="", help="the swarm key of a private swarm")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hivemind.utils import get_dht_time

    from node.control.discovery import SwarmDirectory, read_members
    from node.control.links import read_link_records
    from node.control.planning import DEFAULT_LINK
    from node.host.trust import reading_swarm
    from node.stage.witness import witnessed_by_others
    from protocol.records import WORK_KEYS

    with reading_swarm(args.initial_peers, args.swarm_key) as (dht, trust):
        members = read_members(dht, args.swarm)
        records, skipped = read_link_records(dht, args.swarm)
        links = {(r.peer_id, receiver): e for r in records for receiver, e in r.to.items()}
        traffic = {(r.peer_id, receiver): kinds for r in records for receiver, kinds in r.traffic.items()}
        now = get_dht_time()
        # The codecs in use are the latest plan's (every sender of a round encodes with its plan's).
        latest = max((r.round for r in members.values()), default=0)
        plan = SwarmDirectory(dht, args.swarm, "", ttl=0, owner=b"").fetch_plan(latest, members) if members else None
        reachable = _reachable(members, trust.auth)
    codecs = dict(round=plan.round, activation=plan.codecs[0], gradient=plan.codecs[1]) if plan else None
    sync = dict(round=plan.round, strategy=plan.sync, every=plan.sync_every) if plan else None
    missing = _missing_stages(members, reachable)
    work = witnessed_by_others({peer: r.witnessed for peer, r in members.items()})
    rows = []
    for peer, r in sorted(members.items(), key=lambda kv: (min(kv[1].stages, default=-1), kv[0])):
        rows.append(dict(peer=peer, stages=",".join(map(str, r.stages)), role=r.role, endpoint=r.endpoint,
                         round=r.round, state=r.state.value, serving=r.serving, reach=_reach(r),
                         via=r.via,
                         compute_ms=round(1000 * sum(r.compute_s.values()), 1),
                         heartbeat_age_s=round(max(0.0, now - r.heartbeat_time), 1), metrics=r.metrics_url,
                         codecs="/".join(r.codecs), sync=r.sync, reachable=peer in reachable,
                         last_sync=_last_sync(r.sync_state), sync_state={str(k): v for k, v in r.sync_state.items()},
                         bans=r.bans, witnessed=work.get(peer, dict.fromkeys(WORK_KEYS, 0))))
    matrix = _link_matrix(sorted(members), links, traffic)
    if args.json:
        import json

        print(json.dumps({"swarm": args.swarm, "time": time.time(), "codecs": codecs, "sync": sync, "nodes": rows, "links": matrix,
                          "skipped_link_values": skipped, "missing_stages": missing}, indent=2))
        return 0
    print(f"swarm '{args.swarm}': {len(rows)} node(s)")
    if missing:
        print(f"missing stages (no reachable serving replica): {', '.join(map(str, missing))}")
    if codecs:
        print(f"codecs (plan of round {codecs['round']}): activations {codecs['activation']}, "
              f"gradients {codecs['gradient']}; sync {sync['strategy']}"
              + (f" every {sync['every']} rounds" if sync['strategy'] == "outer" else ""))
    print(node_table(rows))
    bans = [(row["peer"], peer, ban) for row in rows for peer, ban in sorted(row["bans"].items())]
    if bans:
        print("banned (out of the banning node's plans and paths until the round given):")
        for by, peer, ban in bans:
            print(f"  {peer[-12:]} by {by[-12:]} until round {ban['until']} (offence {ban['offences']}, reported "
                  f"by {ban['accuser'][-12:]}): {ban['reason']}")
    worked = [row for row in rows if row["witnessed"]["hops"] or row["witnessed"]["failed"]]
    if worked:
        print("work witnessed by the peers that received it (hops taken, their tokens, hops whose size passed / "
              "failed the receiver's checks):")
        for row in worked:
            w = row["witnessed"]
            print(f"  {row['peer'][-12:]}  hops {w['hops']}  tokens {w['tokens']}  passed {w['passed']}  "
                  f"failed {w['failed']}")
    defaulted = sum(1 for m in matrix if m["default"])
    print(f"links: {len(matrix) - defaulted} of {len(matrix)} directed pairs measured; the planner prices the "
          f"other {defaulted} at its default ({DEFAULT_LINK.rtt_s * 1000:g} ms RTT, "
          f"{DEFAULT_LINK.bandwidth_Bps / 1e6:g} MB/s)" + (f"; {skipped} malformed values skipped" if skipped else ""))
    if args.links:
        peers = sorted(members)
        cell = {(m["from"], m["to"]): m for m in matrix}
        table = [("from \\ to",) + tuple(p[-8:] for p in peers)]
        for a in peers:
            table.append((a[-8:],) + tuple("-" if a == b else _cell(cell[(a, b)]) for b in peers))
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        for line in table:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        print("cells: RTT ms / MB/s as the row's node measured them; '?' not measured yet (default used), "
              "'!' absurd (default used)")
        moved = [m for m in matrix if m["bytes"]]
        if moved:
            print("bytes the row's calls moved on each link, both ways, by kind (MB):")
            for m in moved:
                kinds = ", ".join(f"{kind} {n / 1e6:.2f}" for kind, n in sorted(m["bytes"].items()))
                print(f"  {m['from'][-8:]} -> {m['to'][-8:]}: {kinds}")
    return 0


def _reach(r) -> str:
    return f"relayed via {r.via[-8:]}" if r.via else r.reach.value


def _last_sync(state: dict[int, dict[str, float]]) -> str:
    return "; ".join(f"{stage}: r{int(x['round'])} {x['bytes'] / 1e6:.2f}MB {x['seconds']:.2f}s drift {x['drift']:.4f}"
                     for stage, x in sorted(state.items())) or "-"


def node_table(rows: list[dict]) -> str:
    """The nodes as aligned columns. `codecs` and `sync` per node: what it prefers (--activation-codec/
    --gradient-codec, --sync); `reach`: how peers reach it, as it found out (direct, relayed via the relay's
    short peer id, unreachable, ...), `unchecked` until a member dialed it back (planners leave unreachable
    nodes out); `last_sync`, per hosted
    stage: the round whose sync it last applied, the bytes it received for it, its seconds and, under outer, the
    drift of its weights from the anchor when it began."""
    header = ("peer", "stages", "role", "endpoint", "reach", "round", "state", "compute_ms", "heartbeat_age_s",
              "codecs", "sync", "last_sync")
    table = [header] + [tuple(str(row[h]) if h != "peer" else row[h][-12:] for h in header) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in table)


def _link_matrix(peers: list[str], links: dict, traffic: dict) -> list[dict]:
    """Every directed pair of members with its estimate, and whether the planner uses its default for it
    (no estimate, or an absurd RTT); a usable RTT without a usable bandwidth keeps the RTT. `bytes`: what the
    first peer's calls to the second moved, both ways, by kind (as the first last published it)."""
    out = []
    for a in peers:
        for b in peers:
            if a == b:
                continue
            e = links.get((a, b))
            rtt_ok = e is not None and 0 <= e.rtt_s < 60
            out.append({"from": a, "to": b, "rtt_s": None if e is None else e.rtt_s,
                        "bandwidth_Bps": None if e is None else e.bandwidth_Bps,
                        "default": not rtt_ok, "bandwidth_default": e is None or not e.usable(),
                        "bytes": traffic.get((a, b), {})})
    return out


def _cell(m: dict) -> str:
    if m["rtt_s"] is None:
        return "?"
    if m["default"]:
        return "!"
    bandwidth = "?" if m["bandwidth_default"] else f"{m['bandwidth_Bps'] / 1e6:.1f}"
    return f"{m['rtt_s'] * 1000:.1f}/{bandwidth}"


def _reachable(members: dict, auth) -> set[str]:
    """Members whose gRPC server answers a Ping now (a killed node's record outlives it), asked as a node asks."""
    from node.config import FaultConfig
    from node.dataplane.transport import StageClients
    from protocol.limits import WireLimits

    clients = StageClients(WireLimits(), auth)
    try:
        return clients.answering({p: r.endpoint for p, r in members.items()}, FaultConfig.probe_timeout,
                                 FaultConfig.ping_workers)
    finally:
        clients.close()


def _missing_stages(members: dict, reachable: set[str]) -> list[int]:
    """Stages of the swarm (as its nodes report its depth) that no plannable node answering a Ping hosts."""
    depth = max((r.num_stages for r in members.values()), default=0)
    hosted = {s for p, r in members.items() if r.plannable and p in reachable for s in r.stages}
    return [s for s in range(depth) if s not in hosted]
