"""Two TCP connections joined into one: bytes copied both ways, under a rate limit shared by every splice."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

CHUNK = 256 * 1024  # one recv; a gRPC hop of 16 MiB crosses in 64 of them


class RateLimit:
    """A token bucket of `rate` bytes per second (0: no limit); `take` sleeps off what was overdrawn."""

    def __init__(self, rate: float, burst_s: float = 0.05):
        self.rate = rate
        self.burst = max(rate * burst_s, CHUNK)
        self._tokens = self.burst
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int, stop: threading.Event) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - nbytes
            self._at = now
            debt = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if debt:
            stop.wait(debt)


def tuned(sock: socket.socket) -> socket.socket:
    """No Nagle delay: gRPC's small frames (pings, headers, acks) cross the splice at once."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Splice:
    """Copies `a` <-> `b` on two threads. When one side closes, the other is told (half-close); when either
    breaks, or `close` is called, both close. `on_bytes(n)` counts what crossed, both ways."""

    def __init__(self, a: socket.socket, b: socket.socket, limit: RateLimit,
                 on_bytes: Callable[[int], None] = lambda n: None, on_closed: Callable[["Splice"], None] = lambda s: None):
        self.a, self.b = tuned(a), tuned(b)
        self.limit = limit
        self.on_bytes = on_bytes
        self.on_closed = on_closed
        self._closed = threading.Event()
        self._running = 2
        self._lock = threading.Lock()
        for src, dst in ((a, b), (b, a)):
            threading.Thread(target=self._pump, args=(src, dst), name="splice", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        broken = False
        try:
            while not self._closed.is_set():
                data = src.recv(CHUNK)
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # pass the end on; the other direction may still carry bytes
                    break
                self.limit.take(len(data), self._closed)
                dst.sendall(data)
                self.on_bytes(len(data))
        except OSError:
            broken = True
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if broken or last:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        close_quietly(self.a)
        close_quietly(self.b)
        self.on_closed(self)
