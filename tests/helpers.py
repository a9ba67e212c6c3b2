"""Helpers for tests that start real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from node.process.children import descendants as process_descendants
from node.process.local_swarm import crashed

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`swarm-node ARGS` in a fresh interpreter, as an operator would run it."""
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, read from /proc."""
    return set(process_descendants(pid))


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll `condition` until it holds; fails at once, with its log's end, when a node of a running LocalSwarm
    exits with an error meanwhile (nothing it waits for may come then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for n in crashed():
            tail = "".join(n.log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise AssertionError(f"node {n.name} exited with code {n.process.returncode} while waiting for {what}; "
                                 f"its log ends:\n{tail}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def node(swarm, name: str):
    """The LocalSwarm node started under `name`."""
    return next(n for n in swarm.nodes if n.name == name)


def rounds(n) -> dict[int, dict]:
    """A node's round events by round number."""
    return {e["round"]: e for e in n.events("round")}


def free_port() -> int:
    """A loopback TCP port that nothing listens on (free when asked: bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a node's /metrics ----------------------------------------------------------------------------------------

def metrics_text(url: str, timeout: float = 5) -> str:
    """The Prometheus text that a /metrics URL serves."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics URL, by name with labels as written: `name{label="value"}`."""
    samples = {}
    for line in metrics_text(url).splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def sample(n, name: str) -> float | None:
    """One sample of a LocalSwarm node, by its exact name with labels; None where the node exports none."""
    return scrape(n.started()["metrics_url"]).get(name)


def metric(n, prefix: str, timeout: float = 5) -> float:
    """The sum of a LocalSwarm node's samples whose line starts with `prefix` (a name, or a name and labels)."""
    text = metrics_text(n.started()["metrics_url"], timeout=timeout)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and not line.startswith("#"))


def metric_sums(n) -> dict[str, float]:
    """A LocalSwarm node's samples, by sample name (as prometheus_client parses it), summed over labels."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text(n.started()["metrics_url"])):
        for point in family.samples:
            values[point.name] = values.get(point.name, 0.0) + point.value
    return values
