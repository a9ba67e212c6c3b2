"""Each codec round-trips random and adversarial tensors within its stated bound (protocol/codecs.py),
and a receiver checks a codec's header before it allocates anything."""

import grpc
import pytest
import torch

from protocol.codecs import CODECS, CodecError, Layout, get_codec
from protocol.envelope import HopSpec, make_envelope
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits
from protocol.tensor_frames import decode_frames, encode_frames, receive_tensor

PATH = [HopSpec(0, "a", "h:1"), HopSpec(1, "b", "h:2"), HopSpec(0, "a", "h:1")]
CPU = torch.device("cpu")
SHAPES = [(1,), (7,), (3, 5), (2, 17, 64), (4, 64, 64), (3, 1, 130), (1, 9, 8, 3)]  # odd and non-multiple sizes


def round_trip(name: str, x: torch.Tensor, layout: Layout | None = None) -> tuple[torch.Tensor, int]:
    codec = get_codec(name)
    layout = codec.layout_for(tuple(x.shape)) if layout is None else layout
    payload = codec.encode(x, layout)
    assert payload.dtype == torch.uint8 and payload.device.type == "cpu"
    assert payload.numel() == codec.wire_bytes(tuple(x.shape), x.element_size(), layout)
    out = codec.decode(payload, tuple(x.shape), x.dtype, layout, CPU)
    assert out.shape == x.shape and out.dtype == x.dtype
    return out, payload.numel()


def blockwise_bound(x: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """Per-element bound absmax(block) / (2 qmax), plus float32 rounding."""
    flat = x.reshape(-1).float()
    pad = torch.nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    bound = (pad.abs().amax(1, keepdim=True) / (2 * qmax)).expand_as(pad).reshape(-1)[:flat.numel()]
    return (bound * (1 + 1e-5) + flat.abs() * 1e-6 + 2e-36).view(x.shape)


def cases():
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        yield torch.randn(shape, generator=gen)
    yield torch.zeros(5, 64)
    yield torch.randn(4, 64, generator=gen) * 3e37  # huge, but finite after scaling
    yield torch.randn(4, 64, generator=gen) * 1e-30  # tiny
    yield torch.cat([torch.full((64,), 1e-39), torch.ones(64)])  # a block too small for a float32 scale
    spiky = torch.randn(8, 64, generator=gen)
    spiky[:, 3] = 1e4  # an outlier channel
    yield spiky


@pytest.mark.parametrize("name", list(CODECS))
def test_round_trip_within_the_stated_bound(name):
    for x in cases():
        out, nbytes = round_trip(name, x)
        if name == "raw":
            assert torch.equal(out, x)
        elif name == "bf16":
            assert torch.all((out - x).abs() <= x.abs() * 2 ** -8 + 1e-40)  # + half a bf16 subnormal step
        elif name in ("int8", "int4"):
            qmax, block = (127, 64) if name == "int8" else (7, 128)
            assert torch.all((out - x).abs() <= blockwise_bound(x, block, qmax)), name
        else:  # lowrank: the 2-bit residual's bound, relative to the tensor's absmax
            assert torch.all((out - x).abs() <= x.abs().max() / 2 * 1.01 + 1e-37)
        if not x.any():
            assert not out.any()  # zeros stay exactly zero


def test_bytes_per_element():
    x = torch.randn(4, 64, 64)
    sizes = {name: round_trip(name, x)[1] for name in CODECS}
    assert sizes["raw"] == x.numel() * 4 and sizes["bf16"] == x.numel() * 2
    assert sizes["int8"] == x.numel() + 4 * x.numel() // 64
    assert sizes["int4"] == x.numel() // 2 + 4 * x.numel() // 128
    assert sizes["raw"] / sizes["lowrank"] > 10


def test_lowrank_recovers_a_low_rank_tensor_almost_exactly():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, generator=gen) @ torch.randn(3, 64, generator=gen) * 5 + 0.01 * torch.randn(256, 64)
    out, _ = round_trip("lowrank", x)
    assert (out - x).norm() / x.norm() < 0.01
    int4, _ = round_trip("int4", x)
    assert (out - x).norm() < (int4 - x).norm() / 5


def test_lowerprecision_dtypes_and_explicit_layouts():
    x = torch.randn(3, 40, 32)
    for dtype in (torch.bfloat16, torch.float16):
        for name in ("bf16", "int8", "int4", "lowrank"):
            out, _ = round_trip(name, x.to(dtype))
            assert (out.float() - x).abs().max() < 3
    out, nbytes = round_trip("int8", x, Layout(block_size=8))
    assert nbytes == x.numel() + 4 * x.numel() // 8
    out, _ = round_trip("lowrank", x, Layout(block_size=256, rank=32))  # full rank: only rounding is left
    assert (out - x).abs().max() < 0.05


@pytest.mark.parametrize("name", ["int8", "int4", "lowrank"])
def test_lossy_codecs_refuse_nan_and_infinity(name):
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(3, 64)
        x[1, 7] = bad
        with pytest.raises(CodecError, match="NaN or infinity"):
            get_codec(name).encode(x, get_codec(name).layout_for(tuple(x.shape)))


def test_raw_and_bf16_carry_nan_and_infinity_unchanged():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]])
    for name in ("raw", "bf16"):
        out, _ = round_trip(name, x)
        assert out[0, 0].isnan() and out[0, 1] == float("inf") and out[0, 2] == -float("inf") and out[0, 3] == 1


def test_codecs_refuse_what_they_cannot_carry():
    with pytest.raises(CodecError, match="floating-point"):
        get_codec("int8").encode(torch.arange(10), Layout(64))
    with pytest.raises(CodecError, match="unknown codec 'zstd'; this node speaks raw, bf16, int8, int4, lowrank"):
        get_codec("zstd")


@pytest.mark.parametrize("name", list(CODECS))
def test_frames_round_trip_across_chunks(name):
    limits = WireLimits(chunk_bytes=1000)
    x = torch.randn(2, 33, 64)
    frames = list(encode_frames(make_envelope("s", 2, 5, PATH, 1), x, limits, codec=name))
    received = receive_tensor(frames, limits)
    expected, nbytes = round_trip(name, x)
    assert received.codec == name and received.wire_bytes == nbytes
    assert len(frames) == -(-nbytes // 1000)
    assert torch.equal(received.tensor, expected)


def _refusal(meta: pb.TensorMeta, data: bytes = b"", limits: WireLimits = WireLimits()) -> ProtocolError:
    chunk = pb.TensorChunk(envelope=make_envelope("s", 0, 0, PATH, 1), meta=meta, data=data)
    with pytest.raises(ProtocolError) as e:
        decode_frames([chunk.SerializeToString()], limits)
    return e.value


def test_headers_are_checked_against_the_codec_before_any_allocation():
    cases = [
        (dict(codec="zstd", nbytes=4), "unknown codec 'zstd'; this node speaks raw, bf16, int8, int4, lowrank"),
        (dict(codec="int8", nbytes=4 + 64), "block_size 0 must be a multiple of 8"),
        (dict(codec="int8", nbytes=4 + 64, block_size=12), "block_size 12"),
        (dict(codec="raw", nbytes=256, block_size=64), "takes no block_size"),
        (dict(codec="int4", nbytes=40, block_size=64), "does not match"),
        (dict(codec="int8", nbytes=64, dtype="int64", block_size=64), "floating-point"),
        (dict(codec="lowrank", nbytes=100, block_size=64, rank=65), "rank 65"),
        (dict(codec="lowrank", nbytes=100, block_size=64, rank=0), "rank 0"),
    ]
    for fields, reason in cases:
        meta = pb.TensorMeta(**{"dtype": "float32", "shape": [1, 64], **fields})
        error = _refusal(meta)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and reason in error.reason, (fields, error)
    # Dimensions whose product overflows 64 bits, with a small nbytes: refused, nothing allocated.
    huge = pb.TensorMeta(dtype="float32", shape=[1 << 40, 1 << 40, 1 << 40], codec="int4", nbytes=64, block_size=64)
    assert _refusal(huge).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A blockwise payload whose scales are not finite decodes to nothing.
    meta = pb.TensorMeta(dtype="float32", shape=[8], codec="int8", nbytes=12, block_size=8)
    error = _refusal(meta, data=torch.tensor([float("inf")]).view(torch.uint8).numpy().tobytes() + bytes(8))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in error.reason
