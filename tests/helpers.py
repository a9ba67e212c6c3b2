"""Helpers for tests that start real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from node.process.children import descendants as process_descendants

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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def node(swarm, name: str):
    """The LocalSwarm node started under `name`."""
    return next(n for n in swarm.nodes if n.name == name)


def rounds(n) -> dict[int, dict]:
    """A node's round events by round number."""
    return {e["round"]: e for e in n.events("round")}
