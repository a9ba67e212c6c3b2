"""Link emulation, a test and benchmark tool (off by default): delay and throttle each data-plane send as if
the two nodes sat in the regions a file gives them.

`tc netem` is not available on the machines this project runs on, so the sender does it: each frame of a
Forward or Backward occupies the (sender region, receiver region) link for bytes / bandwidth, frames of
concurrent sends to one receiver queue behind each other, and the first frame also waits the latency.
A Ping waits twice the latency. The bytes are the real frames each send carries (after any codec).

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
        self._free_at: dict[str, float] = {}  # receiver endpoint -> when our link to it is free again
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

    def frames(self, endpoint: str, frames: Iterable[bytes]) -> Iterator[bytes]:
        """`frames` as they would leave over the emulated link to `endpoint`."""
        link = self.link_to(endpoint)
        first = True
        for frame in frames:
            if link is not None:
                with self._lock:
                    start = max(time.monotonic(), self._free_at.get(endpoint, 0.0))
                    done = start + len(frame) / link.bandwidth_Bps
                    self._free_at[endpoint] = done
                _sleep_until(done + (link.latency_s if first else 0.0))
            first = False
            yield frame

    def ping_delay(self, endpoint: str) -> None:
        link = self.link_to(endpoint)
        if link is not None:
            time.sleep(2 * link.latency_s)


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
