"""Compression benchmark: every codec pair against raw, measured side by side in one run.

    python bench/bench_compression.py [--quick] [--json PATH] [--steps N] [--seeds K] [--swarm-rounds R]

Per (activation codec, gradient codec) pair it reports, against raw in the same run:
- bytes per microbatch per hop (one activation forward plus one gradient backward) of real activations and
  gradients of the model being trained, and the ratio to raw;
- encode and decode ms on this CPU (medians), for that microbatch and for a llama-160m-sized one;
- final training loss at equal tokens (same seeds, same batches; mean of the last 20% of steps, averaged
  over --seeds model seeds) and its ratio to raw's; held-out perplexity through the same codecs.

Training runs the tiny preset as a 4-stage pipeline in this process, every stage boundary (and the way back
to stage 0's head) passing through the codec in both directions, exactly as `protocol/codecs.py` encodes
and decodes on the wire.

Iteration time comes from the swarm harness (`bench/bench_swarm.py`'s `run_config`): 8 real node processes,
full pipelines over 6 stages, links emulated from the GCP instance's regions (about 10 MB/s and 50-130 ms
between regions), microbatches of 8 x 256 tokens so that a hop carries 512 KiB raw; one swarm per
SWARM_PAIRS entry and balance, same seeds and tokens (`--swarm-rounds 0` skips it; `iteration_s` is then
null). Two balances between wire and compute, in one run: the links as the instance gives them, and their
bandwidth divided by `--link-slowdown` (default 12: the tiny preset's hidden size is 12x smaller than
llama-160m's, so its hops carry 12x fewer bytes for the same tokens; dividing the bandwidth gives a hop a real
model's time on the wire, compute unscaled). CPU seconds per round of all processes show beside each.

Writes bench/results/compression.md, compression.json (the --json layout) and compression-loss.png (loss at
equal tokens; beside it, the swarm runs' loss against wall-clock).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from lm.build import build_stage  # noqa: E402
from lm.data import load_corpus  # noqa: E402
from lm.presets import resolve_model  # noqa: E402
from lm.tokenizer import ByteTokenizer  # noqa: E402
from protocol.codecs import get_codec  # noqa: E402
from bench_swarm import link_slowdown_option, mean_ci, table  # noqa: E402

STAGES = 4
BATCH, SEQ = 4, 128
LR, WEIGHT_DECAY, CLIP, WARMUP = 3e-3, 0.01, 1.0, 2  # the node's defaults (node/config.py)
PAIRS = [("raw", "raw"), ("bf16", "bf16"), ("int8", "int8"), ("int4", "int4"), ("lowrank", "int8"),
         ("lowrank", "int4")]
QUICK_PAIRS = [("raw", "raw"), ("int8", "int8"), ("int4", "int4"), ("lowrank", "int8"), ("lowrank", "int4")]
SWARM_PAIRS = [("raw", "raw"), ("int8", "int8"), ("lowrank", "int4")]
SWARM_ARGS = ["--batch-size", "8", "--seq-len", "256"]  # later flags win over the harness's NODE_ARGS
LARGE = (4, 512, 768)  # a llama-160m microbatch, for encode/decode cost at a realistic size
# A deliberately harmful codec, trained beside the others so that the bench shows it can see harm: the sign of
# every value times the tensor's mean magnitude (1 bit a value). Bench-only: no node speaks it.
CONTROL = "sign1"
LOSS_TARGET = 1.02  # "within 2% of raw's loss", judged at the confidence interval's upper edge
# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1), for the intervals over seeds.
def key(act: str, grad: str) -> str:
    return act if act == grad else f"{act}+{grad}"


class Hop(torch.autograd.Function):
    """A stage boundary: the activation crosses with one codec, its gradient comes back with the other."""

    @staticmethod
    def forward(ctx, x, act, grad):
        ctx.grad = grad
        return through(act, x)

    @staticmethod
    def backward(ctx, g):
        return through(ctx.grad, g), None, None


def through(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == CONTROL:
        return torch.sign(x) * x.abs().mean()
    codec = get_codec(name)
    layout = codec.layout_for(tuple(x.shape))
    return codec.decode(codec.encode(x, layout), tuple(x.shape), x.dtype, layout, x.device)


def pipeline_loss(stages, ids, act: str, grad: str) -> torch.Tensor:
    hidden = stages[0](stages[0].embed(ids))
    for stage in stages[1:]:
        hidden = stage(Hop.apply(hidden, act, grad))
    hidden = Hop.apply(hidden, act, grad)  # back to the origin, which holds the head and the loss
    return stages[0].loss(stages[0].logits(hidden), ids)


def train(spec, data, held_out, act: str, grad: str, steps: int, seed: int) -> dict:
    stages = [build_stage(spec, s, STAGES, seed) for s in range(STAGES)]
    params = [p for m in stages for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    losses, times, started = [], [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        ids = data.sample(torch.Generator().manual_seed(seed * 1_000_003 + step), BATCH, SEQ)
        loss = pipeline_loss(stages, ids, act, grad)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        times.append(time.perf_counter() - started)
    with torch.no_grad():
        eval_loss = statistics.fmean(pipeline_loss(stages, w.unsqueeze(0), act, grad).item() for w in held_out)
    tail = max(1, steps // 5)
    return dict(losses=losses, times=times, final=statistics.fmean(losses[-tail:]), eval=eval_loss)


def sample_tensors(spec, data, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A real boundary activation and its gradient, after `steps` raw steps (their structure is what
    lowrank relies on, so random tensors would flatter or wrong it)."""
    stages = [build_stage(spec, s, STAGES, 0) for s in range(STAGES)]
    params = [p for m in stages for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    for step in range(steps + 1):
        ids = data.sample(torch.Generator().manual_seed(step), BATCH, SEQ)
        hidden = stages[1](stages[0](stages[0].embed(ids)))
        boundary = hidden.detach().requires_grad_(True)
        out = boundary
        for stage in stages[2:]:
            out = stage(out)
        loss = stages[0].loss(stages[0].logits(out), ids)
        loss.backward()
        hidden.backward(boundary.grad)
        if step < steps:
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad()
    return boundary.detach(), boundary.grad.detach()


def codec_cost(name: str, x: torch.Tensor, repeats: int) -> tuple[int, float, float, float]:
    """(payload bytes, encode ms, decode ms, relative RMS error), medians over `repeats`."""
    if name == CONTROL:  # 1 bit a value and one float32 scale; coded and decoded in one torch expression
        t0 = time.perf_counter()
        out = through(name, x)
        return (x.numel() + 7) // 8 + 4, 1e3 * (time.perf_counter() - t0), 0.0, ((out - x).norm() / x.norm()).item()
    codec = get_codec(name)
    layout = codec.layout_for(tuple(x.shape))
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        payload = codec.encode(x, layout)
        t1 = time.perf_counter()
        out = codec.decode(payload, tuple(x.shape), x.dtype, layout, torch.device("cpu"))
        dec.append(time.perf_counter() - t1)
        enc.append(t1 - t0)
    error = ((out - x).norm() / x.norm()).item()
    return payload.numel(), 1e3 * statistics.median(enc), 1e3 * statistics.median(dec), error


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer pairs, steps and seeds (under 10 minutes)")
    ap.add_argument("--steps", type=int, help="training steps per run (default 200; --quick 100)")
    ap.add_argument("--seeds", type=int, help="model seeds per pair (default 3; --quick 2)")
    ap.add_argument("--json", metavar="PATH", help="also write the per-codec figures here")
    ap.add_argument("--swarm-rounds", type=int, help="rounds per swarm run for iteration time (default 8; --quick 5; "
                                                      "0 skips the swarm runs)")
    ap.add_argument("--swarm-only", action="store_true", help="only the swarm runs (iteration time): "
                    "writes compression-swarm.md")
    link_slowdown_option(ap)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    if args.swarm_only:
        return swarm_report(args.swarm_rounds or 8, args.link_slowdown, Path(args.out), args.json)
    steps = args.steps or (100 if args.quick else 200)
    pairs = QUICK_PAIRS if args.quick else PAIRS
    started = time.perf_counter()
    seeds = args.seeds or (2 if args.quick else 3)
    repeats = 3 if args.quick else 15
    torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = ByteTokenizer()
    spec = resolve_model("tiny", tokenizer.vocab_size)
    corpus = load_corpus([], None, tokenizer)
    train_data, held = corpus.split((0.95, 0.05))
    held_out = held.windows(SEQ, limit=16)

    activation, gradient = sample_tensors(spec, train_data, min(steps, 100))
    large = torch.randn(LARGE) * 0.5 + torch.randn(LARGE[-1]) * 4  # a shared per-channel offset, as in LLaMA
    costs = {}
    for name in [*sorted({c for pair in pairs for c in pair}, key=[c for pair in pairs for c in pair].index), CONTROL]:
        costs[name] = dict(act=codec_cost(name, activation, repeats), grad=codec_cost(name, gradient, repeats),
                           large=codec_cost(name, large, max(3, repeats // 3)))
        print(f"codec {name}: {costs[name]}", flush=True)

    runs = {}
    pairs = [*pairs, (CONTROL, CONTROL)]  # the control trains like the others, on the same seeds and batches
    for act, grad in pairs:
        results = [train(spec, train_data, held_out, act, grad, steps, seed) for seed in range(seeds)]
        runs[key(act, grad)] = results
        print(f"{key(act, grad)}: final losses {[round(r['final'], 4) for r in results]}", flush=True)

    swarm_rounds = args.swarm_rounds if args.swarm_rounds is not None else (5 if args.quick else 8)
    by_balance, _, curves = swarm_iterations(swarm_rounds, args.link_slowdown) if swarm_rounds else ({}, {}, {})
    iteration = by_balance.get(args.link_slowdown, {})  # the main table's column; compression-swarm.md has both

    raw_bytes = costs["raw"]["act"][0] + costs["raw"]["grad"][0]
    raw_final = [r["final"] for r in runs["raw"]]
    report, rows = {}, []
    for act, grad in pairs:
        name = key(act, grad)
        hop = costs[act]["act"][0] + costs[grad]["grad"][0]
        final = statistics.fmean(r["final"] for r in runs[name])
        ratio, ratio_ci = mean_ci([r["final"] / b for r, b in zip(runs[name], raw_final)])
        ppl = math.exp(statistics.fmean(r["eval"] for r in runs[name]))
        enc = costs[act]["act"][1] + costs[grad]["grad"][1]
        dec = costs[act]["act"][2] + costs[grad]["grad"][2]
        large_ms = sum(costs[act]["large"][1:3]) if act == grad else None
        report[name] = dict(activation_codec=act, gradient_codec=grad, bytes_per_hop=hop,
                            activation_bytes=costs[act]["act"][0], gradient_bytes=costs[grad]["grad"][0],
                            bytes_ratio=raw_bytes / hop, activation_ratio=costs["raw"]["act"][0] / costs[act]["act"][0],
                            encode_ms=round(enc, 3), decode_ms=round(dec, 3), iteration_s=iteration.get(name),
                            final_loss=final,
                            final_loss_ratio=ratio, loss_ratio_ci=ratio_ci, perplexity=ppl,
                            activation_error=costs[act]["act"][3], gradient_error=costs[grad]["grad"][3])
        rows.append([f"`{act}` / `{grad}`" + (" (control)" if act == CONTROL else ""), hop, f"{raw_bytes / hop:.2f}x",
                     f"{costs['raw']['act'][0] / costs[act]['act'][0]:.2f}x",
                     f"{costs[act]['act'][3]:.4f} / {costs[grad]['grad'][3]:.4f}", f"{enc:.2f} / {dec:.2f}",
                     "-" if large_ms is None else f"{large_ms:.1f}", f"{final:.4f}", f"{ratio:.4f}",
                     "-" if ratio_ci is None else f"{ratio_ci[0]:.3f}-{ratio_ci[1]:.3f}", f"{ppl:.2f}",
                     f"{iteration[name]:.2f} ({iteration[name] / iteration['raw']:.2f}x)" if name in iteration
                     else "-"])

    control = report.pop(CONTROL)
    report["control"] = dict(codec=CONTROL, bytes_per_hop=control["bytes_per_hop"], final_loss=control["final_loss"],
                             final_loss_ratio=control["final_loss_ratio"], loss_ratio_ci=control["loss_ratio_ci"])

    def within(n: str) -> bool:  # within 2% of raw at the interval's upper edge (the mean, from one seed)
        ci = report[n]["loss_ratio_ci"]
        return (ci[1] if ci else report[n]["final_loss_ratio"]) <= LOSS_TARGET

    codecs = [n for n in report if n not in ("raw", "control")]
    best = max((n for n in codecs if within(n)), key=lambda n: report[n]["bytes_ratio"], default=None)
    best_act = max((n for n in codecs if within(n)), key=lambda n: report[n]["activation_ratio"], default=None)
    sees_harm = not within("control")
    lines = [
        "# Compression benchmark",
        "",
        f"`python bench/bench_compression.py{' --quick' if args.quick else ''}`; Python {platform.python_version()},"
        f" torch {torch.__version__}, one thread. Tiny preset as a {STAGES}-stage pipeline, microbatch "
        f"{BATCH} x {SEQ} tokens, {steps} steps x {seeds} seeds per pair (same batches for every pair); loss is the "
        f"mean of the last {max(1, steps // 5)} steps; perplexity on 16 held-out windows through the same codecs.",
        "Bytes are one activation forward plus its gradient backward, of a real stage-1 boundary after "
        f"{min(steps, 100)} raw steps; errors are relative RMS errors of those two tensors.",
        "",
        table(["activation / gradient codec", "bytes per hop", "vs raw", "activation vs raw",
               "rel. RMS error act / grad", "encode / decode ms (CPU)", "enc+dec ms, 4x512x768",
               "final loss", "vs raw", "vs raw, 95% CI", "perplexity", "iteration s (links)"], rows),
        "",
        f"Loss ratios are means over {seeds} seeds of each seed's final loss over raw's on that seed, with a "
        f"Student t 95% interval; \"within 2%\" must hold at the interval's upper edge. `{CONTROL}` (the control: "
        "each value's sign times the tensor's mean magnitude, 1 bit a value, bench-only) must fail it, or the "
        f"bench cannot see harm: it {'fails it: the bench sees harm' if sees_harm else 'PASSES it: the bench cannot see harm'}.",
        "",
        f"Best pair within 2% of raw's loss: **{best}**, {report[best]['bytes_ratio']:.2f}x fewer bytes per hop"
        f" (loss ratio {report[best]['final_loss_ratio']:.4f})." if best else "No pair within 2% of raw's loss.",
        f"Best activation codec within 2%: **{best_act}**, {report[best_act]['activation_ratio']:.2f}x fewer "
        f"activation bytes." if best_act else "",
        "",
        f"Iteration s: median over rounds 2.. of {swarm_rounds} of a local swarm of 8 processes (bench_swarm's harness), "
        f"full pipelines over 6 stages, links emulated from gcp12-20nodes.json's regions with their bandwidth divided "
        f"by {args.link_slowdown:g} (`--link-slowdown`), microbatches of 8 x 256 tokens (512 KiB raw per hop); ratio "
        "to raw's in the same run." if iteration else
        "Iteration time: not measured in this run (`--swarm-rounds 0`).",
        "GPU encode/decode cost was not measured (no GPU here); the ops are the same torch ops on the device.",
        f"Bench wall time: {time.perf_counter() - started:.0f} s.",
    ]
    (out_dir / "compression.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    payload = json.dumps(report, indent=2)
    (out_dir / "compression.json").write_text(payload + "\n")
    if args.json:
        Path(args.json).write_text(payload + "\n")
    plot(runs, curves, out_dir / "compression-loss.png")
    return 0


def balances(slowdown: float) -> list[float]:
    """The wire/compute balances a swarm part runs: links as given, and divided by --link-slowdown."""
    return [1.0] if slowdown == 1 else [1.0, slowdown]


def swarm_iterations(rounds: int, slowdown: float) -> tuple[dict[float, dict[str, float]], dict[float, dict[str, float]],
                                                            dict[str, list[dict]]]:
    """Per balance (links as given, and --link-slowdown), per SWARM_PAIRS entry on a fresh swarm of the
    bench_swarm harness: the median iteration seconds and the CPU seconds per round of all 8 processes; and at
    --link-slowdown each swarm's rounds (time_s, loss, ...) for the loss-vs-time plot."""
    import tempfile

    from bench_swarm import NUM_STAGES, run_config, split_corpus

    work = Path(tempfile.mkdtemp(prefix="bench-compression-"))
    train, _ = split_corpus(work)
    iteration, cpu, curves = {}, {}, {}
    for balance in balances(slowdown):
        iteration[balance], cpu[balance] = {}, {}
        for act, grad in SWARM_PAIRS:
            name = key(act, grad)
            result = run_config(work / f"slowdown{balance:g}" / name, name, NUM_STAGES, rounds, train,
                                extra=[*SWARM_ARGS, "--activation-codec", act, "--gradient-codec", grad],
                                link_slowdown=balance)
            # The median: a round that hits the round timeout (a lost hop) would dominate a mean.
            iteration[balance][name] = statistics.median(r["executed_s"] for r in result.rounds[2:])
            cpu[balance][name] = sum(result.cpu_s_per_round().values())
            if balance == slowdown:
                curves[name] = result.rounds
            print(f"swarm {name}, slowdown {balance:g}: iteration {iteration[balance][name]:.3f} s (median over rounds "
                  f"2..{rounds - 1}), {cpu[balance][name]:.2f} CPU s per round", flush=True)
    return iteration, cpu, curves


def swarm_report(rounds: int, slowdown: float, out_dir: Path, json_path: str | None) -> int:
    from protocol.codecs import wire_bytes

    started = time.perf_counter()
    iteration, cpu, _ = swarm_iterations(rounds, slowdown)
    shape = (8, 256, 64)  # SWARM_ARGS on the tiny preset
    rows, report = [], {}
    raw_hop = 2 * wire_bytes("raw", shape, 4)
    for act, grad in SWARM_PAIRS:
        name = key(act, grad)
        hop = wire_bytes(act, shape, 4) + wire_bytes(grad, shape, 4)
        report[name] = dict(bytes_per_hop=hop, iteration_s=iteration[slowdown][name], final_loss=None,
                            balances={f"{b:g}": dict(iteration_s=iteration[b][name], cpu_s_per_round=cpu[b][name])
                                      for b in iteration})
        row = [f"`{act}` / `{grad}`", hop, f"{raw_hop / hop:.2f}x"]
        for b in iteration:
            row += [f"{iteration[b][name]:.3f}", f"{iteration[b][name] / iteration[b]['raw']:.2f}", f"{cpu[b][name]:.2f}"]
        rows.append(row)
    header = ["activation / gradient codec", "bytes per hop", "vs raw"]
    for b in iteration:
        where = "links as given" if b == 1 else f"bandwidth / {b:g}"
        header += [f"iteration s, {where}", "vs raw", "CPU s / round (8 processes)"]
    lines = ["# Compression in the swarm: iteration time", "",
             f"`python bench/bench_compression.py --swarm-only --swarm-rounds {rounds} --link-slowdown {slowdown:g}`: "
             "bench_swarm's harness, 8 processes, full pipelines over 6 stages, links emulated from "
             f"gcp12-20nodes.json's regions, as given and with their bandwidth divided by {slowdown:g} (a hop then "
             "spends a llama-160m hop's time on the wire), microbatches of 8 x 256 tokens; median iteration s over "
             f"rounds 2..{rounds - 1}, one swarm per pair and balance, in one run; CPU s per round of all 8 processes "
             "together (2 shared cores).", "",
             table(header, rows), "",
             f"Bench wall time: {time.perf_counter() - started:.0f} s."]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compression-swarm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def plot(runs: dict, curves: dict[str, list[dict]], path: Path) -> None:
    """Loss at equal tokens (in-process runs); with swarm runs, also their loss against wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 7, 4), squeeze=False)
    ax = axes[0][0]
    for name, results in runs.items():
        losses = [statistics.fmean(step) for step in zip(*(r["losses"] for r in results))]
        window = 10
        smooth = [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=name)
    ax.set_xlabel("step (equal tokens for every codec)")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Loss at equal tokens, per activation+gradient codec")
    if curves:
        ax = axes[0][1]
        for name, rounds in curves.items():
            ax.plot([r["time_s"] for r in rounds], [r["loss"] for r in rounds], marker=".", label=name)
        ax.set_xlabel("wall-clock s (the swarm's rounds, averaging included)")
        ax.set_ylabel("training loss (per round)")
        ax.legend()
        ax.set_title("Swarm under emulated links: loss against time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
