"""Sample text from the posterior mixture of experts.

At each position the experts are weighted by their posterior given the text so far (uniform prior, then
each expert's likelihood of the prompt and of what was generated), exactly as `mixture.py` scores text;
the next token is drawn from sum_j w_j p_j.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from lm.tokenizer import Tokenizer


@torch.no_grad()
def generate(models: list[LlamaForCausalLM], tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
             temperature: float = 0.8, seed: int = 0) -> str:
    if not models:
        raise ValueError("no experts to generate with")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    context = min(m.config.max_position_embeddings for m in models)
    generator = torch.Generator().manual_seed(seed)
    for m in models:
        m.eval()
    tokens = torch.tensor([ids])
    log_weights = torch.full((len(models),), -torch.log(torch.tensor(float(len(models)))).item())
    # the posterior after the prompt: each expert's log-likelihood of the prompt's tokens
    logps = [torch.log_softmax(m(input_ids=tokens[:, -context:]).logits[0].float(), dim=-1) for m in models]
    for j, lp in enumerate(logps):
        log_weights[j] += lp[:-1].gather(-1, tokens[0, tokens.shape[1] - lp.shape[0] + 1:, None]).sum()
    for _ in range(max_new_tokens):
        next_logp = torch.stack([lp[-1] for lp in logps])  # [E, V]
        mixed = torch.logsumexp(torch.log_softmax(log_weights, 0)[:, None] + next_logp, dim=0)
        if temperature <= 0:
            token = int(mixed.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(mixed / temperature, -1), 1, generator=generator))
        log_weights += next_logp[:, token]
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        logps = [torch.log_softmax(m(input_ids=tokens[:, -context:]).logits[0].float(), dim=-1) for m in models]
    return tokenizer.decode(tokens[0, len(ids):].tolist())
