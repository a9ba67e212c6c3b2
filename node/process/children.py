"""Child processes die with the daemon, and do not inherit its signal handling.

hivemind forks the DHT and each averager from the daemon, and the DHT process starts p2pd (Go, through
asyncio's subprocess, which runs no fork hooks). After a `kill -9` of the daemon they would be
reparented to init and live on. So every process forked from the daemon, at fork time:
- gets the default SIGINT and SIGTERM actions (not the daemon's stop handler, not hivemind's SIG_IGN);
- moves to its own process group, so a terminal's Ctrl-C reaches only the daemon, which then stops its
  children in order (a DHT process killed first would leave the daemon's last DHT writes hanging);
- starts a watchdog thread on the parent's pid: when the parent dies, it kills its own descendants
  (p2pd) and exits. A parent-death signal alone (PR_SET_PDEATHSIG) would kill the DHT process before it
  could take p2pd along.

hivemind shares its futures' state through torch tensors, by default with torch's "file_system" strategy,
which starts a torch_shm_manager process that outlived a killed daemon by 3.5 s or more. The daemon shares
them by file descriptor instead: no manager process at all (open descriptors stay flat over rounds).
"""

from __future__ import annotations

import os
import select
import signal
import threading
from pathlib import Path

import torch.multiprocessing

_installed = False


def die_with_parent() -> None:
    """Make every later fork of this process (and of its children) follow the rules above. Idempotent."""
    global _installed
    torch.multiprocessing.set_sharing_strategy("file_descriptor")
    if not _installed:
        os.register_at_fork(after_in_child=_in_child)
        _installed = True


def _in_child() -> None:
    parent = os.getppid()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.setpgid(0, 0)
    except OSError:  # already a group leader (never for a fresh fork), or not permitted: keep the group
        pass
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()


def _watch_parent(parent: int) -> None:
    try:
        fd = os.pidfd_open(parent)
    except OSError:  # the parent is already gone
        fd = None
    if fd is not None and os.getppid() == parent:
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has exited
        while not poller.poll():
            pass
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(1)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, children before grandchildren, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found
