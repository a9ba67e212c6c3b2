"""The HDEE comparison at equal FLOPs: MHo-IHo (homogeneous) vs MHe-IHo (sizes) vs MHo-IHe (steps).

Per seed: train one shared seed model on all training domains, rank the domains by difficulty, branch
one expert per domain for each method, score each method's ensemble on every domain (in-domain and
held-out). The seed model's compute is shared by all three methods, so it is left out of the
equal-FLOPs comparison.

Difficulty is `reference` (the seed model's dev bits per token, measured per seed) or `compression`
(the model-free zlib measure of `experts.domains`).
"""

from __future__ import annotations

import csv
import hashlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from experts.branch import branch
from experts.checkpoint import MANIFEST, load_expert, new_model, read_manifest
from experts.domains import Domain, Domains
from experts.evaluate import (EvalSettings, PriorCache, evaluate_ensemble, reference_difficulty,
                              stream_perplexity)
from experts.manifest import Manifest
from experts.sizing import METHODS, ExpertPlan, Plan, make_plan
from experts.train import Identity, TrainConfig, train
from lm.data import TokenStream
from lm.presets import resolve_model

MAIN_VARIANT = "posterior"
DIFFICULTIES = ("reference", "compression")


@dataclass
class BenchConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    medium_width: int = 192
    expert_steps: int = 300  # the medium step count
    seed_steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    width_spread: float = 0.5  # MHe-IHo widths span 0.5x..1.5x of medium
    step_spread: float = 0.25  # MHo-IHe steps span 0.75x..1.25x (HDEE: 300/400/500)
    max_bytes: int = 400_000  # per domain
    dev_windows: int = 100
    test_windows: int = 64
    top_k: int = 2
    difficulty: str = "reference"  # or "compression"
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def at_scale(cls, scale: int, **overrides) -> "BenchConfig":
        """scale 1 fits 2 CPU cores in ~30 min; larger scales grow width, batch, steps and data for a GPU."""
        if scale < 1:
            raise ValueError(f"--scale {scale} must be at least 1")
        if overrides.get("difficulty", "reference") not in DIFFICULTIES:
            raise ValueError(f"--difficulty must be one of {', '.join(DIFFICULTIES)}")
        hidden = 64 * scale
        fields = dict(hidden_size=hidden, heads=max(4, hidden // 32), medium_width=3 * hidden,
                      expert_steps=300 * scale, seed_steps=200 * scale, batch_size=8 * scale,
                      max_bytes=400_000 * scale)
        return cls(**{**fields, **overrides})

    def model_config(self, vocab_size: int) -> LlamaConfig:
        base = resolve_model("tiny", vocab_size).config.to_dict()
        return LlamaConfig.from_dict({**base, "hidden_size": self.hidden_size, "num_hidden_layers": self.layers,
                                      "num_attention_heads": self.heads, "num_key_value_heads": self.heads,
                                      "head_dim": self.hidden_size // self.heads,
                                      "intermediate_size": self.medium_width})

    def train_config(self, steps: int, seed: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr, seed=seed,
                           device=self.device, dtype=self.dtype)


@dataclass
class BenchResult:
    config: BenchConfig
    domains: list[dict]
    plans: dict[int, dict[str, Plan]] = field(default_factory=dict)  # per seed
    reference: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> domain -> dev bits/token
    rows: list[dict] = field(default_factory=list)  # seed, method, variant, domain, held_out, perplexity
    seconds: float = 0.0


def plans_for(cfg: BenchConfig, difficulties: dict[str, float], vocab_size: int) -> dict[str, Plan]:
    return {m: make_plan(m, difficulties, cfg.model_config(vocab_size), cfg.expert_steps,
                         cfg.batch_size * cfg.seq_len, cfg.seq_len, cfg.width_spread, cfg.step_spread)
            for m in METHODS}


def _method_dir(cfg: BenchConfig, method: str) -> str:
    """Homogeneous experts do not depend on the difficulty measure, so both measures share them."""
    return method if method == "MHo-IHo" else f"{method}.{cfg.difficulty}"


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _train_or_reuse(model_fn, data: TokenStream, dev: TokenStream, tcfg: TrainConfig, out_dir: Path,
                    identity: Identity, log) -> tuple[LlamaForCausalLM, Manifest]:
    """A finished checkpoint from an earlier, interrupted bench run is reused instead of retrained,
    but only if it was trained on the same data with the same settings."""
    model = model_fn()
    if (out_dir / MANIFEST).is_file():
        done = read_manifest(out_dir)
        same_shape = all(done.config.get(k) == getattr(model.config, k) for k in SHAPE_KEYS)
        same_run = done.extra == {**identity.extra, "train": asdict(tcfg)}  # same plan, data and settings
        if done.complete and same_shape and same_run:
            return load_expert(out_dir, tcfg.device)
    t0 = time.perf_counter()
    manifest = train(model, data, dev, tcfg, out_dir, identity).manifest
    width = model.config.intermediate_size
    log(f"  {identity.name:<28} width {width:>4} steps {tcfg.steps:>5} dev ppl {manifest.val_ppl:7.3f} "
        f"({time.perf_counter() - t0:.0f}s)")
    return model, manifest


def run_bench(cfg: BenchConfig, domains: Domains, tokenizer_name: str, vocab_size: int, work_dir: Path,
              log=print) -> BenchResult:
    t0 = time.perf_counter()
    result = BenchResult(cfg, [d.summary() for d in domains.all])
    settings = EvalSettings(seq_len=cfg.seq_len, dev_windows=cfg.dev_windows, test_windows=cfg.test_windows,
                            top_k=cfg.top_k, device=cfg.device)
    cache = PriorCache(work_dir / "priors.json")
    mixed_train = TokenStream(torch.cat([d.train.tokens for d in domains.trained]))
    mixed_dev = TokenStream(torch.cat([d.dev.tokens for d in domains.trained]))
    mixed_sha = hashlib.sha256("".join(d.sha256 for d in domains.trained).encode()).hexdigest()
    for seed in cfg.seeds:
        log(f"seed {seed}: shared seed model, {cfg.seed_steps} steps on all training domains")
        seed_model, seed_manifest = _train_or_reuse(
            lambda: new_model(cfg.model_config(vocab_size), seed), mixed_train, mixed_dev,
            cfg.train_config(cfg.seed_steps, seed), work_dir / f"seed{seed}" / "seed-model",
            Identity(f"seed{seed}/seed-model", "*", tokenizer_name, extra={"data_sha256": mixed_sha}), log)
        for d in domains.all:
            ppl = stream_perplexity(seed_model, d.test.windows(cfg.seq_len, cfg.test_windows), settings)
            result.rows.append(_row(seed, "seed-model", "single", d, ppl))
        result.reference[seed] = reference_difficulty(seed_model, domains.all, settings)
        difficulties = {d.name: result.reference[seed][d.name] if cfg.difficulty == "reference" else d.difficulty
                        for d in domains.trained}
        result.plans[seed] = plans_for(cfg, difficulties, vocab_size)
        for method, plan in result.plans[seed].items():
            log(f"seed {seed}: {method}")
            experts = []
            names = [d.name for d in domains.trained]  # registry order, so seeds don't depend on the ranking
            for ep in plan.experts:
                experts.append(_train_expert(cfg, seed, names.index(ep.domain), method, ep, seed_model,
                                             seed_manifest, domains.get(ep.domain), work_dir, log))
            for r in evaluate_ensemble(experts, domains.all, settings, cache):
                for variant, ppl in r.ppl.items():
                    result.rows.append(_row(seed, method, variant, domains.get(r.domain), ppl))
    result.seconds = time.perf_counter() - t0
    return result


def _train_expert(cfg: BenchConfig, seed: int, index: int, method: str, ep: ExpertPlan,
                  seed_model: LlamaForCausalLM, seed_manifest: Manifest, domain: Domain, work_dir: Path,
                  log) -> tuple[Manifest, LlamaForCausalLM]:
    identity = Identity.branched_from(seed_manifest, f"seed{seed}/{method}/{ep.domain}", ep.domain,
                                      {"method": method, "intermediate_size": ep.intermediate_size,
                                       "data_sha256": domain.sha256})
    model, manifest = _train_or_reuse(
        lambda: branch(seed_model, ep.intermediate_size, seed=seed * 1000 + index), domain.train, domain.dev,
        cfg.train_config(ep.steps, seed * 1000 + index), work_dir / f"seed{seed}" / _method_dir(cfg, method) / ep.domain,
        identity, log)
    return manifest, model


def _row(seed: int, method: str, variant: str, domain: Domain, ppl: float) -> dict:
    return {"seed": seed, "method": method, "variant": variant, "domain": domain.name,
            "held_out": int(domain.held_out), "perplexity": round(ppl, 4)}


def _stats(rows: list[dict], method: str, variant: str, domain: str) -> tuple[float, float]:
    values = [r["perplexity"] for r in rows
              if r["method"] == method and r["variant"] == variant and r["domain"] == domain]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(result: BenchResult) -> dict:
    """Per-domain winners of the main variant, by mean over seeds and beyond the seed spread."""
    rows, domains = result.rows, result.domains
    wins = {m: 0 for m in METHODS}
    clear = {m: 0 for m in METHODS}
    per_domain = []
    for d in domains:
        stats = {m: _stats(rows, m, MAIN_VARIANT, d["name"]) for m in METHODS}
        ranked = sorted(METHODS, key=lambda m: stats[m][0])
        best, runner_up = ranked[0], ranked[1]
        beyond = stats[best][0] + stats[best][1] < stats[runner_up][0] - stats[runner_up][1]
        wins[best] += 1
        clear[best] += beyond
        per_domain.append({"domain": d, "stats": stats, "best": best, "beyond_spread": beyond})
    hetero = sum(wins[m] for m in METHODS if m != "MHo-IHo")
    return {"wins": wins, "clear": clear, "per_domain": per_domain, "hetero_wins": hetero, "domains": len(domains)}


def write_csv(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["seed", "method", "variant", "domain", "held_out", "perplexity"])
        w.writeheader()
        w.writerows(result.rows)


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.mean(math.log(v) for v in values))


def _seed_wins(result: BenchResult, seed: int) -> dict[str, int]:
    wins = {m: 0 for m in METHODS}
    for d in result.domains:
        ppl = {r["method"]: r["perplexity"] for r in result.rows
               if r["seed"] == seed and r["variant"] == MAIN_VARIANT and r["domain"] == d["name"]}
        wins[min(METHODS, key=lambda m: ppl[m])] += 1
    return wins


def report(result: BenchResult, command: str) -> str:
    s = summarise(result)
    cfg = result.config
    lines = ["# HDEE experts benchmark", "",
             f"Reproduce: `{command}` ({result.seconds / 60:.0f} min here). "
             f"Seeds {', '.join(map(str, cfg.seeds))}; difficulty measure: {cfg.difficulty}. "
             f"Test perplexity (per token; byte tokenizer) of each ensemble's posterior mixture (prior "
             f"estimated on each domain's dev split), mean ± std over seeds. Lower is better. "
             f"Difficulty columns: zlib bits/byte (4 KiB chunks) and the seed model's dev bits/byte.", "",
             "| domain | kind | zlib | seed dev | seed model ppl | " + " | ".join(METHODS) + " | best | beyond spread |",
             "|---|---|---:|---:|---:|" + "---:|" * len(METHODS) + "---|---|"]
    for p in s["per_domain"]:
        d = p["domain"]
        seed_mean, _ = _stats(result.rows, "seed-model", "single", d["name"])
        reference = statistics.mean(result.reference[seed][d["name"]] for seed in cfg.seeds)
        cells = [f"{p['stats'][m][0]:.3f} ± {p['stats'][m][1]:.3f}" for m in METHODS]
        lines.append(f"| {d['name']} | {'held-out' if d['held_out'] else 'in-domain'} | {d['difficulty_bpb']:.3f} "
                     f"| {reference:.3f} | {seed_mean:.3f} | " + " | ".join(cells)
                     + f" | {p['best']} | {'yes' if p['beyond_spread'] else 'no'} |")
    per_seed = "; ".join(f"seed {seed}: " + ", ".join(f"{m} {w}" for m, w in _seed_wins(result, seed).items())
                         for seed in cfg.seeds)
    lines += ["", "Domains won (by mean; in brackets: beyond the seed spread, i.e. the mean ± std intervals of the "
              "best and the runner-up do not overlap): "
              + ", ".join(f"{m} {s['wins'][m]} ({s['clear'][m]})" for m in METHODS) + f". Per seed: {per_seed}.",
              f"A heterogeneous ensemble is best in {s['hetero_wins']} of {s['domains']} domains "
              f"(target: at least 90%).", "",
              "## Inference variants", "",
              "Geometric mean of test perplexity over domains, mean over seeds.", "",
              "| method | domains | posterior | uniform | top" + str(cfg.top_k) + " | best single |",
              "|---|---|---:|---:|---:|---:|"]
    variants = ["posterior", "uniform", f"top{cfg.top_k}", "best-single"]
    for method in METHODS:
        for kind, held in (("in-domain", 0), ("held-out", 1)):
            names = [d["name"] for d in result.domains if d["held_out"] == held]
            if not names:
                continue
            cells = []
            for v in variants:
                per_seed_gm = [_geomean([r["perplexity"] for r in result.rows if r["method"] == method
                                         and r["variant"] == v and r["domain"] in names and r["seed"] == seed])
                               for seed in cfg.seeds]
                cells.append(f"{statistics.mean(per_seed_gm):.3f}")
            lines.append(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    first = cfg.seeds[0]
    rankings = "; ".join(f"seed {seed}: " + " < ".join(e.domain for e in result.plans[seed]["MHe-IHo"].experts)
                         for seed in cfg.seeds)
    lines += ["", f"## Plans (equal FLOPs; seed {first})", "",
              f"Difficulty ranking, easiest first — {rankings}.", "", "```"]
    lines += [p.table() for p in result.plans[first].values()] + ["```", "",
              "## Setup", "", "```", *(f"{k} = {v}" for k, v in asdict(cfg).items()), "```", ""]
    return "\n".join(lines)
