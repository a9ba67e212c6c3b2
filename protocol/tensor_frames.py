"""Tensors on the wire: a codec's payload (protocol/codecs.py), streamed as `TensorChunk` messages.

Frames are serialised `TensorChunk`s, byte-compatible with any protobuf implementation, but built and
read by hand around the `data` field: the sender copies the tensor's bytes once into each frame, and
the receiver copies them once into the tensor, instead of the three and four copies that going
through protobuf message objects costs (bench/results/transport*.md). Envelope and metadata, a few
hundred bytes, still go through protobuf.

The receiver checks the metadata against the codec (known codec, dtype, block size, and `nbytes` equal
to the exact payload size that codec, shape and dtype give) before it allocates anything, so a lying
header costs nothing; sizes are Python integers, so no product of dimensions can overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch
from google.protobuf.message import DecodeError

from protocol.codecs import CodecError, Layout, get_codec
from protocol.errors import ProtocolError, invalid
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# TensorChunk field numbers (proto/swarm/v1/stage.proto).
_ENVELOPE, _META, _DATA = 1, 2, 3
_LENGTH_DELIMITED = 2


class BodyCheck(Protocol):
    def update(self, piece: memoryview) -> None: ...

    def finish(self) -> None: ...


# Private swarms (protocol/rpc_auth.py): the sender tags a message from its envelope, metadata and encoded
# bytes; the receiver checks the tag's header before reading any tensor bytes, then the bytes as they arrive.
FrameSigner = Callable[[pb.Envelope, pb.TensorMeta, memoryview], bytes]
FrameCheck = Callable[[pb.Envelope, pb.TensorMeta], BodyCheck]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of a CPU copy of `tensor` (works for bfloat16, which numpy lacks)."""
    flat = tensor.detach().to("cpu").contiguous().view(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def encode_frames(envelope: pb.Envelope, tensor: torch.Tensor, limits: WireLimits, sign: FrameSigner | None = None,
                  codec: str = "raw", layout: Layout | None = None) -> Iterator[bytes]:
    """Serialised TensorChunks for one tensor encoded with `codec`: the first carries the envelope (tagged by
    `sign`) and metadata.

    Encodes at once (a tensor the codec refuses raises CodecError here, not inside gRPC's request thread);
    the frames are cut lazily from the payload.
    """
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent")
    chosen = get_codec(codec)
    layout = chosen.layout_for(tuple(tensor.shape)) if layout is None else layout
    chosen.check(tensor.dtype, tuple(tensor.shape), layout)
    data = memoryview(chosen.encode(tensor, layout).numpy())
    meta = pb.TensorMeta(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), codec=codec, nbytes=len(data),
                         block_size=layout.block_size, rank=layout.rank)
    if sign is not None:
        tagged = pb.Envelope()
        tagged.CopyFrom(envelope)
        tagged.auth = sign(envelope, meta, data)
        envelope = tagged
    return _frames(pb.TensorChunk(envelope=envelope, meta=meta).SerializeToString(), data, limits.chunk_bytes)


def _frames(header: bytes, data: memoryview, step: int) -> Iterator[bytes]:
    for start in range(0, max(len(data), 1), step):
        piece = data[start:start + step]
        yield b"".join((header if start == 0 else b"", _tag(_DATA), _varint(len(piece)), piece))


def check_meta(meta: pb.TensorMeta, limits: WireLimits) -> None:
    """Everything about the announced tensor that can be checked before its bytes arrive."""
    try:
        codec = get_codec(meta.codec)
    except CodecError as e:
        raise invalid(str(e)) from None
    if meta.dtype not in DTYPES:
        raise invalid(f"unknown dtype {meta.dtype!r}")
    if not 0 < len(meta.shape) <= limits.max_dims or any(d <= 0 for d in meta.shape):
        raise invalid(f"bad shape {list(meta.shape)}")
    dtype = DTYPES[meta.dtype]
    try:
        codec.check(dtype, tuple(meta.shape), Layout(meta.block_size, meta.rank))
    except CodecError as e:
        raise invalid(str(e)) from None
    numel = math.prod(meta.shape)  # a Python integer: no overflow, however large the header's dimensions
    decoded = numel * dtype.itemsize
    if max(decoded, meta.nbytes) > limits.max_tensor_bytes:
        raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"tensor of {max(decoded, meta.nbytes)} bytes exceeds the limit of "
                            f"{limits.max_tensor_bytes}")
    expected = codec.wire_bytes(tuple(meta.shape), dtype.itemsize, Layout(meta.block_size, meta.rank))
    if meta.nbytes != expected:
        raise invalid(f"nbytes {meta.nbytes} does not match shape {list(meta.shape)} of {meta.dtype} in codec "
                      f"{meta.codec!r} ({expected})")


@dataclass(frozen=True)
class Received:
    envelope: pb.Envelope
    tensor: torch.Tensor  # decoded, on the requested device
    codec: str
    wire_bytes: int  # payload bytes that crossed the network


def _sized(frame: bytes, limits: WireLimits) -> bytes:
    if len(frame) > limits.max_message_bytes:
        raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a chunk of {len(frame)} bytes exceeds the "
                            f"{limits.max_message_bytes}-byte message limit: send chunks of at most "
                            f"{limits.chunk_bytes} bytes")
    return frame


def receive_tensor(frames: Iterable[bytes], limits: WireLimits, check: FrameCheck | None = None,
                   device: torch.device | str = "cpu") -> Received:
    """Reassemble serialised TensorChunks and decode the tensor on `device`, enforcing the limits as bytes arrive.

    With `check`, the first chunk's envelope and metadata are authenticated before anything else, and
    every encoded byte is fed to the returned body check, which must pass before the tensor is decoded.
    """
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise invalid("empty stream: the first chunk must carry the envelope and tensor metadata")
    fields = _top_level_fields(_sized(first, limits))
    if _ENVELOPE not in fields or _META not in fields:
        raise invalid("the first chunk must carry the envelope and tensor metadata")
    try:
        envelope = pb.Envelope.FromString(fields[_ENVELOPE])
        meta = pb.TensorMeta.FromString(fields[_META])
    except DecodeError:
        raise invalid("the envelope or tensor metadata is not valid protobuf") from None
    body = check(envelope, meta) if check is not None else None
    check_meta(meta, limits)
    out = torch.empty(meta.nbytes, dtype=torch.uint8)  # no zero-fill: every byte is written below
    buf = memoryview(out.numpy())
    min_chunk = min(limits.min_chunk_bytes, limits.chunk_bytes)
    filled, chunks, max_chunks = 0, 0, meta.nbytes // min_chunk + 2
    while fields is not None:
        if chunks and (_ENVELOPE in fields or _META in fields):
            raise invalid("only the first chunk may carry an envelope or metadata")
        piece = fields.get(_DATA, memoryview(b""))
        chunks += 1
        if chunks > 1 and not piece:
            raise invalid("an empty chunk after the first: every chunk but the first must carry bytes")
        if chunks > max_chunks:
            raise invalid(f"more than {max_chunks} chunks for {meta.nbytes} bytes: chunks must be at least "
                          f"{min_chunk} bytes, but the last")
        end = filled + len(piece)
        if end > len(buf):
            raise invalid(f"stream carries more than the {len(buf)} bytes its metadata announced")
        buf[filled:end] = piece
        if body is not None:
            body.update(piece)
        filled = end
        frame = next(it, None)
        fields = None if frame is None else _top_level_fields(_sized(frame, limits))
    if filled != len(buf):
        raise invalid(f"stream ended after {filled} of {len(buf)} bytes")
    if body is not None:
        body.finish()
    try:
        tensor = get_codec(meta.codec).decode(out, tuple(meta.shape), DTYPES[meta.dtype],
                                              Layout(meta.block_size, meta.rank), torch.device(device))
    except CodecError as e:
        raise invalid(f"codec {meta.codec!r}: {e}") from None
    return Received(envelope, tensor, meta.codec, meta.nbytes)


def decode_frames(frames: Iterable[bytes], limits: WireLimits,
                  check: FrameCheck | None = None) -> tuple[pb.Envelope, torch.Tensor]:
    """(envelope, tensor) on the CPU; see `receive_tensor`."""
    received = receive_tensor(frames, limits, check)
    return received.envelope, received.tensor


def _tag(field: int) -> bytes:
    return _varint(field << 3 | _LENGTH_DELIMITED)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise invalid("malformed chunk: truncated varint")


def _top_level_fields(frame: bytes) -> dict[int, memoryview]:
    """The length-delimited fields of one serialised TensorChunk, as views (no copy); others are skipped."""
    buf = memoryview(frame)
    fields: dict[int, memoryview] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _LENGTH_DELIMITED:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise invalid("malformed chunk: a field runs past the end of the message")
            if field in fields:
                raise invalid(f"malformed chunk: field {field} appears twice")
            fields[field] = buf[pos:pos + size]
            pos += size
        elif wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type in (1, 5):  # fixed 64 and 32 bits
            pos += 8 if wire_type == 1 else 4
        else:
            raise invalid(f"malformed chunk: wire type {wire_type}")
    if pos != len(buf):
        raise invalid("malformed chunk: truncated")
    return fields
