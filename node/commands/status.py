"""`swarm-node status`: read the swarm's node records from the DHT and print them as a table."""

from __future__ import annotations

import argparse
import time

from node.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("status", help="print the swarm's nodes as seen in the DHT")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="any peer of the swarm")
    p.add_argument("--swarm", default="swarm-node", help="swarm id (default: swarm-node)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hivemind.dht import DHT
    from hivemind.utils import get_dht_time

    from node.discovery import SwarmDirectory, read_members

    try:
        dht = DHT(initial_peers=args.initial_peers, client_mode=True, start=True)
    except Exception as e:
        raise UsageError(f"could not reach the swarm through {' '.join(args.initial_peers)}: {e}") from None
    try:
        members = read_members(dht, args.swarm)
        now = get_dht_time()
        # The codecs in use are the latest plan's (every sender of a round encodes with its plan's).
        latest = max((r.round for r in members.values()), default=0)
        plan = SwarmDirectory(dht, args.swarm, "", ttl=0).fetch_plan(latest) if members else None
    finally:
        dht.shutdown()
    codecs = dict(round=plan.round, activation=plan.codecs[0], gradient=plan.codecs[1]) if plan else None
    rows = []
    for peer, r in sorted(members.items(), key=lambda kv: (min(kv[1].stages), kv[0])):
        rows.append(dict(peer=peer, stages=",".join(map(str, r.stages)), role=r.role, endpoint=r.endpoint,
                         round=r.round, serving=r.serving,
                         compute_ms=round(1000 * sum(r.compute_s.values()), 1),
                         heartbeat_age_s=round(max(0.0, now - r.heartbeat_time), 1), metrics=r.metrics_url,
                         codecs="/".join(r.codecs)))
    if args.json:
        import json

        print(json.dumps({"swarm": args.swarm, "time": time.time(), "codecs": codecs, "nodes": rows}, indent=2))
        return 0
    print(f"swarm '{args.swarm}': {len(rows)} node(s)")
    if codecs:
        print(f"codecs (plan of round {codecs['round']}): activations {codecs['activation']}, "
              f"gradients {codecs['gradient']}")
    # `codecs` per node: the activation/gradient codecs it prefers (--activation-codec/--gradient-codec).
    header = ("peer", "stages", "role", "endpoint", "round", "serving", "compute_ms", "heartbeat_age_s", "codecs")
    table = [header] + [tuple(str(row[h]) if h != "peer" else row[h][-12:] for h in header) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    return 0
