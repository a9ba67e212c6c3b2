"""`swarm-node keygen PATH`: write a new 256-bit swarm key (mode 0600) for a private swarm."""

from __future__ import annotations

import argparse

from node.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("keygen", help="write a new swarm key for a private swarm",
                              description="Writes a random 256-bit key, readable only by you. Give every node "
                                          "of the swarm a copy with --swarm-key PATH; nodes without it cannot join.")
    p.add_argument("path", metavar="PATH", help="file to create (an existing file is never overwritten)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from protocol.swarm_key import generate_key_file

    try:
        generate_key_file(args.path)
    except FileExistsError:
        raise UsageError(f"{args.path} exists; remove it first or pick another path") from None
    except OSError as e:
        raise UsageError(f"cannot write {args.path}: {e.strerror}") from None
    print(f"swarm-node: wrote a swarm key to {args.path}; start every node with --swarm-key {args.path}")
    return 0
