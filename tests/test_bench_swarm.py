"""bench/bench_swarm.py is a harness other benches import: its pieces work without starting a swarm."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from node.dataplane.link_emulation import LinkEmulator
from tests.helpers import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_swarm", REPO / "bench" / "bench_swarm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_emulation_places_endpoints_in_the_instance_regions(tmp_path):
    bench = _bench()
    endpoints = [f"127.0.0.1:{4000 + i}" for i in range(8)]
    path = bench.emulation_file(tmp_path / "links.json", endpoints)
    emulator = LinkEmulator.load(path)
    instance = json.loads(bench.INSTANCE.read_text())
    assert [emulator.regions[e] for e in endpoints] == [n["location"] for n in instance["nodes"][:8]]
    emulator.bind(endpoints[0])
    link = next(lk for lk in instance["links"] if {lk["a"], lk["b"]} == {emulator.regions[endpoints[0]],
                                                                        emulator.regions[endpoints[1]]})
    assert emulator.link_to(endpoints[1]).latency_s == link["latency_ms"] / 1000
    slowed = LinkEmulator.load(bench.emulation_file(tmp_path / "slow.json", endpoints, slowdown=12))
    slowed.bind(endpoints[0])
    assert slowed.link_to(endpoints[1]).bandwidth_Bps * 12 == pytest.approx(emulator.link_to(endpoints[1]).bandwidth_Bps)
    assert slowed.link_to(endpoints[1]).latency_s == emulator.link_to(endpoints[1]).latency_s
    assert bench.half_of_nonzero_stages(6) == {2, 4} and bench.half_of_nonzero_stages(4) == {2}
