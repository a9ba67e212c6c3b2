"""Smoke tests for bench/bench_transport.py: its gRPC column is protocol/ as committed, the report reads
right, and a tiny end-to-end run (whose first transfer on every transport is checksummed by the receiver)
leaves no process behind. The codec itself is tested in tests/protocol/test_frames.py."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from protocol.limits import WireLimits

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_transport.py"


@pytest.fixture(scope="module")
def bench():
    # On sys.path rather than loaded from a spec: spawned children inherit sys.path and re-import it by name.
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    return importlib.import_module("bench_transport")


def test_grpc_column_is_protocol_as_committed(bench):
    assert bench.bench_limits(None) == WireLimits()
    for name, chunk in bench.VARIANTS.items():
        assert bench.bench_limits(name) == WireLimits(chunk_bytes=chunk)
    # No codec of its own: the bench sends and receives through protocol/ only.
    source = BENCH.read_text()
    for used in ("stage_service_handler(", "StageStub(", "encode_frames(", "decode_frames(",
                 "channel_options(", "server_options("):
        assert used in source
    assert "SerializeToString" not in source and "FromString" not in source


def _stats(wall_s: float, cpu_s: float = 0.01) -> dict[str, list[float]]:
    return {"wall": [wall_s], "cpu_send": [cpu_s], "cpu_recv": [cpu_s]}


def test_report(bench):
    size = 16 * bench.MiB
    # gRPC 6x p2p and 40% of TCP: both targets met; auth at 85% of gRPC: met; the variant at 1.5x gRPC.
    results = {16: {"grpc": _stats(size / 800e6), "tcp": _stats(size / 2000e6), "p2p": _stats(size / (800e6 / 6)),
                    "grpc+auth": _stats(size / 680e6), "grpc+tls": _stats(size / 400e6),
                    "grpc:chunk-4m": _stats(size / 1200e6)}}
    report = bench.render(results, ["chunk-4m"], "python bench/bench_transport.py --variant chunk-4m", 1.0)
    assert "| 16 MiB | 800 | 680 | 400 | 2,000 | 133 | 6.0x | 40% | 85% | 50% |" in report
    assert "gRPC >= 5x hivemind p2p: met (6.0x); gRPC >= 35% of raw TCP: met (40%)" in report
    assert "gRPC + auth >= 80% of gRPC: met (85% (85%-85%))" in report  # one repeat: the interval is the point
    assert "| 16 MiB | `chunk-4m` | 1,200 | 1.50x |" in report
    assert "`WireLimits.chunk_bytes` = 4 MiB instead of 2 MiB" in report

    results = {16: {"grpc": _stats(size / 300e6), "tcp": _stats(size / 2000e6), "p2p": _stats(size / 100e6)}}
    report = bench.render(results, [], "python bench/bench_transport.py", 1.0)
    assert "gRPC >= 5x hivemind p2p: MISSED (3.0x); gRPC >= 35% of raw TCP: MISSED (15%)" in report
    assert "gRPC + auth >= 80% of gRPC: not run (n/a)" in report  # not measured: never "met"
    assert "Variants" not in report


def _group_members(pgids: set[int]) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) in pgids:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


@pytest.mark.slow
def test_tiny_run_leaves_nothing_behind(bench, monkeypatch):
    started = []
    original = bench.Children.start

    def start(self, *args):
        conn = original(self, *args)
        started.append(self.procs[-1][1].pid)
        return conn

    monkeypatch.setattr(bench.Children, "start", start)
    # The client raises (and run_bench with it) if any receiver's checksum of the first transfer differs.
    transports = ["grpc", "grpc+auth", "grpc+tls", "tcp", "p2p", "grpc:chunk-1m"]
    results = bench.run_bench([1], {1: 1}, warmup=1, transports=transports)
    assert set(results[1]) == set(transports)
    assert all(len(stats["wall"]) == 1 for stats in results[1].values())
    assert len(started) == 7  # six servers, one client
    assert _group_members(set(started)) == []  # no server, client or p2pd survives
    report = bench.render(results, ["chunk-1m"], "python bench/bench_transport.py", 1.0)
    assert "| 1 MiB |" in report and "grpc:chunk-1m" in report
