"""Link emulation, a test and benchmark tool (off by default): delay and throttle every data-plane call as if
the two nodes sat in the regions a file gives them.

`tc netem` is not available on the machines this project runs on, so the caller does it, for both
directions of every call it makes (`EmulatedStub`): each message of a streamed request occupies the link to
the peer for bytes / bandwidth, and each message of a streamed answer the link back; concurrent streams queue
behind each other on a link, and the first message each way also waits the latency. A unary message (a
ping, a control message) waits the latency and its own bytes without queueing behind streams, as its packets
would interleave with theirs. So a Ping waits twice the latency, and Forward, Backward, FetchState,
FetchGradients and the control calls all pay for their bytes: the real messages each call carries (after
any codec).

File format (JSON), the benchmark instance format with an endpoint per node:

    {"nodes": [{"endpoint": "127.0.0.1:50051", "location": "Belgium"}, ...],
     "links": [{"a": "Belgium", "b": "Iowa", "latency_ms": 98.0, "bandwidth_GiBps": 0.013}, ...],
     "same_location_link": {"latency_ms": 1.0, "bandwidth_GiBps": 2.0}}

Nodes whose endpoint is not listed (and sends from such nodes) are not emulated.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

GIB = 1024**3


class EmulationError(ValueError):
    """A malformed emulation file; the message is one line."""


@dataclass(frozen=True)
class EmulatedLink:
    latency_s: float
    bandwidth_Bps: float


def _link(entry: object, where: str) -> EmulatedLink:
    if not isinstance(entry, dict):
        raise EmulationError(f"{where} must be an object with latency_ms and bandwidth_GiBps")
    lat, bw = entry.get("latency_ms"), entry.get("bandwidth_GiBps")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lat, bw)):
        raise EmulationError(f"{where} needs numeric latency_ms and bandwidth_GiBps")
    if lat < 0 or bw <= 0:
        raise EmulationError(f"{where}: latency_ms must be >= 0 and bandwidth_GiBps > 0")
    return EmulatedLink(lat / 1000, bw * GIB)


class LinkEmulator:
    def __init__(self, regions: dict[str, str], links: dict[frozenset, EmulatedLink], same: EmulatedLink | None):
        self.regions = regions  # endpoint -> region
        self.links = links  # {region a, region b} -> link
        self.same = same
        self.own_region: str | None = None
        self._free_at: dict[tuple[str, str], float] = {}  # (to/from, peer endpoint) -> when that link is free again
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path) -> "LinkEmulator":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise EmulationError(f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise EmulationError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: object, name: str = "emulation file") -> "LinkEmulator":
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) \
                or not isinstance(data.get("links"), list):
            raise EmulationError(f"{name} needs 'nodes' and 'links' lists")
        regions = {}
        for k, node in enumerate(data["nodes"]):
            if not isinstance(node, dict) or not isinstance(node.get("location"), str):
                raise EmulationError(f"{name}: nodes[{k}] needs a 'location'")
            if isinstance(node.get("endpoint"), str):
                regions[node["endpoint"]] = node["location"]
        if not regions:
            raise EmulationError(f"{name}: no node has an 'endpoint' (host:port), so no link can be emulated")
        links = {}
        for k, entry in enumerate(data["links"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("a"), str) or not isinstance(entry.get("b"), str):
                raise EmulationError(f"{name}: links[{k}] needs region names 'a' and 'b'")
            links[frozenset((entry["a"], entry["b"]))] = _link(entry, f"{name}: links[{k}]")
        same = data.get("same_location_link")
        emulator = cls(regions, links, None if same is None else _link(same, f"{name}: same_location_link"))
        for a in set(regions.values()):
            for b in set(regions.values()):
                if emulator._between(a, b) is None:
                    raise EmulationError(f"{name}: no link between regions '{a}' and '{b}'")
        return emulator

    def bind(self, own_endpoint: str) -> None:
        """This node's endpoint, known once gRPC is serving."""
        self.own_region = self.regions.get(own_endpoint)

    def _between(self, a: str, b: str) -> EmulatedLink | None:
        return self.same if a == b else self.links.get(frozenset((a, b)))

    def link_to(self, endpoint: str) -> EmulatedLink | None:
        other = self.regions.get(endpoint)
        if self.own_region is None or other is None:
            return None
        return self._between(self.own_region, other)

    def frames(self, endpoint: str, frames: Iterable, direction: str = "to") -> Iterator:
        """`frames` (bytes or protobuf messages) as they would cross the emulated link: to `endpoint`, or from it."""
        link = self.link_to(endpoint)
        first = True
        for frame in frames:
            if link is not None:
                with self._lock:
                    start = max(time.monotonic(), self._free_at.get((direction, endpoint), 0.0))
                    done = start + _size(frame) / link.bandwidth_Bps
                    self._free_at[(direction, endpoint)] = done
                _sleep_until(done + (link.latency_s if first else 0.0))
            first = False
            yield frame

    def message(self, endpoint: str, message, direction: str) -> None:
        """One message of a unary call (a ping, a control message) crossing the link: the latency and its own
        bytes, without queueing behind bulk transfers (its packets interleave with theirs on a real link)."""
        link = self.link_to(endpoint)
        if link is not None:
            time.sleep(link.latency_s + _size(message) / link.bandwidth_Bps)


def _size(frame) -> int:
    return len(frame) if isinstance(frame, bytes) else frame.ByteSize()


class EmulatedStub:
    """A service stub whose every call pays the emulated link to `endpoint` both ways (module docstring)."""

    def __init__(self, stub: object, service: ServiceDescriptor, emulator: LinkEmulator, endpoint: str):
        for method in service.methods:
            setattr(self, method.name, _emulated(getattr(stub, method.name), method, emulator, endpoint))


def _emulated(call: Callable, method: MethodDescriptor, emulator: LinkEmulator, endpoint: str) -> Callable:
    def invoke(request, *args, **kwargs):
        if method.client_streaming:
            request = emulator.frames(endpoint, request, "to")
        else:
            emulator.message(endpoint, request, "to")
        answer = call(request, *args, **kwargs)
        if method.server_streaming:
            return emulator.frames(endpoint, answer, "from")
        emulator.message(endpoint, answer, "from")
        return answer
    return invoke


def _sleep_until(when: float) -> None:
    left = when - time.monotonic()
    if left > 0:
        time.sleep(left)


def place_endpoints(instance: dict, endpoints: list[str]) -> dict:
    """An emulation spec from a benchmark instance without endpoints: endpoint i sits in the region of the
    instance's node i (round-robin when there are more endpoints than nodes)."""
    nodes = instance.get("nodes") if isinstance(instance, dict) else None
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, dict) and "location" in n for n in nodes):
        raise EmulationError("the instance needs a 'nodes' list whose entries have a 'location'")
    spec = {"nodes": [{"endpoint": e, "location": nodes[i % len(nodes)]["location"]} for i, e in enumerate(endpoints)],
            "links": instance.get("links"), "same_location_link": instance.get("same_location_link")}
    LinkEmulator.from_dict(spec, "instance")  # refuse it now, with the reason, if it is malformed
    return spec
