"""The model a node trains, resolved from its settings before anything starts: a bad --model, --device,
--dtype, --tokenizer or --num-stages is a usage error, reported before the DHT is joined."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lm.build import resolve_device, resolve_dtype, stage_parameters
from lm.presets import ModelSpec, resolve_model, stage_layers
from lm.tokenizer import load_tokenizer
from node.config import DataConfig, NodeConfig
from node.errors import UsageError


@dataclass(frozen=True)
class ModelSetup:
    spec: ModelSpec
    tokenizer: Any  # lm.tokenizer's byte tokenizer or an HF tokenizer
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, config: NodeConfig) -> "ModelSetup":
        device = usage(resolve_device, config.model.device)
        dtype = usage(resolve_dtype, config.model.dtype, device)
        tokenizer = usage(load_tokenizer, config.model.tokenizer or None)
        spec: ModelSpec = usage(resolve_model, config.model.name, tokenizer.vocab_size)
        if spec.config.vocab_size < tokenizer.vocab_size:
            raise UsageError(f"--model {config.model.name} has a vocabulary of {spec.config.vocab_size}, smaller than "
                             f"the tokenizer's {tokenizer.vocab_size}; give the matching --tokenizer")
        usage(stage_layers, spec.config.num_hidden_layers, config.model.num_stages)
        return cls(spec, tokenizer, device, dtype)

    def activation_shape(self, data: DataConfig) -> tuple[int, int, int]:
        """[batch, seq, hidden] of one microbatch's activations."""
        return data.batch_size, data.seq_len, self.spec.config.hidden_size

    def activation_bytes(self, data: DataConfig) -> int:
        batch, seq, hidden = self.activation_shape(data)
        return batch * seq * hidden * self.dtype.itemsize

    def gradient_bytes(self, num_stages: int) -> list[int]:
        """Per stage, the bytes of its gradients in float32, as the every-round sync flattens them."""
        return [4 * count for count in stage_parameters(self.spec, num_stages)]


def usage(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a set-up step whose ValueErrors are the user's to fix."""
    try:
        return fn(*args)
    except ValueError as e:
        raise UsageError(str(e)) from None
