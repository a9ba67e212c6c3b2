"""One pipeline stage, assembled from transformers' LLaMA modules.

Stage 0 owns the token embedding, its own decoder layers, the final norm, the LM head and the loss.
Stages 1..S-1 own a run of consecutive decoder layers. Parameter names follow the HF checkpoint
(`layers.<global index>...` for `model.layers.<global index>...`), so a stage can load its slice directly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


class PipelineStage(nn.Module):
    def __init__(self, config: LlamaConfig, stage: int, layer_ids: range):
        super().__init__()
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"
        self.config = config
        self.stage = stage
        self.layer_ids = layer_ids
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(config, layer_idx=i) for i in layer_ids})
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        if stage == 0:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def is_data_stage(self) -> bool:
        return self.stage == 0

    def reset_parameters(self, seed: int) -> None:
        """Seeded init in the HF LLaMA style, so every replica of a stage starts identical."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + self.stage)
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                elif isinstance(module, LlamaRMSNorm):
                    module.weight.fill_(1.0)

    def checkpoint_names(self) -> dict[str, str]:
        """This stage's parameter names mapped to the names in an HF `LlamaForCausalLM` checkpoint."""
        return {name: name if name.startswith("lm_head.") else f"model.{name}"
                for name in self.state_dict() if not name.startswith("rotary_emb.")}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run this stage's decoder layers over full causal sequences of shape [batch, seq, hidden]."""
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers.values():
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy, computed exactly as `LlamaForCausalLM` does."""
        return ForCausalLMLoss(logits.float(), labels, vocab_size=self.config.vocab_size)
