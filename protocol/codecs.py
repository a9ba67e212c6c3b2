"""Tensor codecs: how an activation or gradient becomes the bytes of `TensorChunk.data`, and back.

| codec     | payload                                                   | bytes/element, float32 in  | error per element               |
|-----------|-----------------------------------------------------------|----------------------------|---------------------------------|
| `raw`     | the tensor's own bytes, little-endian, C order            | itemsize (4)               | none                            |
| `bf16`    | bfloat16 values                                           | 2                          | <= |x| * 2^-8 (+5e-41)          |
| `int8`    | blockwise absmax: float32 scales, then int8 codes         | 1 + 4/block (block 64)     | <= absmax(block) / 254 (*)      |
| `int4`    | the same with 4-bit codes in [-7, 7], packed              | 1/2 + 4/block (block 128)  | <= absmax(block) / 14           |
| `lowrank` | rank-r projection of the rows, then a 2-bit residual      | 1/4 + 4/block + ~1.06r/H   | <= absmax(residual block) / 2   |

(*) and blocks whose absmax is below qmax * 1.2e-38 (float32's smallest normal scale) decode as zeros.

Blockwise layout (`TensorMeta.block_size`; the same text is in proto/swarm/v1/stage.proto): the tensor is
flattened in C order and cut into `ceil(numel / block)` blocks of `block_size` elements, the last one
zero-padded. The payload is every block's scale (`absmax / qmax`, float32 little-endian), then the codes.
A code c in [-qmax, qmax] is stored unsigned as c + qmax; 8-bit codes take a byte each, narrower codes
are packed 8 to a group of `bits` bytes (code i in bits [i*bits, (i+1)*bits) of the group's little-endian
integer), over `ceil(numel / 8) * 8` codes. A value decodes as code * scale, cast to the announced dtype.

`lowrank` (`TensorMeta.rank` = r) views the tensor as N rows of H = shape[-1] elements. It finds an
orthonormal basis W (H x r) of the rows' top-r subspace by two steps of subspace iteration from a fixed
seed, and sends W (bfloat16), the coefficients C = X W (N x r, blockwise int8 in blocks of 64), and the
residual X - C W^T (blockwise 2-bit codes in [-1, 1], in blocks of `block_size`). It decodes as C W^T +
residual. Hidden states are nearly low-rank (bench/results/compression.md), so the residual, and its error,
is small. (A 3-bit residual sends a third more bytes, and its loss in the benchmark was no better, within
the seeds' spread. Gradients are not low-rank: `lowrank` is for activations, `int4` for gradients.)

Lossy codecs refuse NaN and infinity at encode time (CodecError): a block's absmax would be meaningless.
`raw` and `bf16` carry them unchanged (bf16 also rounds finite values above 3.39e38 to infinity).
Encode and decode are a few vectorised torch ops on the tensor's device (no Python loop over elements or
blocks); only the payload is copied to or from the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from protocol.codec_names import CODEC_NAMES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MIN_BLOCK, MAX_BLOCK = 8, 1 << 16  # a block holds whole packing groups of 8 codes
MAX_RANK = 64
_TINY = torch.finfo(torch.float32).tiny


class CodecError(ValueError):
    """A tensor or a header that a codec cannot take; the message says why."""


@dataclass(frozen=True)
class Layout:
    """A codec's parameters, as carried in TensorMeta: 0 where the codec has none."""

    block_size: int = 0
    rank: int = 0


@dataclass(frozen=True)
class Codec:
    """`raw`: the tensor's bytes. Subclasses override the four methods below."""

    name: str
    default: Layout = Layout()

    def layout_for(self, shape: tuple[int, ...]) -> Layout:
        """The parameters a sender uses for a tensor of `shape`."""
        return self.default

    def check(self, dtype: torch.dtype, shape: tuple[int, ...], layout: Layout) -> None:
        """Refuse parameters this codec cannot carry (CodecError), before any payload is read."""
        if layout != Layout():
            raise CodecError(f"codec {self.name!r} takes no block_size or rank")

    def wire_bytes(self, shape: tuple[int, ...], itemsize: int, layout: Layout) -> int:
        """Exact payload size. Python integers: a lying header cannot overflow it."""
        return math.prod(shape) * itemsize

    def encode(self, tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The payload as a flat uint8 CPU tensor."""
        return _cpu_bytes(tensor)

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, layout: Layout,
               device: torch.device) -> torch.Tensor:
        return payload.to(device).view(dtype).view(shape)


@dataclass(frozen=True)
class Bf16Codec(Codec):
    def check(self, dtype: torch.dtype, shape: tuple[int, ...], layout: Layout) -> None:
        super().check(dtype, shape, layout)
        _require_float(self.name, dtype)

    def wire_bytes(self, shape: tuple[int, ...], itemsize: int, layout: Layout) -> int:
        return math.prod(shape) * 2

    def encode(self, tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
        _require_float(self.name, tensor.dtype)
        return _cpu_bytes(tensor.detach().to(torch.bfloat16))

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, layout: Layout,
               device: torch.device) -> torch.Tensor:
        return payload.to(device).view(torch.bfloat16).to(dtype).view(shape)


@dataclass(frozen=True)
class BlockwiseCodec(Codec):
    """Symmetric absmax quantization with one float32 scale per block of `block_size` elements."""

    bits: int = 8
    default: Layout = Layout(block_size=64)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def check(self, dtype: torch.dtype, shape: tuple[int, ...], layout: Layout) -> None:
        _require_float(self.name, dtype)
        _check_block(self.name, layout)
        if layout.rank:
            raise CodecError(f"codec {self.name!r} takes no rank")

    def wire_bytes(self, shape: tuple[int, ...], itemsize: int, layout: Layout) -> int:
        numel = math.prod(shape)
        codes = numel if self.bits == 8 else -(-numel // 8) * self.bits
        return 4 * -(-numel // layout.block_size) + codes

    def encode(self, tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
        _require_float(self.name, tensor.dtype)
        return self.quantize(tensor.detach().reshape(-1).to(torch.float32), layout.block_size).cpu()

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, layout: Layout,
               device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        return self.dequantize(payload.to(device), numel, layout.block_size).to(dtype).view(shape)

    def quantize(self, flat: torch.Tensor, block: int) -> torch.Tensor:
        """float32 values (1-D, on any device) -> payload (uint8, same device)."""
        numel = flat.numel()
        blocks = -(-numel // block)
        if blocks * block != numel:
            flat = torch.nn.functional.pad(flat, (0, blocks * block - numel))
        x = flat.view(blocks, block)
        absmax = x.abs().amax(dim=1)  # NaN propagates through amax: one check on the scales covers every value
        if not bool(torch.isfinite(absmax).all()):
            raise CodecError(f"codec {self.name!r} cannot encode NaN or infinity; use raw or bf16")
        scales = absmax / self.qmax
        # Blocks of zeros, or of values so small (absmax < qmax * 1.2e-38) that 1/scale overflows, encode as zeros.
        inverse = torch.where(scales >= _TINY, 1 / scales, torch.zeros_like(scales))
        codes = torch.mul(x, inverse[:, None]).round_().clamp_(-self.qmax, self.qmax).add_(self.qmax)
        codes = codes.view(-1).to(torch.uint8)
        packed = codes[:numel] if self.bits == 8 else _pack(codes[:-(-numel // 8) * 8], self.bits)
        return torch.cat([scales.view(torch.uint8), packed])

    def dequantize(self, payload: torch.Tensor, numel: int, block: int) -> torch.Tensor:
        blocks = -(-numel // block)
        if payload.storage_offset() % 4:  # a slice of a larger payload: float32 views need aligned storage
            payload = payload.clone()
        scales = payload[:4 * blocks].view(torch.float32)
        if not bool(torch.isfinite(scales).all()):
            raise CodecError("block scales must be finite")
        packed = payload[4 * blocks:]
        codes = packed if self.bits == 8 else _unpack(packed, self.bits)
        values = torch.empty(blocks * block, dtype=torch.float32, device=payload.device)
        values[:codes.numel()] = codes  # one pass: uint8 -> float32; the padding is never read back
        values = values.view(blocks, block).sub_(self.qmax).mul_(scales[:, None])
        return values.view(-1)[:numel]


_INT8 = BlockwiseCodec("int8", bits=8)
_INT2 = BlockwiseCodec("int2", bits=2)  # ternary codes: lowrank's residual
_COEFF_BLOCK = 64  # lowrank's coefficients: int8 blocks of this many values


@dataclass(frozen=True)
class LowRankCodec(Codec):
    """Top-r row subspace (bf16 basis, int8 coefficients) plus a blockwise low-bit residual."""

    default: Layout = Layout(block_size=128, rank=4)
    iterations: int = 2
    residual: BlockwiseCodec = _INT2

    def layout_for(self, shape: tuple[int, ...]) -> Layout:
        return Layout(self.default.block_size, min(self.default.rank, shape[-1]))

    def check(self, dtype: torch.dtype, shape: tuple[int, ...], layout: Layout) -> None:
        _require_float(self.name, dtype)
        _check_block(self.name, layout)
        if not 1 <= layout.rank <= min(MAX_RANK, shape[-1]):
            raise CodecError(f"codec {self.name!r}: rank {layout.rank} must be between 1 and "
                             f"min({MAX_RANK}, last dimension {shape[-1]})")

    def wire_bytes(self, shape: tuple[int, ...], itemsize: int, layout: Layout) -> int:
        hidden, rank = shape[-1], layout.rank
        rows = math.prod(shape) // hidden
        return (2 * hidden * rank + _INT8.wire_bytes((rows * rank,), 4, Layout(_COEFF_BLOCK))
                + self.residual.wire_bytes(shape, 4, layout))

    def encode(self, tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
        _require_float(self.name, tensor.dtype)
        x = tensor.detach().reshape(-1, tensor.shape[-1]).to(torch.float32)
        if not bool(torch.isfinite(x).all()):  # the subspace iteration would spread a NaN everywhere
            raise CodecError(f"codec {self.name!r} cannot encode NaN or infinity; use raw or bf16")
        basis = self._basis(x, layout.rank).to(torch.bfloat16)
        coefficients = _INT8.quantize((x @ basis.float()).view(-1), _COEFF_BLOCK)
        rows = x.shape[0]
        low = _INT8.dequantize(coefficients, rows * layout.rank, _COEFF_BLOCK).view(rows, -1) @ basis.float().T
        residual = self.residual.quantize((x - low).view(-1), layout.block_size)
        return torch.cat([basis.contiguous().view(-1).view(torch.uint8), coefficients, residual]).cpu()

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, layout: Layout,
               device: torch.device) -> torch.Tensor:
        hidden, rank = shape[-1], layout.rank
        rows = math.prod(shape) // hidden
        payload = payload.to(device)
        split = 2 * hidden * rank
        coeff_end = split + _INT8.wire_bytes((rows * rank,), 4, Layout(_COEFF_BLOCK))
        basis = payload[:split].view(torch.bfloat16).float().view(hidden, rank)
        if not bool(torch.isfinite(basis).all()):
            raise CodecError("the basis must be finite")
        coefficients = _INT8.dequantize(payload[split:coeff_end], rows * rank, _COEFF_BLOCK).view(rows, rank)
        residual = self.residual.dequantize(payload[coeff_end:], rows * hidden, layout.block_size).view(rows, hidden)
        return torch.addmm(residual, coefficients, basis.T).to(dtype).view(shape)

    def _basis(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """An orthonormal H x r basis of the rows' dominant subspace (deterministic: a fixed-seed start)."""
        absmax = x.abs().max()
        x = x / torch.where(absmax > 0, absmax, 1.0)  # scale-free: no overflow for huge or underflow for tiny values
        gen = torch.Generator(device=x.device).manual_seed(0)
        basis = torch.randn(x.shape[1], rank, generator=gen, device=x.device)
        for _ in range(self.iterations):
            basis, _ = torch.linalg.qr(x.T @ (x @ basis))
        return basis


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2**bits (a multiple of 8 of them) -> `bits` bytes per group of 8 codes."""
    if bits == 4:  # the same layout, two codes a byte, without wide integers
        pairs = codes.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    groups = codes.view(-1, 8).to(torch.int32)  # 8 codes of <= 3 bits fit in 24 bits
    words = (groups << torch.arange(0, 8 * bits, bits, device=codes.device, dtype=torch.int32)).sum(1, dtype=torch.int32)
    shifts = torch.arange(0, 8 * bits, 8, device=codes.device, dtype=torch.int32)
    return ((words[:, None] >> shifts) & 0xFF).to(torch.uint8).view(-1)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        return torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1)
    groups = packed.view(-1, bits).to(torch.int32)
    words = (groups << torch.arange(0, 8 * bits, 8, device=packed.device, dtype=torch.int32)).sum(1, dtype=torch.int32)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int32)
    return ((words[:, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).view(-1)


def _cpu_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)


def _require_float(name: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise CodecError(f"codec {name!r} carries floating-point tensors, not {str(dtype).removeprefix('torch.')}")


def _check_block(name: str, layout: Layout) -> None:
    if not MIN_BLOCK <= layout.block_size <= MAX_BLOCK or layout.block_size % 8:
        raise CodecError(f"codec {name!r}: block_size {layout.block_size} must be a multiple of 8 "
                         f"between {MIN_BLOCK} and {MAX_BLOCK}")


CODECS: dict[str, Codec] = {
    "raw": Codec("raw"),
    "bf16": Bf16Codec("bf16"),
    "int8": _INT8,
    "int4": BlockwiseCodec("int4", bits=4, default=Layout(block_size=128)),
    "lowrank": LowRankCodec("lowrank"),
}
assert tuple(CODECS) == CODEC_NAMES, "protocol/codec_names.py lists the codecs of CODECS, in order"


def get_codec(name: str) -> Codec:
    """The codec called `name`; CodecError names the codecs this node speaks."""
    codec = CODECS.get(name)
    if codec is None:
        raise CodecError(f"unknown codec {name!r}; this node speaks {', '.join(CODECS)}")
    return codec


def wire_bytes(name: str, shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes a tensor of `shape` takes on the wire with codec `name` and a sender's default parameters."""
    codec = get_codec(name)
    return codec.wire_bytes(shape, itemsize, codec.layout_for(shape))
