"""A checkpoint directory: config.json, model.safetensors, manifest.json, and trainer.pt while resumable.

config.json + model.safetensors use HF names, so `lm.presets.resolve_model(dir)` and
`LlamaForCausalLM.from_pretrained(dir)` read an expert like any LLaMA checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from experts.manifest import ChecksumError, Manifest, sha256_file

WEIGHTS, MANIFEST, TRAINER = "model.safetensors", "manifest.json", "trainer.pt"


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the seed makes every node's copy identical."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_checkpoint(model: LlamaForCausalLM, out_dir: Path, trainer_state: dict,
                    manifest_of: Callable[[str], Manifest]) -> Manifest:
    """Write config.json, model.safetensors (fp32, CPU), trainer.pt and manifest.json (`manifest_of(weights
    sha256)`). Every file is written and hashed under a temporary name first, then the three are renamed into
    place one after the other: a kill during the (long) writes leaves the previous checkpoint whole, and only
    one landing between three renames could leave a mix (an earlier order, weights first, left the weights
    newer than the manifest whenever a kill landed while the optimizer state was being written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights, trainer, manifest_file = (out_dir / (name + ".tmp") for name in (WEIGHTS, TRAINER, MANIFEST))
    save_file(state, weights, metadata={"format": "pt"})
    sha = sha256_file(weights)
    torch.save({**trainer_state, "weights_sha256": sha}, trainer)
    manifest = manifest_of(sha)
    manifest_file.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    for tmp, name in ((weights, WEIGHTS), (trainer, TRAINER), (manifest_file, MANIFEST)):
        os.replace(tmp, out_dir / name)
    return manifest


def read_manifest(ckpt_dir: Path) -> Manifest:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{ckpt_dir}: no {MANIFEST}; is this an expert checkpoint directory?")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from e
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def verify(ckpt_dir: Path, manifest: Manifest) -> None:
    path = Path(ckpt_dir) / WEIGHTS
    if not path.is_file():
        raise ValueError(f"{ckpt_dir}: no {WEIGHTS}")
    actual = sha256_file(path)
    if actual != manifest.weights_sha256:
        raise ChecksumError(f"{path}: sha256 {actual[:16]}... does not match the manifest's "
                            f"{manifest.weights_sha256[:16]}...; the file is corrupt or was replaced")


def load_weights(model: LlamaForCausalLM, ckpt_dir: Path) -> None:
    try:
        state = load_file(Path(ckpt_dir) / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{ckpt_dir}/{WEIGHTS}: unreadable ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt_dir}: weights do not fit the model config ({str(e).splitlines()[0]})") from e


def load_expert(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[LlamaForCausalLM, Manifest]:
    """Read the manifest, refuse weights whose sha256 differs, and build the model (fp32 on `device`)."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    verify(ckpt_dir, manifest)
    model = LlamaForCausalLM(LlamaConfig.from_dict(manifest.config))
    load_weights(model, ckpt_dir)
    return model.to(device), manifest
