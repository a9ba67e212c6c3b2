"""SkipPipe end to end: a local swarm of real processes under emulated geo-distributed links, full pipeline vs skip.

    python bench/bench_swarm.py [--quick] [--json PATH] [--rounds N] [--out bench/results]

Both configurations run the same layout (8 processes, 6 stages: two data nodes, stage 1 twice, stages 2..5
once), the same seeds and the same tokens (same microbatches per round, same rounds). Each node's endpoint
sits in one Google Cloud region of bench/instances/gcp12-20nodes.json (node i in instance node i's region),
with that instance's latency and bandwidth between regions, emulated in the data plane
(`--emulate-links`), the bandwidth divided by `--link-slowdown` (default 12: see LINK_SLOWDOWN).
"full" visits all 6 stages; "skip" visits 4 of 6 (SkipPipe's ratio).

It reports, per configuration: mean iteration time measured (the slowest data node's time from starting a
round's plan to its last backward; averaging excluded) against the simulator's prediction for the plans it
ran with the links it had measured (both over the rounds after the first two); loss against tokens and
against wall-clock (one PNG); perplexity of the final model on held-out text, in full and with half of the
non-zero stages omitted. Writes bench/results/swarm.md and swarm.png.

The functions are the harness (`run_config`, `evaluate`, `emulation_file`), importable by other benches.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm.presets import PRESETS  # noqa: E402
from node.dataplane.link_emulation import place_endpoints  # noqa: E402
from node.process.local_swarm import LocalSwarm, free_port  # noqa: E402

INSTANCE = REPO / "bench" / "instances" / "gcp12-20nodes.json"
LAYOUT = (0, 0, 1, 1, 2, 3, 4, 5)  # stage of each process
NUM_STAGES = 6
SKIP_VISITS = 4
WARMUP_ROUNDS = 2  # excluded from the timing means: first plans run on default link estimates
# The tiny preset carries a token in 64 dims, a llama-160m in 768: its hops carry 12x fewer bytes for the same
# tokens. Dividing the links' bandwidth by that much gives each hop the time on the wire a llama-160m hop takes,
# so the wire takes its real share of a round (compute is not scaled: CPU compute of the tiny preset stands in).
LINK_SLOWDOWN = PRESETS["llama-160m"]["hidden_size"] / PRESETS["tiny"]["hidden_size"]
NODE_ARGS = ["--model", "tiny", "--microbatches", "4", "--max-inflight", "2", "--batch-size", "4", "--seq-len", "64",
             "--torch-threads", "1", "--device", "cpu", "--round-timeout", "120", "--seed", "0",
             "--links-refresh-rounds", "2", "--log-level", "warning"]


@dataclass
class ConfigResult:
    name: str
    visits: int
    rounds: list[dict] = field(default_factory=list)  # per round: tokens, loss, executed_s, predicted_s, time
    wall_s: float = 0.0
    model_dir: Path | None = None
    ppl: float = float("nan")
    ppl_omit: float = float("nan")
    node_rounds: dict[str, list[dict]] = field(default_factory=dict)  # every node's round events, by node name

    def mean(self, key: str) -> float:
        values = [r[key] for r in self.rounds[WARMUP_ROUNDS:] if r.get(key) is not None]
        return statistics.mean(values) if values else float("nan")


def link_slowdown_option(ap: argparse.ArgumentParser) -> None:
    """--link-slowdown, for every bench that runs this harness."""
    def positive(text: str) -> float:
        value = float(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value
    ap.add_argument("--link-slowdown", type=positive, default=LINK_SLOWDOWN,
                    help=f"divide the emulated links' bandwidth by this (default {LINK_SLOWDOWN:g}: llama-160m's hidden "
                         "size over the tiny preset's, so a hop spends a llama-160m hop's time on the wire)")


def split_corpus(workdir: Path, heldout_fraction: float = 0.05) -> tuple[Path, Path]:
    """The offline default corpus split into training text and held-out text (by position)."""
    from lm.data import default_corpus

    text = default_corpus()
    cut = int(len(text) * (1 - heldout_fraction))
    train, heldout = workdir / "train.txt", workdir / "heldout.txt"
    train.write_text(text[:cut])
    heldout.write_text(text[cut:])
    return train, heldout


def emulation_file(path: Path, endpoints: list[str], instance: Path = INSTANCE, slowdown: float = 1.0) -> Path:
    """Endpoint i sits in the region of the instance's node i; links between regions as the instance gives them,
    their bandwidth divided by `slowdown` (a bench whose tensors are k times smaller than a real model's
    passes k: each hop then spends the real model's time on the wire)."""
    spec = place_endpoints(json.loads(instance.read_text()), endpoints)
    for link in [*spec["links"], spec["same_location_link"]]:
        if link is not None:
            link["bandwidth_GiBps"] = link["bandwidth_GiBps"] / slowdown
    source = f"{instance.name}: regions, latency and bandwidth between them"
    if slowdown != 1:
        source += f", bandwidth divided by {slowdown:g}"
    path.write_text(json.dumps({"source": source, **spec}))
    return path


def run_config(workdir: Path, name: str, visits: int, rounds: int, train: Path, layout=LAYOUT,
               num_stages: int = NUM_STAGES, extra: list[str] | None = None, timeout: float = 900,
               link_slowdown: float = 1.0) -> ConfigResult:
    """Train one configuration on a fresh local swarm; returns per-round figures and the saved model."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in layout]
    links = emulation_file(workdir / "links.json", [f"127.0.0.1:{p}" for p in ports], slowdown=link_slowdown)
    model_dir = workdir / "model"
    swarm = LocalSwarm(workdir, swarm=f"bench-{name}", common_args=[
        *NODE_ARGS, "--num-stages", str(num_stages), "--visits", str(visits), "--rounds", str(rounds),
        "--min-nodes", str(len(layout)), "--emulate-links", str(links), "--data", str(train),
        "--save-model", str(model_dir), *(extra or [])])
    result = ConfigResult(name, visits, model_dir=model_dir)
    started = time.monotonic()
    try:
        first = swarm.start_node("node0", str(layout[0]), extra=["--port", str(ports[0])])
        swarm.wait_started([first], timeout=180)
        rest = [swarm.start_node(f"node{i}", str(s), extra=["--port", str(ports[i])],
                                 initial_peers=swarm.initial_peers()) for i, s in enumerate(layout[1:], 1)]
        swarm.wait_started(rest, timeout=300)
        deadline = time.monotonic() + timeout
        while any(n.alive() for n in swarm.nodes) and time.monotonic() < deadline:
            time.sleep(1.0)
    finally:
        swarm.stop()
    data_nodes = [n for n in swarm.nodes if n.stages == "0"]
    result.node_rounds = {n.name: n.events("round") for n in swarm.nodes}
    per_node = [{e["round"]: e for e in n.events("round")} for n in data_nodes]
    done = sorted(set.intersection(*(set(r) for r in per_node)))
    if len(done) < rounds:
        raise RuntimeError(f"{name}: only {len(done)} of {rounds} rounds finished; logs in {workdir}")
    t0 = min(p[done[0]]["time"] - p[done[0]]["wall_s"] for p in per_node)  # when the first round began
    tokens = 0
    for r in done:
        events = [p[r] for p in per_node]
        tokens += sum(e["tokens"] for e in events)
        losses = [e["loss"] for e in events if e["loss"] is not None]  # None: every microbatch of that node failed
        result.rounds.append({"round": r, "tokens": tokens, "loss": statistics.mean(losses) if losses else None,
                              "executed_s": max(e["executed_s"] for e in events),
                              "round_s": max(e["wall_s"] for e in events),  # plan work + barrier + averaging
                              # from the previous round's end, the plan's wait included: what predicted_round_s predicts
                              "whole_round_s": max(e.get("round_s", e["wall_s"]) for e in events),
                              "predicted_s": events[0]["predicted_s"],
                              "predicted_round_s": events[0].get("predicted_round_s"),  # None: not predicted
                              "time_s": max(e["time"] for e in events) - t0})
    result.wall_s = time.monotonic() - started
    if any(not (model_dir / f"model-stage-{s}.safetensors").is_file() for s in range(num_stages)):
        raise RuntimeError(f"{name}: the final model was not saved completely in {model_dir}")
    return result


def evaluate(model_dir: Path, heldout: Path, num_stages: int = NUM_STAGES, omit: set[int] = frozenset(),
             max_sequences: int = 256) -> float:
    """Perplexity of a saved model on held-out text (lm/whole.py, the code `swarm-node eval` runs)."""
    from lm.build import build_stage
    from lm.data import load_corpus
    from lm.presets import resolve_model
    from lm.tokenizer import load_tokenizer
    from lm.whole import perplexity

    tokenizer = load_tokenizer(None)
    spec = resolve_model(str(model_dir))
    stages = {s: build_stage(spec, s, num_stages) for s in range(num_stages)}
    return perplexity(stages, load_corpus([str(heldout)], None, tokenizer), 64, omit, max_sequences=max_sequences)


def half_of_nonzero_stages(num_stages: int) -> set[int]:
    """Every other non-zero stage, starting from the second: 2, 4 of 1..5 (half rounded down)."""
    return set(range(2, num_stages, 2))


def plot(results: list[ConfigResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        a.plot([x["tokens"] for x in r.rounds], [x["loss"] for x in r.rounds], marker=".", label=r.name)
        b.plot([x["time_s"] for x in r.rounds], [x["loss"] for x in r.rounds], marker=".", label=r.name)
    a.set_xlabel("tokens")
    b.set_xlabel("wall-clock s (rounds, averaging included)")
    for ax in (a, b):
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Local swarm of 8 processes under emulated GCP links: full pipeline vs skip (4 of 6 stages)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (fits 10 minutes on 2 cores)")
    ap.add_argument("--rounds", type=int, help="training rounds per configuration (default: 12 quick, 30 otherwise)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--workdir", help="node logs and models (default: a temp dir)")
    link_slowdown_option(ap)
    args = ap.parse_args()
    rounds = args.rounds or (12 if args.quick else 30)
    bench_started = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-swarm-"))
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = split_corpus(work)
    omit = half_of_nonzero_stages(NUM_STAGES)
    results = []
    for name, visits in (("full", NUM_STAGES), ("skip", SKIP_VISITS)):
        print(f"bench_swarm: {name} ({visits} of {NUM_STAGES} stages), {rounds} rounds, logs in {work / name}",
              flush=True)
        r = run_config(work / name, name, visits, rounds, train, link_slowdown=args.link_slowdown)
        r.ppl = evaluate(r.model_dir, heldout)
        r.ppl_omit = evaluate(r.model_dir, heldout, omit=omit)
        results.append(r)
        print(f"bench_swarm: {name}: iteration {r.mean('executed_s'):.3f} s (predicted {r.mean('predicted_s'):.3f}),"
              f" final loss {r.rounds[-1]['loss']:.4f}, ppl {r.ppl:.3f}, omitting {sorted(omit)} {r.ppl_omit:.3f}",
              flush=True)
    full, skip = results
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "swarm.png")
    summary = {r.name: {"iteration_s": r.mean("executed_s"), "predicted_iteration_s": r.mean("predicted_s"),
                        "final_loss": r.rounds[-1]["loss"], "ppl": r.ppl, "ppl_omit_half": r.ppl_omit,
                        "round_s": r.mean("round_s")}
               for r in results}
    summary["tokens"] = full.rounds[-1]["tokens"]
    rows = []
    for r in results:
        s = summary[r.name]
        rows.append(f"| {r.name} | {r.visits} of {NUM_STAGES} | {s['iteration_s']:.3f} | {s['predicted_iteration_s']:.3f} "
                    f"| {s['iteration_s'] / s['predicted_iteration_s']:.2f} | {s['iteration_s'] / summary['full']['iteration_s']:.2f} "
                    f"| {s['round_s']:.2f} "
                    f"| {s['final_loss']:.4f} | {s['ppl']:.3f} | {s['ppl_omit_half']:.3f} | {s['ppl_omit_half'] / s['ppl']:.3f} |")
    loss_ratio = skip.rounds[-1]["loss"] / full.rounds[-1]["loss"]
    # Equal wall-clock: each run's loss when the faster one ended (the last round done by then).
    t_end = min(full.rounds[-1]["time_s"], skip.rounds[-1]["time_s"])
    at_time = {r.name: [x["loss"] for x in r.rounds if x["time_s"] <= t_end][-1] for r in results}
    summary["equal_time_s"] = t_end
    summary["loss_at_equal_time"] = at_time
    table = "\n".join([
        "| config | stages visited | iteration s (measured) | predicted s | measured / predicted | vs full | "
        "whole round s (incl. averaging) | "
        f"final loss | ppl | ppl omitting {','.join(map(str, sorted(omit)))} | omission ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows])
    targets = "\n".join([
        f"- Prediction within 20%: full {summary['full']['iteration_s'] / summary['full']['predicted_iteration_s']:.2f}, "
        f"skip {summary['skip']['iteration_s'] / summary['skip']['predicted_iteration_s']:.2f} (measured / predicted).",
        f"- Speed, skip <= 0.6x full: {summary['skip']['iteration_s'] / summary['full']['iteration_s']:.2f}x.",
        f"- Convergence, skip's loss at equal tokens within 3% of full's: {loss_ratio:.3f} "
        f"({summary['tokens']} tokens each).",
        f"- Lower at equal wall-clock: after {t_end:.0f} s, skip {at_time['skip']:.4f} vs full {at_time['full']:.4f} "
        f"({at_time['skip'] / at_time['full']:.3f}x).",
        f"- Omission, ppl <= 1.10x own full: skip {summary['skip']['ppl_omit_half'] / summary['skip']['ppl']:.3f}, "
        f"full-trained {summary['full']['ppl_omit_half'] / summary['full']['ppl']:.3f}."])
    text = (f"# Local swarm benchmark (`python bench/bench_swarm.py{' --quick' if args.quick else ''}`)\n\n"
            f"{len(LAYOUT)} processes, {NUM_STAGES} stages (layout {','.join(map(str, LAYOUT))}), tiny LLaMA, "
            f"{rounds} rounds of 2 data nodes x 4 microbatches x 4 x 64 tokens, same seeds; links emulated from "
            f"{INSTANCE.name}'s regions, bandwidth divided by {args.link_slowdown:g} (`--link-slowdown`). "
            f"Means over rounds {WARMUP_ROUNDS}..{rounds - 1}. "
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, shared 2-core "
            f"machine; the whole bench took {time.monotonic() - bench_started:.0f} s.\n\n{table}\n\n{targets}\n\n![loss vs tokens and wall-clock](swarm.png)\n")
    (out / "swarm.md").write_text(text)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
