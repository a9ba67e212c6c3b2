"""Load only one stage's tensors from an HF `LlamaForCausalLM` safetensors checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lm.stage import PipelineStage


def _shard_of_each_tensor(checkpoint_dir: Path) -> dict[str, Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: checkpoint_dir / shard for name, shard in weight_map.items()}
    single = checkpoint_dir / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json; "
                         f"save the checkpoint with safe_serialization=True")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_stage_weights(stage: PipelineStage, checkpoint_dir: Path) -> None:
    """Copy this stage's slice of the checkpoint into `stage`, reading no other tensor.

    With tied embeddings the checkpoint has no `lm_head.weight`; the embedding is used instead.
    """
    where = _shard_of_each_tensor(checkpoint_dir)
    wanted = stage.checkpoint_names()
    if "lm_head.weight" in wanted and "lm_head.weight" not in where:
        wanted = {**wanted, "lm_head.weight": "model.embed_tokens.weight"}
    missing = sorted(src for src in wanted.values() if src not in where)
    if missing:
        raise ValueError(f"{checkpoint_dir}: missing tensors for stage {stage.stage}: {', '.join(missing[:3])}")
    by_shard: dict[Path, list[tuple[str, str]]] = {}
    for dst, src in wanted.items():
        by_shard.setdefault(where[src], []).append((dst, src))
    params = stage.state_dict()
    with torch.no_grad():
        for shard, names in by_shard.items():
            with safe_open(shard, framework="pt") as f:
                for dst, src in names:
                    tensor = f.get_tensor(src)
                    if tensor.shape != params[dst].shape:
                        raise ValueError(f"{checkpoint_dir}: {src} has shape {tuple(tensor.shape)}, "
                                         f"stage expects {tuple(params[dst].shape)}")
                    params[dst].copy_(tensor)
