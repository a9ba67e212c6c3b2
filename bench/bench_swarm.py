"""SkipPipe end to end: a local swarm of real processes under emulated geo-distributed links, full pipeline vs skip.

    python bench/bench_swarm.py [--quick] [--seeds N] [--rounds N] [--timing-rounds N] [--json PATH]

Both configurations run the same layout (8 processes, 6 stages: two data nodes, stage 1 twice, stages 2..5
once), the same seeds and the same tokens. Each node's endpoint sits in one Google Cloud region of
bench/instances/gcp12-20nodes.json (node i in instance node i's region), with that instance's latency and
bandwidth between regions, emulated in the data plane (`--emulate-links`). "full" visits all 6 stages; "skip"
visits 4 of 6 (SkipPipe's ratio).

Two balances between wire and compute, side by side in one run:
- links as given (slowdown 1): the instance's links carrying the tiny preset's small activations, so compute,
  shared by 8 processes on 2 cores, dominates. The learning runs use this balance: `--rounds` rounds for each
  of `--seeds` seeds, long enough that the full pipeline's held-out loss ends at least 25% below a unigram
  byte model's (the bench computes that reference on the same held-out text and says whether it was reached).
- `--link-slowdown` (default 12, see LINK_SLOWDOWN): the bandwidth divided so that a hop spends a llama-160m
  hop's time on the wire, compute unscaled. Timing runs only (`--timing-rounds` rounds per seed).

It reports, per balance and configuration: mean iteration time measured (the slowest data node's time from
starting a round's plan to its last backward; averaging excluded) against two predictions, the in-run one
(the simulator on the links and compute the swarm measured) and an independent one (the same simulator, the
same plans, the instance's static links and each node's start-up compute probe); CPU seconds per round of
each process beside the wall time; tokens and failed microbatches. From the learning runs: held-out loss and
perplexity of the final model, in full and with half of the non-zero stages omitted, against a random-init
control; means with 95% t intervals over seeds. Writes bench/results/swarm.md and swarm.png.

The functions are the harness (`run_config`, `evaluate`, `emulation_file`, `mean_ci`), importable by other
benches.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm.presets import PRESETS  # noqa: E402
from node.dataplane.link_emulation import LinkEmulator, place_endpoints  # noqa: E402
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
LEARNING_ROUNDS = 200  # one optimizer step per round: a lone tiny model needs about 150 to pass the bar below
UNIGRAM_MARGIN = 0.75  # learning is judged only once the full pipeline's held-out loss ends at most this x unigram's
EVAL_SEQ, EVAL_SEQUENCES = 64, 256  # what `evaluate` (lm/whole.perplexity) reads of the held-out text
NODE_ARGS = ["--model", "tiny", "--microbatches", "4", "--max-inflight", "2", "--batch-size", "4", "--seq-len", "64",
             "--torch-threads", "1", "--device", "cpu", "--round-timeout", "120",
             "--links-refresh-rounds", "2", "--log-level", "warning"]
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, list[float] | None]:
    """The mean and its 95% Student t interval over seeds (None from a single seed, or where one is not a number)."""
    mean = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return mean, None
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, [mean - half, mean + half]


@dataclass
class ConfigResult:
    name: str
    visits: int
    rounds: list[dict] = field(default_factory=list)  # per round: tokens, loss, executed_s, predicted_s, time
    wall_s: float = 0.0
    model_dir: Path | None = None
    ppl: float = float("nan")
    ppl_omit: float = float("nan")
    node_events: dict[str, list[dict]] = field(default_factory=dict)  # every node's events, by node name
    endpoints: dict[str, str] = field(default_factory=dict)  # node name -> its endpoint
    links: Path | None = None  # the emulation file the swarm ran under

    @property
    def node_rounds(self) -> dict[str, list[dict]]:
        """Every node's round events, by node name."""
        return {name: [e for e in events if e.get("event") == "round"] for name, events in self.node_events.items()}

    def mean(self, key: str) -> float:
        values = [r[key] for r in self.rounds[WARMUP_ROUNDS:] if r.get(key) is not None]
        return statistics.mean(values) if values else float("nan")

    def cpu_s_per_round(self) -> dict[str, float]:
        """CPU seconds each node process spent per round, over the rounds after the warm-up (the process's own
        clock, every thread; not its DHT child process or p2pd)."""
        out = {}
        for name, events in self.node_rounds.items():
            timed = [e for e in events if e.get("cpu_s") is not None][WARMUP_ROUNDS:]
            if len(timed) >= 2:
                out[name] = (timed[-1]["cpu_s"] - timed[0]["cpu_s"]) / (len(timed) - 1)
        return out

    def wall_s_per_round(self) -> float:
        """Wall seconds per round over the same rounds as cpu_s_per_round (the slowest data node's clock)."""
        times = [r["time_s"] for r in self.rounds[WARMUP_ROUNDS:]]
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else float("nan")


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


def unigram_loss(train: Path, heldout: Path, seq_len: int = EVAL_SEQ, max_sequences: int = EVAL_SEQUENCES) -> float:
    """Held-out cross-entropy (nats per token) of byte frequencies fit on the training text, add-one smoothed over
    the tokenizer's vocabulary, on the very tokens `evaluate` scores (each window's tokens after its first): the
    level below which a model has learned more than token frequencies."""
    from lm.data import load_corpus
    from lm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    counts = Counter(load_corpus([str(train)], None, tokenizer).tokens.tolist())
    scored = load_corpus([str(heldout)], None, tokenizer).windows(seq_len, max_sequences)[:, 1:].reshape(-1).tolist()
    return unigram_cross_entropy(counts, scored, tokenizer.vocab_size)


def unigram_cross_entropy(counts: Counter, scored: list[int], vocab_size: int) -> float:
    total = sum(counts.values()) + vocab_size
    return -statistics.fmean(math.log((counts[t] + 1) / total) for t in scored)


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
               link_slowdown: float = 1.0, seed: int = 0) -> ConfigResult:
    """Train one configuration on a fresh local swarm; returns per-round figures and the saved model."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in layout]
    links = emulation_file(workdir / "links.json", [f"127.0.0.1:{p}" for p in ports], slowdown=link_slowdown)
    model_dir = workdir / "model"
    swarm = LocalSwarm(workdir, swarm=f"bench-{name}", common_args=[
        *NODE_ARGS, "--seed", str(seed), "--num-stages", str(num_stages), "--visits", str(visits),
        "--rounds", str(rounds), "--min-nodes", str(len(layout)), "--emulate-links", str(links), "--data", str(train),
        "--save-model", str(model_dir), *(extra or [])])
    result = ConfigResult(name, visits, model_dir=model_dir, links=links)
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
    result.node_events = {n.name: n.events() for n in swarm.nodes}
    result.endpoints = {n.name: f"127.0.0.1:{p}" for n, p in zip(swarm.nodes, ports)}
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
                              "failed": sum(e.get("failed", 0) for e in events),
                              "executed_s": max(e["executed_s"] for e in events),
                              "round_s": max(e["wall_s"] for e in events),  # plan work + barrier + averaging
                              # from the previous round's end, the plan's wait included: what predicted_round_s predicts
                              "whole_round_s": max(e.get("round_s", e["wall_s"]) for e in events),
                              "predicted_s": events[0]["predicted_s"],
                              "predicted_round_s": events[0].get("predicted_round_s"),  # None: not predicted
                              "plan": events[0].get("plan"),
                              "time_s": max(e["time"] for e in events) - t0})
    result.wall_s = time.monotonic() - started
    if any(not (model_dir / f"model-stage-{s}.safetensors").is_file() for s in range(num_stages)):
        raise RuntimeError(f"{name}: the final model was not saved completely in {model_dir}")
    return result


def independent_predictions(result: ConfigResult) -> list[float | None]:
    """Per round, the simulator's iteration time for the plan the swarm ran, with none of the run's
    measurements: links from the emulation file (the instance's static latency and bandwidth) and each node's
    compute from its start-up probe (the forward it timed before joining, in its `serving` event). None for a
    round whose planned problem was not logged."""
    from node.control.planning import SAME_HOST_LINK_S, from_wire
    from protocol.records import RoundPlan
    from routing import LiveLink, LiveNode, from_live, simulate
    from routing.instance_io import problem_from_dict

    if result.links is None:  # not run under emulated links
        return [None] * len(result.rounds)
    endpoint_of, probe = {}, {}  # peer id -> endpoint, -> {stage: forward s}
    for name, events in result.node_events.items():
        serving = next((e for e in events if e.get("event") == "serving"), None)
        if serving is not None:
            endpoint_of[serving["peer_id"]] = result.endpoints[name]
            probe[serving["peer_id"]] = {int(s): v for s, v in serving["compute_probe_s"].items()}
    planned = {e["round"]: e for events in result.node_events.values() for e in events
               if e.get("event") == "planned" and e.get("problem")}
    emulator = LinkEmulator.load(result.links)
    out: list[float | None] = []
    for r in result.rounds:
        made = planned.get(r["round"])
        if made is None or r.get("plan") is None:
            out.append(None)
            continue
        logged = problem_from_dict(made["problem"])
        nodes, peers = [], {}
        for k, node_id in enumerate(logged.node_ids):
            peer, stage = str(node_id).rsplit("/", 1)
            peers.setdefault(peer, []).append(str(node_id))
            nodes.append(LiveNode(str(node_id), compute_s=probe[peer][int(stage)], memory=int(logged.memory[k]),
                                  stage=int(stage)))
        links = []
        for a in sorted(peers):
            emulator.bind(endpoint_of[a])
            for b in sorted(peers):
                if a < b:
                    link = emulator.link_to(endpoint_of[b])
                    links += [LiveLink(x, y, 2 * link.latency_s, link.bandwidth_Bps) for x in peers[a] for y in peers[b]]
        problem = from_live(nodes, links, stages=logged.stages, visits=logged.visits,
                            activation_bytes=made["activation_bytes"],
                            microbatches_per_data_node=logged.microbatches_per_data_node, max_swaps=logged.max_swaps,
                            missing_link_s=SAME_HOST_LINK_S)
        out.append(simulate(problem, from_wire(problem, RoundPlan.from_value(r["plan"])).paths).makespan)
    return out


def evaluate(model_dir: Path | None, heldout: Path, num_stages: int = NUM_STAGES, omit: set[int] = frozenset(),
             max_sequences: int = EVAL_SEQUENCES, seed: int = 0) -> float:
    """Perplexity on held-out text (lm/whole.py, the code `swarm-node eval` runs) of a saved model, or with
    `model_dir` None of the tiny preset as `--seed` initialises it (the random-init control)."""
    from lm.build import build_stage
    from lm.data import load_corpus
    from lm.presets import resolve_model
    from lm.tokenizer import load_tokenizer
    from lm.whole import perplexity

    tokenizer = load_tokenizer(None)
    spec = resolve_model(str(model_dir) if model_dir is not None else "tiny", vocab_size=tokenizer.vocab_size)
    stages = {s: build_stage(spec, s, num_stages, seed=seed) for s in range(num_stages)}
    return perplexity(stages, load_corpus([str(heldout)], None, tokenizer), EVAL_SEQ, omit, max_sequences=max_sequences)


def half_of_nonzero_stages(num_stages: int) -> set[int]:
    """Every other non-zero stage, starting from the second: 2, 4 of 1..5 (half rounded down)."""
    return set(range(2, num_stages, 2))


def plot(runs: dict[str, list[ConfigResult]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for color, (name, seeds) in zip(("tab:blue", "tab:orange"), runs.items()):
        for k, r in enumerate(seeds):
            label = name if k == 0 else None
            a.plot([x["tokens"] for x in r.rounds], [x["loss"] for x in r.rounds], color=color, alpha=0.7, lw=1,
                   label=label)
            b.plot([x["time_s"] for x in r.rounds], [x["loss"] for x in r.rounds], color=color, alpha=0.7, lw=1,
                   label=label)
    a.set_xlabel("tokens")
    b.set_xlabel("wall-clock s (rounds, averaging included)")
    for ax in (a, b):
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def timing_figures(seeds: list[ConfigResult], full: list[ConfigResult] | None) -> dict:
    """One configuration's figures at one balance: means over seeds (95% t intervals where a target reads them)."""
    iteration, iteration_ci = mean_ci([r.mean("executed_s") for r in seeds])
    independent = []
    for r in seeds:
        values = [v for v in independent_predictions(r)[WARMUP_ROUNDS:] if v is not None]
        independent.append(statistics.fmean(values) if values else float("nan"))
    cpu = [r.cpu_s_per_round() for r in seeds]
    figures = {
        "iteration_s": iteration, "iteration_s_ci": iteration_ci,
        "predicted_iteration_s": statistics.fmean(r.mean("predicted_s") for r in seeds),
        "independent_iteration_s": statistics.fmean(independent),
        "measured_over_predicted": mean_ci([r.mean("executed_s") / r.mean("predicted_s") for r in seeds]),
        "measured_over_independent": mean_ci([r.mean("executed_s") / p for r, p in zip(seeds, independent)]),
        "round_s": statistics.fmean(r.mean("round_s") for r in seeds),
        "wall_s_per_round": statistics.fmean(r.wall_s_per_round() for r in seeds),
        "cpu_s_per_round": {n: statistics.fmean(c[n] for c in cpu if n in c) for n in sorted(cpu[0])},
        "tokens": seeds[0].rounds[-1]["tokens"],
        "failed": sum(x["failed"] for r in seeds for x in r.rounds),
        "rounds": len(seeds[0].rounds), "seeds": len(seeds),
    }
    figures["cpu_s_per_round_total"] = sum(figures["cpu_s_per_round"].values())
    if full is not None:
        ratio, ratio_ci = mean_ci([r.mean("executed_s") / f.mean("executed_s") for r, f in zip(seeds, full)])
        figures.update(vs_full=ratio, vs_full_ci=ratio_ci)
    return figures


def learning_figures(seeds: list[ConfigResult], full: list[ConfigResult] | None) -> dict:
    """One configuration's held-out figures over the learning runs' seeds."""
    losses = [math.log(r.ppl) for r in seeds]
    loss, loss_ci = mean_ci(losses)
    figures = {"final_loss": statistics.fmean(r.rounds[-1]["loss"] for r in seeds),
               "heldout_loss": loss, "heldout_loss_ci": loss_ci,
               "ppl": statistics.fmean(r.ppl for r in seeds), "ppl_omit_half": statistics.fmean(r.ppl_omit for r in seeds)}
    figures["omission_ratio"], figures["omission_ratio_ci"] = mean_ci([r.ppl_omit / r.ppl for r in seeds])
    if full is not None:
        figures["heldout_loss_ratio"], figures["heldout_loss_ratio_ci"] = mean_ci(
            [math.log(r.ppl) / math.log(f.ppl) for r, f in zip(seeds, full)])
    return figures


def verdict(mean: float, ci: list[float] | None, at_most: float) -> str:
    """A target 'at most X' judged at the interval's upper edge (a mean alone is not enough)."""
    if not math.isfinite(mean):
        return "NOT measured"
    if mean > at_most:
        return "NOT met"
    if ci is not None and ci[1] > at_most:
        return "met at the mean, NOT at the interval's upper edge"
    return "met" if ci is not None else "met (one seed: no interval)"


def fmt(mean: float, ci: list[float] | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" + (f" ({ci[0]:.{digits}f}-{ci[1]:.{digits}f})" if ci else "")


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM as SIGINT: the running swarm's `finally` stops its nodes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 40 learning rounds, 6 timing rounds, 2 seeds (too short to learn; it says so)")
    ap.add_argument("--rounds", type=int, help=f"learning rounds per configuration and seed, links as given "
                                                f"(default {LEARNING_ROUNDS}; --quick 40)")
    ap.add_argument("--timing-rounds", type=int, help="rounds per configuration and seed at --link-slowdown "
                                                      "(default 12; --quick 6)")
    ap.add_argument("--seeds", type=int, help="seeds (model init and data) per configuration (default 3; --quick 2)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--workdir", help="node logs and models (default: a temp dir)")
    ap.add_argument("--from-json", metavar="PATH", help="no swarm: write swarm.md again from the figures a run wrote "
                                                        "with --json (swarm.png is left as it is)")
    link_slowdown_option(ap)
    args = ap.parse_args()
    omit = half_of_nonzero_stages(NUM_STAGES)
    if args.from_json:
        summary = json.loads(Path(args.from_json).read_text())
        text = render(summary, omit)
        (Path(args.out) / "swarm.md").write_text(text)
        print(text)
        return 0
    rounds = args.rounds or (40 if args.quick else LEARNING_ROUNDS)
    timing_rounds = args.timing_rounds or (6 if args.quick else 12)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    for what, value in (("--rounds", rounds), ("--timing-rounds", timing_rounds)):
        if value < WARMUP_ROUNDS + 2:  # CPU and wall time per round are read between two rounds after those
            ap.error(f"{what} must be at least {WARMUP_ROUNDS + 2}: {WARMUP_ROUNDS} warm-up rounds, then two timed")
    if not seeds:
        ap.error("--seeds must be at least 1")
    signal.signal(signal.SIGTERM, _interrupted)
    bench_started = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-swarm-"))
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = split_corpus(work)
    unigram = unigram_loss(train, heldout)
    print(f"bench_swarm: unigram byte model's held-out loss {unigram:.4f} (ppl {math.exp(unigram):.2f}); learning is "
          f"judged once full's ends at or below {UNIGRAM_MARGIN * unigram:.4f}", flush=True)
    configs = (("full", NUM_STAGES), ("skip", SKIP_VISITS))
    balances = {1.0: rounds}  # the learning runs, links as given
    if args.link_slowdown != 1:
        balances[args.link_slowdown] = timing_rounds
    runs: dict[float, dict[str, list[ConfigResult]]] = {b: {name: [] for name, _ in configs} for b in balances}
    for balance, n_rounds in balances.items():
        for seed in seeds:
            for name, visits in configs:
                where = work / f"slowdown{balance:g}" / f"{name}-seed{seed}"
                print(f"bench_swarm: {name} ({visits} of {NUM_STAGES} stages), slowdown {balance:g}, seed {seed}, "
                      f"{n_rounds} rounds, logs in {where}", flush=True)
                r = run_config(where, name, visits, n_rounds, train, link_slowdown=balance, seed=seed,
                               timeout=120 + 60 * n_rounds)
                if balance == 1.0:
                    r.ppl = evaluate(r.model_dir, heldout)
                    r.ppl_omit = evaluate(r.model_dir, heldout, omit=omit)
                runs[balance][name].append(r)
                print(f"bench_swarm: {name}: iteration {r.mean('executed_s'):.3f} s (predicted {r.mean('predicted_s'):.3f})"
                      f", final loss {r.rounds[-1]['loss']:.4f}"
                      + (f", held-out loss {math.log(r.ppl):.4f}, ppl {r.ppl:.3f}, omitting {sorted(omit)} "
                         f"{r.ppl_omit:.3f}" if balance == 1.0 else ""), flush=True)
    random_ppl = [evaluate(None, heldout, seed=s) for s in seeds]
    random_omit = [evaluate(None, heldout, omit=omit, seed=s) for s in seeds]

    summary = summarize(runs, f"{args.link_slowdown:g}", unigram, random_ppl, random_omit,
                        seeds=seeds, rounds=rounds, timing_rounds=timing_rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs[1.0], out / "swarm.png", f"Local swarm of 8 processes, links as given: full pipeline vs skip "
                                       f"(4 of 6 stages), {len(seeds)} seeds")
    summary.update(quick=args.quick, bench_s=round(time.monotonic() - bench_started))
    text = render(summary, omit)
    (out / "swarm.md").write_text(text)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def summarize(runs: dict[float, dict[str, list[ConfigResult]]], default: str, unigram: float, random_ppl: list[float],
              random_omit: list[float], *, seeds: list[int], rounds: int, timing_rounds: int) -> dict:
    """The --json figures from every run: `runs[balance][config]` lists one result per seed; balance 1 holds the
    learning runs (their perplexities filled in), `default` names the balance whose timings lead."""
    configs = ("full", "skip")
    per_balance = {f"{balance:g}": {name: timing_figures(by_config[name], None if name == "full" else by_config["full"])
                                    for name in configs}
                   for balance, by_config in runs.items()}
    learning = {name: learning_figures(runs[1.0][name], None if name == "full" else runs[1.0]["full"])
                for name in configs}
    random_init = {"ppl": statistics.fmean(random_ppl), "ppl_omit_half": statistics.fmean(random_omit),
                   "heldout_loss": statistics.fmean(math.log(p) for p in random_ppl)}
    random_init["omission_ratio"], random_init["omission_ratio_ci"] = mean_ci(
        [o / p for o, p in zip(random_omit, random_ppl)])
    # Equal wall-clock, links as given: each seed's training losses when the faster run of its pair ended.
    pairs = list(zip(runs[1.0]["full"], runs[1.0]["skip"]))
    at_time: dict[str, list[float]] = {name: [] for name in configs}
    for pair in pairs:
        t_end = min(r.rounds[-1]["time_s"] for r in pair)
        for name, r in zip(configs, pair):
            at_time[name].append([x["loss"] for x in r.rounds if x["time_s"] <= t_end][-1])
    summary = {name: {**per_balance[default][name], **learning[name]} for name in configs}
    summary.update(tokens=summary["full"]["tokens"], unigram_loss=unigram, seeds=seeds, learning_rounds=rounds,
                   timing_rounds=timing_rounds, learned=learning["full"]["heldout_loss"] <= UNIGRAM_MARGIN * unigram,
                   random_init=random_init,
                   equal_time_s=statistics.fmean(min(r.rounds[-1]["time_s"] for r in pair) for pair in pairs),
                   equal_time_loss_ratio=mean_ci([s / f for f, s in zip(at_time["full"], at_time["skip"])]),
                   loss_at_equal_time={n: statistics.fmean(v) for n, v in at_time.items()},
                   balances={b: {name: {**figures, **(learning[name] if b == "1" else {})}
                                 for name, figures in by_config.items()}
                             for b, by_config in per_balance.items()})
    return summary


def render(summary: dict, omit: set[int]) -> str:
    unigram, random_init = summary["unigram_loss"], summary["random_init"]
    learning, per_balance = summary["balances"]["1"], summary["balances"]
    bar = UNIGRAM_MARGIN * unigram
    timing_rows = []
    for balance, figures in per_balance.items():
        for name in ("full", "skip"):
            f = figures[name]
            cpu = f["cpu_s_per_round"]
            timing_rows.append([
                "links as given" if balance == "1" else f"bandwidth / {balance}", name, f["rounds"], f["seeds"],
                fmt(f["iteration_s"], f["iteration_s_ci"]), f"{f['predicted_iteration_s']:.3f}",
                f"{f['independent_iteration_s']:.3f}", fmt(*f["measured_over_predicted"], 2),
                fmt(*f["measured_over_independent"], 2), fmt(f["vs_full"], f["vs_full_ci"], 2) if "vs_full" in f else "1",
                f"{f['wall_s_per_round']:.2f}", f"{f['cpu_s_per_round_total']:.2f}", f"{max(cpu.values()):.2f}",
                f["tokens"], f["failed"]])
    learning_rows = [[name, fmt(f["heldout_loss"], f["heldout_loss_ci"], 4), f"{f['ppl']:.2f}",
                      f"{f['ppl_omit_half']:.2f}", fmt(f["omission_ratio"], f["omission_ratio_ci"])]
                     for name, f in learning.items()]
    learning_rows.append(["random init (control)", f"{random_init['heldout_loss']:.4f}", f"{random_init['ppl']:.2f}",
                          f"{random_init['ppl_omit_half']:.2f}",
                          fmt(random_init["omission_ratio"], random_init["omission_ratio_ci"])])
    targets = [f"- Learning first: full's held-out loss {learning['full']['heldout_loss']:.4f} against the bar "
               f"{bar:.4f} (25% below the unigram byte model's {unigram:.4f}): "
               + ("reached, so the learning targets below are judged." if summary["learned"] else
                  "NOT reached: the learning targets below are not judged (train longer).")]
    for balance, figures in per_balance.items():
        where = "links as given" if balance == "1" else f"bandwidth / {balance}"
        for name in ("full", "skip"):
            f = figures[name]
            for label, key in (("in-run", "measured_over_predicted"), ("independent", "measured_over_independent")):
                mean, ci = f[key]
                ok = abs(mean - 1) <= 0.2 and (ci is None or (ci[0] >= 0.8 and ci[1] <= 1.2))
                targets.append(f"- Prediction within 20%, {where}, {name}, {label}: measured / predicted "
                               f"{fmt(mean, ci, 2)} -> {'met' if ok else 'NOT met'}.")
        skip = figures["skip"]
        targets.append(f"- Speed, skip <= 0.6x full, {where}: {fmt(skip['vs_full'], skip['vs_full_ci'], 2)} -> "
                       f"{verdict(skip['vs_full'], skip['vs_full_ci'], 0.6)}.")
    if summary["learned"]:
        skip = learning["skip"]
        targets.append(f"- Convergence, skip's held-out loss at equal tokens within 3% of full's: "
                       f"{fmt(skip['heldout_loss_ratio'], skip['heldout_loss_ratio_ci'])} -> "
                       f"{verdict(skip['heldout_loss_ratio'], skip['heldout_loss_ratio_ci'], 1.03)} "
                       f"({learning['full']['tokens']} tokens each).")
        ratio, ratio_ci = summary["equal_time_loss_ratio"]
        targets.append(f"- Lower at equal wall-clock, links as given: after {summary['equal_time_s']:.0f} s, skip's "
                       f"training loss over full's {fmt(ratio, ratio_ci)} -> {verdict(ratio, ratio_ci, 1.0)}.")
        targets.append(f"- Omission, ppl <= 1.10x own full (SkipPipe: about +7%): skip-trained "
                       f"{fmt(skip['omission_ratio'], skip['omission_ratio_ci'])} -> "
                       f"{verdict(skip['omission_ratio'], skip['omission_ratio_ci'], 1.10)}; the full-trained model "
                       f"must show the harm: {fmt(learning['full']['omission_ratio'], learning['full']['omission_ratio_ci'])}"
                       f"; random init {random_init['omission_ratio']:.3f}.")
    header = ["balance", "config", "rounds", "seeds", "iteration s", "predicted s (in-run)",
              "predicted s (independent)", "measured / in-run", "measured / independent", "vs full",
              "wall s / round", "CPU s / round (8 processes)", "CPU s / round (busiest)", "tokens", "failed"]
    return "\n".join([
        f"# Local swarm benchmark (`python bench/bench_swarm.py{' --quick' if summary.get('quick') else ''}`)", "",
        f"{len(LAYOUT)} processes, {NUM_STAGES} stages (layout {','.join(map(str, LAYOUT))}), tiny LLaMA, rounds of "
        f"2 data nodes x 4 microbatches x 4 x 64 tokens (one optimizer step each); links emulated from "
        f"{INSTANCE.name}'s regions. Links as given: {summary['learning_rounds']} rounds per seed, the learning runs. "
        f"Bandwidth divided: {summary['timing_rounds']} rounds per seed, timing only. Seeds "
        f"{', '.join(map(str, summary['seeds']))}; means over seeds with 95% t intervals; timings over rounds "
        f"{WARMUP_ROUNDS}.. of each run. {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}, shared 2-core machine"
        + (f"; the whole bench took {summary['bench_s']:.0f} s." if "bench_s" in summary else "."), "",
        table(header, timing_rows), "",
        f"Held-out text: the last 5% of the corpus; unigram byte model {unigram:.4f} nats (ppl {math.exp(unigram):.2f}); "
        f"omitting stages {','.join(map(str, sorted(omit)))}.", "",
        table(["model", "held-out loss (nats)", "ppl", f"ppl omitting {','.join(map(str, sorted(omit)))}",
               "omission ratio"], learning_rows), "",
        *targets, "", "![loss vs tokens and wall-clock](swarm.png)", ""])


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


if __name__ == "__main__":
    sys.exit(main())
