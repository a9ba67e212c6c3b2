"""Named LLaMA configurations and the layer split into pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaConfig

# Sizes follow common small-LLaMA shapes. vocab_size is replaced by the tokenizer's size at build time.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512),
    "llama-160m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, max_position_embeddings=2048),
    "llama-500m": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=20, num_attention_heads=20,
                       num_key_value_heads=20, max_position_embeddings=2048),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
}


@dataclass(frozen=True)
class ModelSpec:
    """What a node needs to build its stages: a config, and the checkpoint directory if any."""

    name: str
    config: LlamaConfig
    checkpoint_dir: Path | None = None


def resolve_model(model: str, vocab_size: int | None = None) -> ModelSpec:
    """Turn `--model tiny|llama-160m|...|<HF checkpoint dir>` into a ModelSpec.

    Presets get the tokenizer's vocabulary size; a checkpoint keeps its own config.
    """
    if model in PRESETS:
        fields = dict(PRESETS[model])
        rope_theta = fields.pop("rope_theta", 10000.0)
        config = LlamaConfig(vocab_size=vocab_size or 32000, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **fields)
        return ModelSpec(name=model, config=config)
    path = Path(model)
    if (path / "config.json").is_file():
        config = LlamaConfig.from_pretrained(path)
        if config.model_type != "llama":
            raise ValueError(f"--model {model}: checkpoint is a '{config.model_type}' model, expected 'llama'")
        return ModelSpec(name=str(path), config=config, checkpoint_dir=path)
    raise ValueError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) "
                     f"nor a directory with config.json")


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Split decoder layers into `num_stages` runs of consecutive layers, earlier stages taking the remainder."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages; "
                         f"use between 1 and {num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        size = base + (1 if s < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds
