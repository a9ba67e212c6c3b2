"""`swarm-node`: the command-line entry point.

Each subcommand lives in `node.commands.<name>` and exposes `add_parser(subparsers)` and `run(args)`.
Expected failures raise `UsageError` and become one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from node.errors import UsageError

COMMANDS = ("run", "demo", "status", "plan", "experts", "keygen", "eval", "health")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other usage error
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="swarm-node", description="Decentralized swarm-training node (SkipPipe + HDEE).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"node.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except UsageError as e:
        print(f"swarm-node: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
