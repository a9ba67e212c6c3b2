"""Keeps gRPC workers for honest work: caps streams per peer address and in total, and cancels silent ones.

The gRPC server runs each call on a worker thread. A stream that sends a header and then nothing
would hold its worker forever; so would a thousand of them. The guard

- refuses a new stream (RESOURCE_EXHAUSTED) when its address already has `per_peer` streams open, or
  when all but `reserve` workers are taken, so Ping, Info and health always find a worker;
- cancels a stream that has sent nothing for `idle_s` seconds (the client sees CANCELLED; the worker
  is free at once).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from node.config import DataPlaneConfig
from protocol.errors import ProtocolError


class _Watch:
    def __init__(self, context: grpc.ServicerContext, address: str):
        self.context = context
        self.address = address
        self.last = time.monotonic()
        self.cancelled = False

    def frames(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        for frame in frames:
            self.last = time.monotonic()
            yield frame
        if self.cancelled:
            raise ProtocolError(grpc.StatusCode.CANCELLED, "stream was idle too long")


class StreamGuard:
    def __init__(self, settings: DataPlaneConfig, recheck_s: float,
                 on_refused: Callable[[str], None] = lambda reason: None):
        """The server has `grpc_workers` threads, of which `stream_reserve` never go to streams (so unary calls
        and health always get one); one address may hold `streams_per_peer` streams; a stream silent for
        `stream_idle_timeout` seconds is cancelled, within `recheck_s`."""
        self.recheck_s = recheck_s
        self.workers, self.reserve = settings.grpc_workers, settings.stream_reserve
        self.per_peer, self.idle_s = settings.streams_per_peer, settings.stream_idle_timeout
        self.on_refused = on_refused
        self._open: set[_Watch] = set()
        self._per_address: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._cancel_idle, name="stream-guard", daemon=True)
        self._watchdog.start()

    @contextmanager
    def stream(self, context: grpc.ServicerContext):
        address = _address(context.peer())
        with self._lock:
            if len(self._open) >= self.workers - self.reserve:
                self.on_refused("busy")
                raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{len(self._open)} streams open; retry shortly")
            if self._per_address[address] >= self.per_peer:
                self.on_refused("per_peer")
                raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{address} has {self.per_peer} streams open, the most one peer may")
            watch = _Watch(context, address)
            self._open.add(watch)
            self._per_address[address] += 1
        try:
            yield watch
        finally:
            with self._lock:
                self._open.discard(watch)
                self._per_address[address] -= 1
                if not self._per_address[address]:
                    del self._per_address[address]

    def open_streams(self) -> int:
        return len(self._open)

    def close(self) -> None:
        self._stop.set()

    def _cancel_idle(self) -> None:
        while not self._stop.wait(min(self.recheck_s, self.idle_s)):
            now = time.monotonic()
            with self._lock:
                idle = [w for w in self._open if now - w.last > self.idle_s and not w.cancelled]
            for watch in idle:
                watch.cancelled = True
                self.on_refused("idle")
                watch.context.cancel()


def _address(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> 'ipv4:1.2.3.4' (the port changes per connection; the host does not)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
