"""Train one model (the shared seed or a domain expert) on one token stream, resumably.

Master weights stay fp32 on the chosen device; a lower `dtype` only changes the autocast compute.
Windows are drawn at random positions from a seeded generator (shuffled data); AdamW with a cosine
schedule after linear warmup. A checkpoint holds weights, manifest and trainer.pt (optimizer, scheduler,
step and both RNG states), so a resumed run takes the same steps with the same losses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from experts.checkpoint import TRAINER, load_weights, read_manifest, save_checkpoint, verify
from experts.evaluate import EvalSettings, stream_perplexity
from experts.manifest import Manifest
from experts.sizing import flops_per_token
from lm.build import resolve_dtype
from lm.data import TokenStream


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype under autocast; weights stay fp32
    eval_windows: int = 32  # dev windows for the manifest's validation perplexity
    save_every: int = 0  # 0: save only at the end (or at stop_at)


@dataclass
class Identity:
    """Who this model is: the manifest fields that training does not compute."""

    name: str
    domain: str
    tokenizer: str
    seed_hash: str = ""
    parent: str | None = None
    lineage: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @classmethod
    def branched_from(cls, parent: Manifest, name: str, domain: str, extra: dict) -> "Identity":
        seed_hash = parent.seed_hash or parent.weights_sha256  # the seed model itself has no seed_hash
        return cls(name, domain, parent.tokenizer, seed_hash, parent.weights_sha256,
                   parent.lineage + [parent.weights_sha256], extra)


@dataclass
class TrainHooks:
    """How a caller (the node) watches and interrupts a run; every hook is optional."""

    should_stop: Callable[[], bool] = lambda: False  # checked after every step: save a checkpoint and return
    on_step: Callable[[int, float], None] = lambda step, loss: None
    on_checkpoint: Callable[[Manifest], None] = lambda manifest: None  # after each save, the final one included


@dataclass
class TrainResult:
    manifest: Manifest
    start_step: int
    losses: list[float]  # losses of the steps this call ran, from start_step on


def train(model: LlamaForCausalLM, data: TokenStream, dev: TokenStream, cfg: TrainConfig, out_dir: Path,
          identity: Identity, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, hooks: TrainHooks | None = None) -> TrainResult:
    """Train to `cfg.steps` (or only to `stop_at`, e.g. when a node's slot ends), checkpointing in `out_dir`.

    With `resume`, weights, optimizer, scheduler, step and RNG come from the checkpoint in `out_dir`.
    `hooks.should_stop` ends the run early at a checkpoint (a node that must take a pipeline stage).
    """
    hooks = hooks or TrainHooks()
    device = torch.device(cfg.device)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    if compute_dtype == torch.float16:
        raise ValueError("training in float16 needs loss scaling, which this trainer omits; use bfloat16")
    model.to(device=device, dtype=torch.float32)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=min(cfg.warmup_steps, cfg.steps // 10 + 1), num_training_steps=cfg.steps,
        min_lr_rate=cfg.min_lr_ratio)
    generator = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume:
        step = _restore(model, optimizer, scheduler, generator, out_dir, cfg)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_step = flops_per_token(model.config, cfg.seq_len) * tokens_per_step
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    start, losses = step, []
    bar = tqdm(total=cfg.steps, initial=step, desc=identity.name, disable=None if progress else True, leave=False,
               unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    while step < end:
        x = data.sample(generator, cfg.batch_size, cfg.seq_len).to(device)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        hooks.on_step(step, losses[-1])
        bar.update(1)
        if step % 10 == 0 or step == end:
            rate = (step - start) * tokens_per_step / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
        if hooks.should_stop():
            break
        if cfg.save_every and step % cfg.save_every == 0 and step < end:
            hooks.on_checkpoint(_save(model, optimizer, scheduler, generator, step, out_dir, cfg, identity,
                                      flops_per_step, dev))
    bar.close()
    manifest = _save(model, optimizer, scheduler, generator, step, out_dir, cfg, identity, flops_per_step, dev)
    hooks.on_checkpoint(manifest)
    return TrainResult(manifest, start, losses)


def _save(model, optimizer, scheduler, generator, step: int, out_dir: Path, cfg: TrainConfig,
          identity: Identity, flops_per_step: float, dev: TokenStream) -> Manifest:
    settings = EvalSettings(seq_len=cfg.seq_len, device=cfg.device)
    val_ppl = stream_perplexity(model, dev.windows(cfg.seq_len, cfg.eval_windows), settings) \
        if len(dev) >= cfg.seq_len else None
    model.train()
    trainer_state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "data_rng": generator.get_state(), "torch_rng": torch.get_rng_state()}
    return save_checkpoint(model, out_dir, trainer_state, lambda sha: Manifest(
        name=identity.name, domain=identity.domain, config=json.loads(model.config.to_json_string(use_diff=False)),
        tokenizer=identity.tokenizer, seed_hash=identity.seed_hash, parent=identity.parent,
        lineage=identity.lineage, steps=step, target_steps=cfg.steps,
        tokens=step * cfg.batch_size * cfg.seq_len, flops=step * flops_per_step, val_ppl=val_ppl,
        weights_sha256=sha, extra={**identity.extra, "train": asdict(cfg)}))


def _restore(model, optimizer, scheduler, generator, out_dir: Path, cfg: TrainConfig) -> int:
    manifest = read_manifest(out_dir)
    verify(out_dir, manifest)
    if not (out_dir / TRAINER).is_file():
        raise ValueError(f"{out_dir}: no {TRAINER}; this checkpoint cannot be resumed")
    state = torch.load(out_dir / TRAINER, map_location="cpu", weights_only=True)
    if state["weights_sha256"] != manifest.weights_sha256:
        raise ValueError(f"{out_dir}: {TRAINER} belongs to other weights than the manifest's")
    if manifest.target_steps != cfg.steps:
        raise ValueError(f"{out_dir}: checkpoint targets {manifest.target_steps} steps, this run {cfg.steps}; "
                         f"a cosine schedule cannot be stretched mid-run")
    load_weights(model, out_dir)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
