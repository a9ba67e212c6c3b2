"""Explicit wire limits. A message that breaks one is refused with a status that names the limit."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class WireLimits:
    chunk_bytes: int = 2 * MiB  # tensors above this travel as several chunks (2 MiB measured best; bench/)
    max_tensor_bytes: int = 512 * MiB  # one activation or gradient, all chunks together
    max_path_hops: int = 256
    max_dims: int = 8
    # A stream may carry at most nbytes // min_chunk_bytes + 2 chunks, so a million 1-byte chunks (or an
    # endless run of empty ones) is refused after a few instead of read for minutes.
    min_chunk_bytes: int = 64 * 1024

    @property
    def max_message_bytes(self) -> int:
        """The largest frame a receiver takes: one chunk plus room for the envelope. The receiver checks it
        itself (`receive_tensor`), so the refusal names the limit and is counted."""
        return self.chunk_bytes + MiB

    @property
    def grpc_message_bytes(self) -> int:
        """gRPC's own per-message cap, a backstop at twice ours: it bounds what one frame can make a receiver
        buffer, and refuses (RESOURCE_EXHAUSTED) by itself what is larger still."""
        return 2 * self.max_message_bytes
