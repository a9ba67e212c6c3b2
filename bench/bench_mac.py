"""The keyed hashes a private swarm could MAC tensor frames with, timed over one 16 MiB tensor on this CPU.

    python bench/bench_mac.py [--mib 16] [--repeats 15]

Chose protocol/rpc_auth.py's frame MAC (keyed BLAKE3): every candidate is a MAC with >= 128-bit security
under a 256-bit key. Prints the median and the range of the repeats, in ms per tensor, all candidates
interleaved so that the shared cores' slow spells hit them alike.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import statistics
import time

import blake3

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


if __name__ == "__main__":
    main()
