"""A stage's state (parameters, optimizer moments, step counts) as one safetensors blob."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator

import torch
from safetensors.torch import load, save

from protocol.generated.swarm.v1 import stage_pb2 as pb


def encode_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], round_: int,
                 chunk_bytes: int) -> Iterator[pb.StateChunk]:
    blob = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    for start in range(0, max(len(blob), 1), chunk_bytes):
        yield pb.StateChunk(round=round_, data=blob[start:start + chunk_bytes])


def decode_state(chunks: Iterable[pb.StateChunk]) -> tuple[int, dict[str, torch.Tensor], dict[str, str]]:
    """Returns (round, tensors, metadata)."""
    round_, parts = -1, []
    for chunk in chunks:
        round_ = chunk.round
        parts.append(chunk.data)
    blob = b"".join(parts)
    tensors = load(blob)
    metadata = _metadata(blob)
    return round_, tensors, metadata


def _metadata(blob: bytes) -> dict[str, str]:
    # safetensors keeps string metadata in its JSON header: 8-byte little-endian length, then the header.
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    return header.get("__metadata__", {})
