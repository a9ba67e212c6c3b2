"""Sync benchmark: how stage replicas keep their weights together, in a live swarm under emulated GCP links.

    python bench/bench_sync.py [--quick] [--json PATH] [--rounds N] [--balances 1,12] [--out bench/results]

One layout for every run (bench_swarm's harness, real `swarm-node run` processes): 3 stages, 2 replicas of
each (the two data nodes are stage 0's replicas), skip paths on (each microbatch visits 2 of the 3 stages),
endpoints placed in the regions of bench/instances/gcp12-20nodes.json with its latency and bandwidth.
Strategies, on the same seeds and tokens: `all-to-all` (each replica pulls every other's whole gradient each
round, the baseline), `every-round` (reduce-scatter then all-gather each round: bandwidth-optimal) and
`outer` (local steps, every H = 8 rounds an outer step on int8 pseudo-gradients). Each runs at every
wire/compute balance of --balances (the links' bandwidth divided by that much; 12 is bench_swarm's default).
Two replicas per stage and three stages keep it to 6 processes, what 2 shared cores run at a round every
few seconds; with two replicas `every-round` and `all-to-all` move the same bytes (2G(n-1)/n = (n-1)G = G),
so there the bandwidth-optimal schedule shows only in its extra latency, and in the projection (3-5 replicas).

Reports per balance and strategy: measured whole-round seconds and the simulator's whole-round prediction
(`predicted_round_s` of the round events: from the links and compute the swarm measured), the pipeline
iteration, sync seconds and sync bytes per replica per round (counted from frames), the final held-out loss
(nats per byte token; the model saved after the last round, as `swarm-node eval` computes it) against a
unigram byte model's on the same held-out text, loss against tokens and against wall-clock (one PNG).
Projection: the simulator's sync cost (routing/sync_cost.py) fed SkipPipe's GCP instance (our planner's plan
for it: its stage groups and simulated iteration) and the parameter bytes of its model (d_model 1024,
6 stages x 4 layers, 32k vocabulary).

Writes bench/results/sync.md, sync.png and (--json) the figures. Targets are printed with met / NOT met.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_swarm import (EVAL_SEQ, EVAL_SEQUENCES, INSTANCE, LINK_SLOWDOWN, NODE_ARGS, UNIGRAM_MARGIN,  # noqa: E402
                         WARMUP_ROUNDS, ConfigResult, unigram_loss,
                         evaluate, run_config, split_corpus)

LAYOUT = (0, 0, 1, 1, 2, 2)  # stage of each process: 2 replicas per stage, 6 processes for 2 shared cores
NUM_STAGES = 3
VISITS = 2  # of 3 stages: skip paths on
SYNC_EVERY = 8  # outer's H (the node's default)
# 240 rounds (2,048 tokens each) should train the baseline past the unigram bar: in process, the same model, batch
# and skip paths cross it between 100 and 150 steps; this swarm is slower per round (all-to-all at slowdown 1:
# held-out 2.677 after 96 rounds, 2.68 in process after about 60), so about 2.1-2.2 after 240. 12 (one outer sync) is what 6 runs fit in 10 minutes:
# each run spends about 45 s starting 6 processes on 2 cores.
DEFAULT_ROUNDS, QUICK_ROUNDS = 240, 12
STRATEGIES: dict[str, list[str]] = {
    "all-to-all": ["--sync", "all-to-all"],
    "every-round": ["--sync", "every-round"],
    "outer": ["--sync", "outer", "--sync-every", str(SYNC_EVERY)],
}
BASELINE = "all-to-all"
SMOOTH_ROUNDS = SYNC_EVERY  # training loss is one round's batch: averaged over an outer period for wall-clock
# Projection model (issue 15): SkipPipe's GCP setting. LLaMA's MLP width, 8/3 d_model rounded up to a multiple
# of 128, as lm/presets.py's llama-500m (1280 -> 3456): 1024 -> 2816.
PROJECTION_VOCAB = 32_000


# ---- one run's figures ------------------------------------------------------------------------------------------
def sync_per_replica(node_rounds: dict[str, list[dict]], first_round: int = WARMUP_ROUNDS) -> tuple[float, float]:
    """(sync bytes, sync seconds) per replica per round, from every node's round events. Bytes are received from
    replicas, counted from frames, over every round (under `outer` most rounds carry none); seconds over the rounds
    from `first_round` on (the first ones connect). Means over the nodes that hosted a stage."""
    per_bytes, per_seconds = [], []
    for events in node_rounds.values():
        if not events:
            continue
        per_bytes.append(sum(sum(e.get("sync_bytes", {}).values()) for e in events) / len(events))
        later = [sum(e.get("sync_s", {}).values()) for e in events if e["round"] >= first_round] or [0.0]
        per_seconds.append(statistics.fmean(later))
    if not per_bytes:
        raise ValueError("no node reported a round")
    return statistics.fmean(per_bytes), statistics.fmean(per_seconds)


def mean_after_warmup(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds[WARMUP_ROUNDS:] if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summarize(result: ConfigResult, heldout_loss: float) -> dict:
    """The --json figures of one run."""
    sync_bytes, sync_s = sync_per_replica(result.node_rounds)
    return {"round_s": mean_after_warmup(result.rounds, "whole_round_s"),
            "predicted_round_s": mean_after_warmup(result.rounds, "predicted_round_s"),
            "iteration_s": mean_after_warmup(result.rounds, "executed_s"),
            "sync_s": sync_s, "sync_bytes_per_replica_round": sync_bytes,
            "final_loss": heldout_loss, "tokens": result.rounds[-1]["tokens"]}


def smoothed(rounds: list[dict], window: int = SMOOTH_ROUNDS) -> list[tuple[float, float]]:
    """(time_s, training loss averaged over the last `window` rounds) per round with a loss."""
    points, losses = [], []
    for r in rounds:
        if r.get("loss") is None:
            continue
        losses.append(r["loss"])
        points.append((r["time_s"], statistics.fmean(losses[-window:])))
    return points


def loss_at(points: list[tuple[float, float]], t: float) -> float:
    """Linear interpolation of (time, loss) points at time t (clamped to the ends)."""
    if not points:
        return float("nan")
    if t <= points[0][0]:
        return points[0][1]
    for (t0, y0), (t1, y1) in zip(points, points[1:]):
        if t <= t1:
            return y0 + (y1 - y0) * (t - t0) / (t1 - t0) if t1 > t0 else y1
    return points[-1][1]


def timed_out(rounds: list[dict], round_timeout: float) -> list[int]:
    """Rounds that ran into the round timeout: they weigh on every mean, so the report names them."""
    return [r["round"] for r in rounds if r["round_s"] >= 0.9 * round_timeout]


def spacing(rounds: list[dict]) -> float | None:
    """Mean seconds from one round's end to the next's after the warm-up: the whole round plus what the events'
    `wall_s` leaves out (fetching the next plan, waiting for it to start)."""
    later = rounds[WARMUP_ROUNDS:]
    return (later[-1]["time_s"] - later[0]["time_s"]) / (len(later) - 1) if len(later) > 1 else None


def equal_time(curves: dict[str, list[dict]]) -> tuple[float, dict[str, float]]:
    """When the fastest run ended, and every run's smoothed training loss at that time."""
    t_end = min(rounds[-1]["time_s"] for rounds in curves.values())
    return t_end, {name: loss_at(smoothed(rounds), t_end) for name, rounds in curves.items()}


# ---- targets ----------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(report: dict, at_time: dict[str, tuple[float, dict[str, float]]],
            short: bool = False) -> list[tuple[bool, str]]:
    """(met, line) per target of issue 15. `at_time`: per balance, the equal wall-clock time and losses;
    `short`: the run was shorter than the default, which is what reaches the unigram bar."""
    out = []
    unigram = report["unigram_loss"]
    bar = UNIGRAM_MARGIN * unigram
    ratios, missing = [], []
    for balance, runs in report["balances"].items():
        for name, r in runs.items():
            if r["predicted_round_s"] is None:
                missing.append(f"{name} at {balance}")
            else:
                ratios.append((f"{name} at {balance}", r["round_s"] / r["predicted_round_s"]))
    ok = not missing and all(0.8 <= x <= 1.2 for _, x in ratios)
    text = ", ".join(f"{n} {x:.2f}" for n, x in ratios) or "none"
    if missing:
        text += f"; no `predicted_round_s` in the round events for {', '.join(missing)}"
    out.append((ok, f"Prediction: whole round measured / predicted within 20% for every strategy at every balance: "
                    f"{text} -> {verdict(ok)}"))
    proj = report["projection"]
    if "outer" in proj:
        ratio = proj["outer"]["round_s"] / proj["outer"]["iteration_s"]
        beside = (f"; all-to-all {proj[BASELINE]['round_s'] / proj[BASELINE]['iteration_s']:.2f}x"
                  if BASELINE in proj else "")
        out.append((ratio <= 1.15, f"Projection: in SkipPipe's GCP setting the whole round with outer <= 1.15x the "
                                   f"pipeline iteration alone: {ratio:.2f}x{beside} -> {verdict(ratio <= 1.15)}"))
    else:
        out.append((False, "Projection: not computed (routing/sync_cost.py missing) -> NOT met"))
    for balance, runs in report["balances"].items():
        if "outer" in runs and BASELINE in runs:
            outer_b, base_b = runs["outer"]["sync_bytes_per_replica_round"], runs[BASELINE]["sync_bytes_per_replica_round"]
            fewer = base_b / outer_b if outer_b else math.inf
            out.append((fewer >= 20, f"Bytes at slowdown {balance}: outer's sync bytes per replica per round >= 20x "
                                     f"fewer than all-to-all's (frames): {outer_b:,.0f} vs {base_b:,.0f}, "
                                     f"{fewer:.1f}x -> {verdict(fewer >= 20)}"))
    for balance, runs in report["balances"].items():
        if BASELINE in runs:
            loss = runs[BASELINE]["final_loss"]
            why = " (this run is shorter than the default length, which trains past the bar)" if short else ""
            out.append((loss <= bar, f"Length at slowdown {balance}: the baseline's held-out loss {loss:.4f} at least "
                                     f"25% below the unigram model's {unigram:.4f} (bar {bar:.4f}) -> "
                                     f"{verdict(loss <= bar)}{why if loss > bar else ''}"))
        if "outer" in runs and "every-round" in runs:
            o, e = runs["outer"]["final_loss"], runs["every-round"]["final_loss"]
            same = runs["outer"]["tokens"] == runs["every-round"]["tokens"]
            ok = same and o <= 1.03 * e and max(o, e) <= bar
            out.append((ok, f"Convergence at slowdown {balance}: outer's held-out loss within 3% of every-round's at "
                            f"equal tokens ({runs['outer']['tokens']:,} vs {runs['every-round']['tokens']:,}), both "
                            f"past the bar {bar:.4f}: {o:.4f} vs {e:.4f} ({o / e:.3f}x) -> {verdict(ok)}"))
        if balance in at_time and "outer" in at_time[balance][1]:
            t_end, losses = at_time[balance]
            ok = min(losses, key=losses.get) == "outer"
            shown = ", ".join(f"{n} {x:.4f}" for n, x in losses.items())
            out.append((ok, f"Wall-clock at slowdown {balance}: outer's training loss lowest after {t_end:.0f} s "
                            f"(when the fastest run ended; {SMOOTH_ROUNDS}-round mean, interpolated): {shown} -> "
                            f"{verdict(ok)}"))
    return out


# ---- projection -------------------------------------------------------------------------------------------------
def llama_intermediate(d_model: int) -> int:
    """LLaMA's MLP width: 8/3 of d_model, rounded up to a multiple of 128 (lm/presets.py's llama-500m)."""
    return -(-(8 * d_model) // (3 * 128)) * 128


def stage_params(d_model: int, intermediate: int, layers: list[int], vocab: int, kv_dim: int | None = None) -> list[int]:
    """Parameters per stage of a LLaMA split into stages of `layers[s]` decoder layers; stage 0 also holds the
    embedding, the head and the final norm (untied, as lm/presets.py builds it). No biases."""
    kv = d_model if kv_dim is None else kv_dim
    layer = 2 * d_model * d_model + 2 * d_model * kv + 3 * d_model * intermediate + 2 * d_model
    return [n * layer + (2 * vocab * d_model + d_model if s == 0 else 0) for s, n in enumerate(layers)]


def link_matrices(inst: dict):
    """(latency s, bandwidth B/s) between the instance's nodes, by node index; 0 and inf on the diagonal."""
    import numpy as np

    from routing.instance_io import GIB

    locations = [n["location"] for n in inst["nodes"]]
    by_pair = {frozenset((lk["a"], lk["b"])): lk for lk in inst["links"]}
    n = len(locations)
    latency, bandwidth = np.zeros((n, n)), np.full((n, n), np.inf)
    for i in range(n):
        for j in range(n):
            if i != j:
                lk = (inst["same_location_link"] if locations[i] == locations[j]
                      else by_pair[frozenset((locations[i], locations[j]))])
                latency[i, j], bandwidth[i, j] = lk["latency_ms"] / 1000, lk["bandwidth_GiBps"] * GIB
    return latency, bandwidth


def int8_wire_ratio() -> float:
    """Wire bytes per fp32 byte of a large tensor under the int8 codec (its per-block scales included)."""
    from protocol.codecs import wire_bytes

    n = 1 << 20
    return wire_bytes("int8", (n,), 4) / (4 * n)


def projection_model(inst: dict) -> dict:
    model = inst["model"]
    d, per_stage, stages = model["d_model"], model["layers_per_stage"], model["stages"]
    intermediate = llama_intermediate(d)
    params = stage_params(d, intermediate, [per_stage] * stages, PROJECTION_VOCAB)
    return {"d_model": d, "intermediate": intermediate, "layers": [per_stage] * stages, "vocab": PROJECTION_VOCAB,
            "params": params, "stage_bytes": [4 * p for p in params]}


def projection(instance: Path = INSTANCE, every: int = SYNC_EVERY) -> tuple[dict, dict]:
    """Whole-round and iteration seconds per strategy in the instance's setting, and what went in."""
    from routing.instance_io import load_instance
    from routing.planner import plan
    from routing.sync_cost import SyncSetting, sync_seconds, whole_round_seconds

    inst = json.loads(instance.read_text())
    problem = load_instance(instance)
    ours = plan(problem, seed=0)
    groups = [[v for v, s in enumerate(ours.stage_of_node) if s == k] for k in range(problem.stages)]
    latency, bandwidth = link_matrices(inst)
    model = projection_model(inst)
    settings = {"all-to-all": SyncSetting("all-to-all"), "every-round": SyncSetting("every-round"),
                "outer": SyncSetting("outer", every=every, wire_ratio=int8_wire_ratio())}
    iteration = ours.predicted_iteration_s
    out = {}
    for name, setting in settings.items():
        sync = sync_seconds(groups, model["stage_bytes"], latency, bandwidth, setting, iteration)
        out[name] = {"round_s": float(whole_round_seconds(iteration, sync, 0.0)), "iteration_s": float(iteration)}
    return out, {**model, "groups": groups, "iteration_s": iteration}


# ---- report -----------------------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def balance_table(runs: dict[str, dict], curves: dict[str, list[dict]]) -> str:
    rows = ["| strategy | whole round s | predicted s | measured / predicted | iteration s | round / iteration "
            "| round end to end s | sync s / replica / round | sync bytes / replica / round | vs all-to-all | tokens "
            "| held-out loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = runs.get(BASELINE, {}).get("sync_bytes_per_replica_round")
    for name, r in runs.items():
        pred = r["predicted_round_s"]
        fewer = f"{base / r['sync_bytes_per_replica_round']:.1f}x fewer" if base and r["sync_bytes_per_replica_round"] else "-"
        rows.append(f"| {name} | {r['round_s']:.3f} | {fmt(pred)} | {fmt(pred and r['round_s'] / pred, '.2f')} "
                    f"| {r['iteration_s']:.3f} | {r['round_s'] / r['iteration_s']:.2f} | {fmt(spacing(curves[name]))} "
                    f"| {r['sync_s']:.3f} "
                    f"| {r['sync_bytes_per_replica_round']:,.0f} | {fewer} | {r['tokens']:,} | {r['final_loss']:.4f} |")
    return "\n".join(rows)


def projection_table(proj: dict, inputs: dict) -> str:
    rows = ["| strategy | whole round s | pipeline iteration s | round / iteration |", "|---|---:|---:|---:|"]
    rows += [f"| {name} | {p['round_s']:.1f} | {p['iteration_s']:.1f} | {p['round_s'] / p['iteration_s']:.2f} |"
             for name, p in proj.items()]
    mb = [b / 1e6 for b in inputs["stage_bytes"]]
    rows.append("")
    rows.append(f"Inputs: our planner's plan for {INSTANCE.name} (runtime semantics), simulated iteration "
                f"{inputs['iteration_s']:.1f} s; replica groups by stage {inputs['groups']} (node indices; each "
                f"group syncs over the instance's links between its nodes); LLaMA d_model {inputs['d_model']}, MLP "
                f"{inputs['intermediate']}, {len(inputs['layers'])} stages x {inputs['layers'][0]} layers, vocabulary "
                f"{inputs['vocab']:,}: {inputs['params'][0] / 1e6:.1f}M parameters in stage 0 (embedding, head, "
                f"final norm, 4 layers; {mb[0]:.0f} MB fp32), {inputs['params'][1] / 1e6:.1f}M in each other stage "
                f"({mb[1]:.0f} MB). outer: H = {SYNC_EVERY}, int8 pseudo-gradients ({int8_wire_ratio() * 4:.4f} "
                "bytes per parameter). Per-round overhead (plan fetch, barrier) taken as 0.")
    return "\n".join(rows)


def plot(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """Loss against tokens and against wall-clock, one row per balance, every strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 3.6 * len(curves)), squeeze=False)
    for (balance, runs), (a, b) in zip(curves.items(), axes):
        for name, rounds in runs.items():
            done = [r for r in rounds if r.get("loss") is not None]
            a.plot([r["tokens"] for r in done], [r["loss"] for r in done], lw=0.8, label=name)
            pts = smoothed(rounds)
            b.plot([t for t, _ in pts], [y for _, y in pts], lw=1.2, label=name)
        a.set_xlabel("tokens")
        a.set_ylabel(f"training loss (slowdown {balance})")
        b.set_xlabel("wall-clock s (rounds end to end)")
        b.set_ylabel(f"{SMOOTH_ROUNDS}-round mean training loss")
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"{len(LAYOUT)} processes, {NUM_STAGES} stages x 2 replicas, skip paths ({VISITS} of "
                 f"{NUM_STAGES} stages), emulated GCP links: sync strategies")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def balances_option(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected slowdowns like 1,12, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("slowdowns must be positive")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (within 10 minutes on 2 cores)")
    ap.add_argument("--rounds", type=int, help=f"rounds per run (default: {QUICK_ROUNDS} quick, {DEFAULT_ROUNDS} "
                                               f"otherwise; a multiple of "
                                               f"H = {SYNC_EVERY} keeps outer's syncs whole)")
    ap.add_argument("--balances", type=balances_option, default=[1.0, LINK_SLOWDOWN],
                    help=f"link slowdowns to run at (default 1,{LINK_SLOWDOWN:g}: the links as given, and "
                         "bench_swarm's default)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset to run")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--workdir", help="node logs and models (default: a temp dir)")
    args = ap.parse_args()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    names = [s for s in args.strategies.split(",") if s]
    if unknown := set(names) - set(STRATEGIES):
        ap.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
    started = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sync-"))
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = split_corpus(work)
    unigram = unigram_loss(train, heldout)
    print(f"bench_sync: unigram byte model's held-out loss {unigram:.4f} nats/token; the baseline must end at or "
          f"below {UNIGRAM_MARGIN * unigram:.4f}", flush=True)
    report: dict = {"unigram_loss": unigram, "balances": {}, "projection": {}}
    curves: dict[str, dict[str, list[dict]]] = {}
    for slowdown in args.balances:
        key = f"{slowdown:g}"
        report["balances"][key], curves[key] = {}, {}
        for name in names:
            run_dir = work / f"{name}-x{key}"
            print(f"bench_sync: {name} at link slowdown {key}, {rounds} rounds, logs in {run_dir}", flush=True)
            result = run_config(run_dir, name, VISITS, rounds, train, layout=LAYOUT, num_stages=NUM_STAGES,
                                extra=STRATEGIES[name], timeout=300 + 20 * rounds, link_slowdown=slowdown)
            loss = math.log(evaluate(result.model_dir, heldout, num_stages=NUM_STAGES))
            report["balances"][key][name] = summarize(result, loss)
            curves[key][name] = result.rounds
            r = report["balances"][key][name]
            print(f"bench_sync: {name} x{key}: round {r['round_s']:.3f} s (predicted {fmt(r['predicted_round_s'])}), "
                  f"iteration {r['iteration_s']:.3f} s, sync {r['sync_s']:.3f} s and "
                  f"{r['sync_bytes_per_replica_round']:,.0f} B per replica per round, held-out loss {loss:.4f}",
                  flush=True)
    try:
        report["projection"], inputs = projection()
    except ImportError as e:  # routing/sync_cost.py not merged yet
        print(f"bench_sync: no projection: {e}", flush=True)
        inputs = None
    at_time = {k: equal_time(c) for k, c in curves.items() if len(c) > 1}
    lines = targets(report, at_time, short=rounds < DEFAULT_ROUNDS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out / "sync.png")
    missing = [f"{n} at {b}" for b, runs in report["balances"].items() for n, r in runs.items()
               if r["predicted_round_s"] is None]
    round_timeout = float(NODE_ARGS[NODE_ARGS.index("--round-timeout") + 1])
    stuck = [f"{n} at {b}: round {', '.join(map(str, found))}" for b, runs in curves.items()
             for n, rounds in runs.items() if (found := timed_out(rounds, round_timeout))]
    sections = [
        f"# Sync benchmark (`python bench/bench_sync.py{' --quick' if args.quick else ''}`)",
        f"{len(LAYOUT)} processes (layout {','.join(map(str, LAYOUT))}: {NUM_STAGES} stages x 2 replicas, the "
        f"data nodes are stage 0's), skip paths ({VISITS} of {NUM_STAGES} stages per microbatch), tiny LLaMA, "
        f"{rounds} rounds of 2 data nodes x 4 microbatches x 4 x 64 tokens, same seeds and tokens for every "
        f"strategy; links emulated from {INSTANCE.name}'s regions, bandwidth divided by the slowdown. Timing means "
        f"over rounds {WARMUP_ROUNDS}..{rounds - 1}; sync bytes (received from replicas, counted from frames) "
        f"over every round; outer syncs every {SYNC_EVERY} rounds with int8 pseudo-gradients. Held-out loss: "
        f"nats per byte token on {EVAL_SEQUENCES} windows of {EVAL_SEQ}; the unigram byte model (fit on the "
        f"training split, add-one smoothing) scores **{unigram:.4f}** on the same tokens, so the bar is "
        f"{UNIGRAM_MARGIN * unigram:.4f}. {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}, shared 2-core machine; the whole bench took "
        f"{time.monotonic() - started:.0f} s.",
        *[f"## Link slowdown {b}\n\n{balance_table(runs, curves[b])}" for b, runs in report["balances"].items()],
        "Predicted: the simulator's whole round (`predicted_round_s` in the round events), from the links and "
        "compute the swarm measured and the overhead its planner measured. Whole round: the round events' `round_s` "
        "(from the node's previous round's end: the plan's wait, the plan's work, the barrier and the sync; the "
        "slowest data node's), what the prediction predicts; round end to end: the mean spacing of the rounds' ends." + (f" Not in the events for {', '.join(missing)}: shown as -." if missing else "")
        + (f" **Rounds that ran into the {round_timeout:g} s round timeout** (in every mean above): {'; '.join(stuck)}."
           if stuck else ""),
        "## Projection: SkipPipe's GCP setting\n\n" + (projection_table(report["projection"], inputs) if inputs
                                                         else "Not computed: routing/sync_cost.py is missing."),
        "## Targets\n\n" + "\n".join(f"- {line}" for _, line in lines),
        "![loss against tokens and wall-clock, every strategy, each balance](sync.png)",
        "Reproduce: `python bench/bench_sync.py" + (" --quick" if args.quick else "")
        + f" --balances {','.join(report['balances'])} --json bench/results/sync.json`.",
    ]
    text = "\n\n".join(sections) + "\n"
    (out / "sync.md").write_text(text)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
