"""Score an ensemble of experts on domains: posterior mixture, uniform prior, top-k, best single expert.

The prior of each target domain is estimated on its **dev** split and scored on its **test** split
(estimating it on the scored split itself leaks the answer). Priors are cached in a JSON file keyed by
the domain's dev tokens and the experts' weight hashes, so re-scoring skips the dev passes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from experts.domains import Domain
from experts.manifest import Manifest
from experts.mixture import estimate_prior, mixture_logprobs, perplexity, uniform_log_prior


@dataclass
class EvalSettings:
    seq_len: int = 128
    dev_windows: int = 100  # HDEE/BTM estimate the prior from about 100 sequences
    test_windows: int = 64
    top_k: int = 2
    batch_size: int = 16
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32


@dataclass
class DomainResult:
    domain: str
    held_out: bool
    ppl: dict[str, float]  # variant -> test perplexity
    prior: list[float]
    best_single: str  # the expert chosen on dev


@torch.no_grad()
def token_logprobs(model: LlamaForCausalLM, windows: torch.Tensor, settings: EvalSettings) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1 of every window: [N, T-1], float32 on CPU."""
    model.eval()
    device = torch.device(settings.device)
    out = []
    for chunk in windows.split(settings.batch_size):
        x = chunk.to(device)
        with torch.autocast(device.type, dtype=settings.dtype, enabled=settings.dtype != torch.float32):
            logits = model(input_ids=x).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
        out.append(logp.cpu())
    return torch.cat(out)


def stream_perplexity(model: LlamaForCausalLM, windows: torch.Tensor, settings: EvalSettings) -> float:
    return perplexity(token_logprobs(model, windows, settings))


def reference_difficulty(model: LlamaForCausalLM, domains: list[Domain], settings: EvalSettings) -> dict[str, float]:
    """Each domain's dev cross-entropy under a reference model (the shared seed), in bits per token.

    With the byte tokenizer this is bits per byte, on the same scale as the compression measure.
    """
    return {d.name: math.log2(stream_perplexity(model, d.dev.windows(settings.seq_len, settings.dev_windows),
                                                settings))
            for d in domains}


class PriorCache:
    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = json.loads(path.read_text()) if path and path.is_file() else {}

    @staticmethod
    def key(domain: Domain, expert_ids: list[str], settings: EvalSettings) -> str:
        dev = domain.dev.windows(settings.seq_len, settings.dev_windows)
        digest = hashlib.sha256(dev.numpy().tobytes())
        digest.update(json.dumps([domain.name, expert_ids]).encode())
        return digest.hexdigest()

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")


def evaluate_ensemble(experts: list[tuple[Manifest, LlamaForCausalLM]], domains: list[Domain],
                      settings: EvalSettings, cache: PriorCache | None = None) -> list[DomainResult]:
    cache = cache or PriorCache(None)
    ids = [m.weights_sha256 for m, _ in experts]
    results = []
    for domain in domains:
        key = PriorCache.key(domain, ids, settings)
        if key not in cache.entries:
            dev = domain.dev.windows(settings.seq_len, settings.dev_windows)
            if len(dev) == 0:
                raise ValueError(f"domain {domain.name}: dev split is shorter than one {settings.seq_len}-token window")
            dev_logp = torch.stack([token_logprobs(model, dev, settings) for _, model in experts])
            cache.put(key, {"domain": domain.name, "prior": estimate_prior(dev_logp).tolist(),
                            "dev_ppl": [perplexity(lp) for lp in dev_logp]})
        entry = cache.entries[key]
        test = domain.test.windows(settings.seq_len, settings.test_windows)
        if len(test) == 0:
            raise ValueError(f"domain {domain.name}: test split is shorter than one {settings.seq_len}-token window")
        logp = torch.stack([token_logprobs(model, test, settings) for _, model in experts])
        log_prior = torch.tensor(entry["prior"]).log()
        best = min(range(len(experts)), key=lambda j: entry["dev_ppl"][j])
        ppl = {"posterior": perplexity(mixture_logprobs(logp, log_prior)),
               "uniform": perplexity(mixture_logprobs(logp, uniform_log_prior(len(experts)))),
               f"top{settings.top_k}": perplexity(mixture_logprobs(logp, log_prior, top_k=settings.top_k)),
               "best-single": perplexity(logp[best])}
        results.append(DomainResult(domain.name, domain.held_out, ppl, entry["prior"], experts[best][0].domain))
    return results


def results_table(results: list[DomainResult]) -> str:
    variants = list(results[0].ppl)
    lines = [f"{'domain':<14} {'kind':<9} " + " ".join(f"{v:>11}" for v in variants) + "  best single"]
    for r in results:
        kind = "held-out" if r.held_out else "in-domain"
        lines.append(f"{r.domain:<14} {kind:<9} " + " ".join(f"{r.ppl[v]:>11.3f}" for v in variants)
                     + f"  {r.best_single}")
    return "\n".join(lines)


def write_csv(results: list[DomainResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["domain", "held_out", "variant", "perplexity", "best_single"])
        for r in results:
            for variant, ppl in r.ppl.items():
                w.writerow([r.domain, int(r.held_out), variant, f"{ppl:.4f}", r.best_single])
