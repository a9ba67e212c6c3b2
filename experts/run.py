"""Training orchestration: the one place that turns a seed, a domain and a plan into a trained expert.

`swarm-node experts train` (a whole ensemble on one host) and the node's expert role (one domain at a
time, chosen from the swarm's catalogue) both call `train_expert`, so branching, naming, resuming and the
manifest's lineage are the same wherever an expert comes from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from experts.branch import branch
from experts.checkpoint import MANIFEST
from experts.domains import Domain, Domains
from experts.manifest import Manifest
from experts.sizing import ExpertPlan, Plan
from experts.train import Identity, TrainConfig, TrainHooks, TrainResult, train
from lm.data import TokenStream


@dataclass(frozen=True)
class ExpertSettings:
    """Hyper-parameters shared by every expert (and the seed) of one run."""

    batch_size: int = 8  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # AdamW peak learning rate
    save_every: int = 100  # checkpoint every N steps (0: only at the end)
    device: str = "cpu"
    dtype: str = "float32"  # autocast compute dtype; master weights stay fp32

    def train_config(self, steps: int, seed: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr, seed=seed,
                           device=self.device, dtype=self.dtype, save_every=self.save_every)


def can_resume(out_dir: Path) -> bool:
    return (Path(out_dir) / MANIFEST).is_file()


def train_seed(start: LlamaForCausalLM, domains: Domains, steps: int, settings: ExpertSettings, out_dir: Path,
               tokenizer: str, seed: int, resume: bool) -> Manifest:
    """The shared seed model: `start` trained on every training domain's train split concatenated."""
    mixed = TokenStream(torch.cat([d.train.tokens for d in domains.trained]))
    mixed_dev = TokenStream(torch.cat([d.dev.tokens for d in domains.trained]))
    return train(start, mixed, mixed_dev, settings.train_config(steps, seed), out_dir,
                 Identity("seed-model", "*", tokenizer), resume=resume and can_resume(out_dir)).manifest


def train_expert(seed_model: LlamaForCausalLM, seed_manifest: Manifest, domain: Domain, plan: ExpertPlan,
                 name: str, settings: ExpertSettings, out_dir: Path, seed: int, extra: dict,
                 resume: bool = True, hooks: TrainHooks | None = None, stop_at: int | None = None,
                 progress: bool = True) -> TrainResult:
    """Branch an expert for `domain` from the seed at the plan's width and train it to the plan's steps.

    With `resume`, a checkpoint already in `out_dir` continues where it stopped (same step, losses and data
    order); its manifest keeps the lineage of the seed it branched from.
    """
    identity = Identity.branched_from(seed_manifest, name, domain.name,
                                      {**extra, "intermediate_size": plan.intermediate_size,
                                       "data_sha256": domain.sha256})
    model = branch(seed_model, plan.intermediate_size, seed=seed)  # on resume, the checkpoint overwrites it
    return train(model, domain.train, domain.dev, settings.train_config(plan.steps, seed), out_dir, identity,
                 resume=resume and can_resume(out_dir), hooks=hooks, stop_at=stop_at, progress=progress)


def describe_seed(model: LlamaForCausalLM, name: str, tokenizer: str, source: str) -> Manifest:
    """A manifest for a seed that was not trained here (pipeline weights, a seeded init): its hash starts lineages."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return Manifest(name=name, domain="*", config=json.loads(model.config.to_json_string(use_diff=False)),
                    tokenizer=tokenizer, seed_hash="", parent=None, lineage=[], steps=0, target_steps=0, tokens=0,
                    flops=0.0, val_ppl=None, weights_sha256=digest.hexdigest(), extra={"source": source})


def train_ensemble(seed_model: LlamaForCausalLM, seed_manifest: Manifest, domains: Domains, plan: Plan,
                   settings: ExpertSettings, out_dir: Path, seed: int, resume: bool, only: list[str] = (),
                   log: Callable[[str], None] = print) -> list[Manifest]:
    """One expert per planned domain under `out_dir/<domain>`; an expert's seed depends on the registry order."""
    names = [d.name for d in domains.trained]
    done = []
    for ep in plan.experts:
        if only and ep.domain not in only:
            continue
        i = names.index(ep.domain)
        result = train_expert(seed_model, seed_manifest, domains.get(ep.domain), ep, f"{plan.method}/{ep.domain}",
                              settings, out_dir / ep.domain, seed * 1000 + i, {"method": plan.method},
                              resume=resume)
        m = result.manifest
        log(f"{ep.domain}: {out_dir / ep.domain} steps {m.steps}/{m.target_steps} dev ppl {m.val_ppl:.3f} "
            f"sha256 {m.weights_sha256[:16]}")
        done.append(m)
    return done
