"""The whole model from its stages: perplexity with stages omitted, and HF `LlamaForCausalLM` checkpoints.

A checkpoint directory holds `config.json`, one safetensors shard per stage (`model-stage-<s>.safetensors`)
and `model.safetensors.index.json`. The index is computed from the config alone, so each node of a swarm can
write its own stage's shard and the same index; once every shard is there, `transformers` loads the
directory as it is, and `swarm-node run --model DIR` slices it again.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from lm.data import TokenStream
from lm.presets import stage_layers
from lm.stage import PipelineStage

INDEX = "model.safetensors.index.json"


def shard_name(stage: int) -> str:
    return f"model-stage-{stage}.safetensors"


@torch.no_grad()
def perplexity(stages: dict[int, PipelineStage], tokens: TokenStream, seq_len: int, omit: set[int] = frozenset(),
               batch_size: int = 8, max_sequences: int | None = None) -> float:
    """exp(mean next-token loss) over consecutive windows, running stage 0 then the kept stages in order."""
    if 0 in omit:
        raise ValueError("stage 0 (embedding, head and loss) cannot be omitted")
    windows = tokens.windows(seq_len, max_sequences)
    if len(windows) == 0:
        raise ValueError(f"held-out text has fewer than {seq_len} tokens")
    first = stages[0]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(first.embed_tokens.weight.device)
        hidden = first(first.embed(ids))
        for s in sorted(stages):
            if s != 0 and s not in omit:
                hidden = stages[s](hidden)
        loss = first.loss(first.logits(hidden), ids)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += loss.item() * n
        count += n
    return math.exp(total / count)


def save_stage_shard(stage: PipelineStage, config: LlamaConfig, num_stages: int, out_dir: str | Path) -> None:
    """Write this stage's tensors under their HF names, plus config.json and the index (atomic renames)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = stage.state_dict()
    tensors = {hf: state[name].detach().to("cpu", torch.float32).contiguous()
               for name, hf in stage.checkpoint_names().items()}
    _atomic(out / shard_name(stage.stage), lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    weight_map = {}
    for s, layers in enumerate(stage_layers(config.num_hidden_layers, num_stages)):
        with torch.device("meta"):
            names = PipelineStage(config, s, layers).checkpoint_names().values()
        weight_map.update({hf: shard_name(s) for hf in names})
    index = {"metadata": {"num_stages": num_stages}, "weight_map": dict(sorted(weight_map.items()))}
    _atomic(out / INDEX, lambda p: p.write_text(json.dumps(index, indent=1)))
    hf_config = config.to_dict() | {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    _atomic(out / "config.json", lambda p: p.write_text(json.dumps(hf_config, indent=1)))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def missing_shards(out_dir: str | Path) -> list[str]:
    """Shards the index names that are not written yet (empty: transformers can load the directory)."""
    out = Path(out_dir)
    index = json.loads((out / INDEX).read_text())
    return sorted({f for f in index["weight_map"].values() if not (out / f).is_file()})
