"""Start a swarm of real `swarm-node run` processes on 127.0.0.1 and watch them through their event files.

Used by `swarm-node demo` and by the multi-node tests, so both exercise exactly what an operator runs.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.events import read_events


@dataclass
class NodeProcess:
    name: str
    stages: str
    workdir: Path
    process: subprocess.Popen | None = None

    @property
    def events_path(self) -> Path:
        return self.workdir / f"{self.name}.events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for e in read_events(self.events_path) if kind is None or e["event"] == kind]

    def started(self) -> dict | None:
        found = self.events("started")
        return found[0] if found else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


# Nodes started by a LocalSwarm of this process and not yet stopped with it: what `crashed` looks at.
_watched: list[NodeProcess] = []


def crashed() -> list[NodeProcess]:
    """Watched nodes that exited on their own with an error (a signal's exit, as a deliberate kill, is not one)."""
    return [n for n in _watched if n.process is not None and (n.process.poll() or 0) > 0]


@dataclass
class LocalSwarm:
    workdir: Path
    swarm: str
    common_args: list[str] = field(default_factory=list)
    nodes: list[NodeProcess] = field(default_factory=list)

    def start_node(self, name: str, stages: str, extra: list[str] | None = None,
                   initial_peers: list[str] | None = None, prefix: list[str] | None = None) -> NodeProcess:
        """`prefix`: a command the node runs under (a test runs one inside a network namespace)."""
        node = NodeProcess(name, stages, self.workdir)
        node.events_path.unlink(missing_ok=True)
        join = ["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"]
        cmd = [*(prefix or []), sys.executable, "-m", "node", "run", "--swarm", self.swarm, "--stages", stages,
               "--events-file", str(node.events_path), *join, *self.common_args, *(extra or [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with node.log_path.open("w") as log:
            node.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # our Ctrl-C is relayed, not broadcast
        self.nodes.append(node)
        _watched.append(node)
        return node

    def wait_started(self, nodes: list[NodeProcess], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in nodes:
                if not node.alive() and node.started() is None:
                    raise RuntimeError(f"node {node.name} exited during start-up; see {node.log_path}:\n"
                                       + tail(node.log_path))
            if all(node.started() for node in nodes):
                return
            time.sleep(0.2)
        raise TimeoutError(f"nodes did not start within {timeout:.0f}s; logs in {self.workdir}")

    def initial_peers(self) -> list[str]:
        for node in self.nodes:
            started = node.started()
            if started and node.alive():
                return started["maddrs"][:1]
        raise RuntimeError("no running node to join through")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every node (each withdraws from the DHT and stops its children), then SIGKILL stragglers."""
        _watched[:] = [n for n in _watched if n not in self.nodes]
        for node in self.nodes:
            if node.alive():
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait()


def free_port() -> int:
    """A free port for an endpoint that must be known before its node starts (link emulation files name nodes
    by endpoint). It lies below the kernel's ephemeral range, which every port-0 listener (p2pd) and every
    outgoing connection draws from, so none of them can take it before the node binds it."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for port in random.Random().sample(range(max(1024, low - 12_000), low), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""
