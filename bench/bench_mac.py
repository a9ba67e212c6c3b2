"""The keyed hashes a private swarm could MAC tensor frames with, timed over one 16 MiB tensor on this CPU.

    python bench/bench_mac.py [--mib 16] [--repeats 15]

Chose protocol/rpc_auth.py's frame MAC (keyed BLAKE3): every candidate is a MAC with >= 128-bit security
under a 256-bit key. Prints the median and the range of the repeats, in ms per tensor, all candidates
interleaved so that the shared cores' slow spells hit them alike. A second table times what the chosen MAC
adds to `encode_frames` (the sender tags) and `decode_frames` (the receiver checks) in one process.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import statistics
import sys
import time
from pathlib import Path

import blake3

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CANDIDATES = {
    "HMAC-SHA256 (tag v1)": lambda key, data: hmac.new(key, data, hashlib.sha256).digest(),
    "HMAC-SHA512": lambda key, data: hmac.new(key, data, hashlib.sha512).digest(),
    "keyed BLAKE2b": lambda key, data: hashlib.blake2b(data, key=key, digest_size=32).digest(),
    "keyed BLAKE2s": lambda key, data: hashlib.blake2s(data, key=key, digest_size=32).digest(),
    "keyed BLAKE3 (tag v2)": lambda key, data: blake3.blake3(data, key=key).digest(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    key, data = os.urandom(32), memoryview(os.urandom(args.mib << 20))
    times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for _ in range(args.repeats):
        for name, mac in CANDIDATES.items():
            start = time.perf_counter()
            mac(key, data)
            times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["HMAC-SHA256 (tag v1)"])
    print(f"| keyed hash | ms per {args.mib} MiB (median) | range | vs HMAC-SHA256 |\n|---|---:|---:|---:|")
    for name, xs in times.items():
        m = statistics.median(xs)
        print(f"| {name} | {m:.1f} | {min(xs):.1f}-{max(xs):.1f} | {m / base:.2f}x |")
    print()
    frames(args.mib, args.repeats)


def frames(mib: int, repeats: int) -> None:
    """encode_frames and decode_frames of one float32 tensor, with and without a private swarm's tag."""
    import torch

    from protocol.envelope import HopSpec, make_envelope
    from protocol.limits import WireLimits
    from protocol.rpc_auth import SwarmAuth
    from protocol.tensor_frames import decode_frames, encode_frames

    torch.set_num_threads(1)
    auth, limits = SwarmAuth(os.urandom(32)), WireLimits()
    tensor = torch.randn(mib * 256, 1024)
    origin = HopSpec(0, "origin", "127.0.0.1:1")
    envelope = make_envelope("bench", 0, 0, [origin, HopSpec(1, "receiver", "127.0.0.1:2"), origin], hop=1)
    signers = {"public": None, "private": lambda e, m, d: auth.sign_frames("Forward", e, m, d)}
    checks = {"public": None, "private": lambda e, m: auth.check_frames("Forward", e, m, "receiver")}
    times: dict[str, list[float]] = {f"{step} {kind}": [] for step in ("encode", "decode") for kind in signers}
    for _ in range(repeats):
        for kind in signers:
            start = time.perf_counter()
            sent = list(encode_frames(envelope, tensor, limits, signers[kind]))
            times[f"encode {kind}"].append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            decode_frames(iter(sent), limits, checks[kind])
            times[f"decode {kind}"].append((time.perf_counter() - start) * 1e3)
    print(f"| step | ms per {mib} MiB (median) | range |\n|---|---:|---:|")
    for name, xs in times.items():
        print(f"| {name} | {statistics.median(xs):.1f} | {min(xs):.1f}-{max(xs):.1f} |")


if __name__ == "__main__":
    main()
