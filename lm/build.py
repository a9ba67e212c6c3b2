"""Build a stage from a ModelSpec: seeded random init for presets, sliced weights for checkpoints."""

from __future__ import annotations

import torch

from lm.checkpoint import load_stage_weights
from lm.presets import ModelSpec, stage_layers
from lm.stage import PipelineStage


def build_stage(spec: ModelSpec, stage: int, num_stages: int, seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PipelineStage:
    layers = stage_layers(spec.config.num_hidden_layers, num_stages)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} does not exist; this swarm has stages 0..{num_stages - 1}")
    module = PipelineStage(spec.config, stage, layers[stage])
    if spec.checkpoint_dir is not None:
        load_stage_weights(module, spec.checkpoint_dir)
    else:
        module.reset_parameters(seed)
    return module.to(device=device, dtype=dtype)


def stage_parameters(spec: ModelSpec, num_stages: int) -> list[int]:
    """Parameters of each stage, counted on the meta device: the real modules' shapes without their memory."""
    layers = stage_layers(spec.config.num_hidden_layers, num_stages)
    with torch.device("meta"):
        return [sum(p.numel() for p in PipelineStage(spec.config, s, layers[s]).parameters())
                for s in range(num_stages)]


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; an unavailable device is a clear error, not a crash later."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu or cuda[:i]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this host; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only auto, cpu and cuda[:i] are supported")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on CPU, where half precision is slow and imprecise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
