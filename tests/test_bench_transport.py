"""Smoke tests for bench/bench_transport.py: the prototype codec is wire-identical to protocol/, and a tiny
end-to-end run leaves no process behind."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from protocol import tensor_codec
from protocol.envelope import HopSpec, make_envelope
from protocol.errors import ProtocolError
from protocol.limits import WireLimits

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_transport.py"


@pytest.fixture(scope="module")
def bench():
    # On sys.path rather than loaded from a spec: spawned children inherit sys.path and re-import it by name.
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    return importlib.import_module("bench_transport")


def _envelope():
    origin = HopSpec(0, "origin", "127.0.0.1:1")
    return make_envelope("bench", 3, 7, [origin, HopSpec(1, "r", "127.0.0.1:2"), origin], hop=1)


@pytest.mark.parametrize("numel,chunk", [(1, 64), (1000, 64), (4096, 4096), (5000, 4096), (300, 1 << 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_framing_matches_protobuf(bench, numel, chunk, dtype):
    limits = WireLimits(chunk_bytes=chunk)
    tensor = torch.randn(numel).to(dtype)
    real = [c.SerializeToString() for c in tensor_codec.encode_chunks(_envelope(), tensor, limits)]
    hand = list(bench.encode_chunks_hand(_envelope(), tensor, limits))
    assert hand == real

    env_real, t_real = tensor_codec.decode_stream(
        [tensor_codec.pb.TensorChunk.FromString(r) for r in real], limits)
    env_hand, t_hand = bench.decode_stream_hand(hand, limits)
    env_once, t_once = bench.decode_stream_once(
        [tensor_codec.pb.TensorChunk.FromString(r) for r in real], limits)
    assert env_hand == env_real == env_once
    assert torch.equal(t_hand, t_real) and torch.equal(t_once, t_real) and t_hand.dtype == dtype


def test_hand_decode_refuses_what_decode_stream_refuses(bench):
    limits = WireLimits(chunk_bytes=64)
    msgs = list(bench.encode_chunks_hand(_envelope(), torch.randn(100), limits))
    with pytest.raises(ProtocolError):
        bench.decode_stream_hand(msgs[:-1], limits)  # short
    with pytest.raises(ProtocolError):
        bench.decode_stream_hand(msgs + msgs[1:2], limits)  # long
    with pytest.raises(ProtocolError):
        bench.decode_stream_hand([msgs[0][:-3]], limits)  # truncated field
    with pytest.raises(ProtocolError):
        bench.decode_stream_hand(msgs[1:], limits)  # no header


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
    results = bench.run_bench([1], {1: 1}, warmup=1, transports=["grpc", "tcp", "p2p", "grpc:hand-framed"])
    assert set(results[1]) == {"grpc", "tcp", "p2p", "grpc:hand-framed"}
    assert all(len(stats["wall"]) == 1 for stats in results[1].values())
    assert len(started) == 5  # four servers, one client
    assert _group_members(set(started)) == []  # no server, client or p2pd survives
    report = bench.render(results, ["hand-framed"], "python bench/bench_transport.py", 1.0)
    assert "| 1 MiB |" in report and "grpc:hand-framed" in report
