"""Tensors on the wire: raw little-endian bytes in C order, streamed in chunks.

Encoding shares memory with the tensor where it can; the only copies are the ones gRPC makes
and one join on the receiving side.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
import torch

from protocol.errors import ProtocolError, invalid
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of a CPU copy of `tensor` (works for bfloat16, which numpy lacks)."""
    flat = tensor.detach().to("cpu").contiguous().view(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def encode_chunks(envelope: pb.Envelope, tensor: torch.Tensor, limits: WireLimits) -> Iterator[pb.TensorChunk]:
    """The chunk stream for one tensor: the first chunk carries the envelope and metadata."""
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent")
    data = tensor_bytes(tensor)
    meta = pb.TensorMeta(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), codec="raw", nbytes=len(data))
    step = limits.chunk_bytes
    yield pb.TensorChunk(envelope=envelope, meta=meta, data=bytes(data[:step]))
    for start in range(step, len(data), step):
        yield pb.TensorChunk(data=bytes(data[start:start + step]))


def check_meta(meta: pb.TensorMeta, limits: WireLimits) -> None:
    if meta.codec != "raw":
        raise invalid(f"unknown codec {meta.codec!r}; this node speaks 'raw'")
    if meta.dtype not in DTYPES:
        raise invalid(f"unknown dtype {meta.dtype!r}")
    if not 0 < len(meta.shape) <= limits.max_dims or any(d <= 0 for d in meta.shape):
        raise invalid(f"bad shape {list(meta.shape)}")
    expected = torch.Size(meta.shape).numel() * DTYPES[meta.dtype].itemsize
    if meta.nbytes != expected:
        raise invalid(f"nbytes {meta.nbytes} does not match shape {list(meta.shape)} of {meta.dtype} ({expected})")
    if meta.nbytes > limits.max_tensor_bytes:
        raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"tensor of {meta.nbytes} bytes exceeds the limit of {limits.max_tensor_bytes}")


def decode_stream(chunks: Iterable[pb.TensorChunk], limits: WireLimits) -> tuple[pb.Envelope, torch.Tensor]:
    """Reassemble a chunk stream into (envelope, tensor), enforcing the limits as bytes arrive."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise invalid("empty stream: the first chunk must carry the envelope and tensor metadata")
    if not first.HasField("envelope") or not first.HasField("meta"):
        raise invalid("the first chunk must carry the envelope and tensor metadata")
    check_meta(first.meta, limits)
    buf = bytearray(first.meta.nbytes)
    filled = 0
    for chunk in _chain(first, it):
        end = filled + len(chunk.data)
        if end > len(buf):
            raise invalid(f"stream carries more than the {len(buf)} bytes its metadata announced")
        buf[filled:end] = chunk.data
        filled = end
    if filled != len(buf):
        raise invalid(f"stream ended after {filled} of {len(buf)} bytes")
    tensor = torch.frombuffer(buf, dtype=DTYPES[first.meta.dtype]).view(tuple(first.meta.shape))
    return first.envelope, tensor


def _chain(first: pb.TensorChunk, rest: Iterator[pb.TensorChunk]) -> Iterator[pb.TensorChunk]:
    yield first
    yield from rest
