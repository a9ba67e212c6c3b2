"""`swarm-node run`: the daemon on one host."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading

from node.config import add_node_arguments, load_config
from node.logs import setup_logging


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the node daemon on this host",
                              description="Join (or start) a swarm and host pipeline stages. "
                                          "Settings: --config FILE < SWARM_NODE_* env < flags.")
    add_node_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    setup_logging(config.lifecycle.log_level)
    # SIGTERM and SIGINT (also a terminal's Ctrl-C) both mean: stop taking work, withdraw, exit 0. Installed
    # before anything slow starts, so a signal during start-up stops the node too.
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        if not stop.is_set():  # a stop that overruns its bound says where each thread is
            faulthandler.dump_traceback_later(config.lifecycle.stuck_stop_dump, file=sys.stderr)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        from node.daemon import Daemon, Stopped  # heavy imports (torch, hivemind) once the flags are good

        try:
            daemon = Daemon.create(config, stop)
        except Stopped:
            print("swarm-node: stopped during start-up", file=sys.stderr, flush=True)
            _exit_now(0)
        try:
            print(f"swarm-node: peer {daemon.peer_id} hosts stage(s) {','.join(map(str, daemon.stages))} of "
                  f"swarm '{config.swarm.id}'", flush=True)
            print(f"swarm-node: gRPC {daemon.endpoint}  metrics {daemon.metrics_url}", flush=True)
            for maddr in daemon.maddrs:
                print(f"swarm-node: join with --initial-peers {maddr}", flush=True)
            daemon.run()
        finally:
            daemon.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if daemon.relaunch is not None:  # a new role (node/roles/choice.py): the same command line, its flags last
        flags = daemon.relaunch.args()
        print(f"swarm-node: restarting with {' '.join(flags)}", file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "node", *sys.argv[1:], *flags])
    print("swarm-node: stopped", file=sys.stderr, flush=True)
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Exit without waiting for threads: everything the node started is stopped by now, and a library thread
    still blocked in a call (a peer that froze mid-RPC, a hung DHT request) must not hold the process."""
    stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
             and t.is_alive()]
    if stuck:
        logging.getLogger(__name__).info("not waiting for threads %s", ", ".join(sorted(set(stuck))))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
