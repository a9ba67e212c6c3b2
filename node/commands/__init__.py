"""One module per `swarm-node` subcommand. Each exposes `add_parser(subparsers)` and `run(args) -> int`."""
