"""Churn benchmark: a loopback swarm loses and regains nodes, then runs as long again without churn.

    python bench/bench_churn.py [--rounds 300] [--quick]

Swarm: one data node and two replicas each of stages 1 and 2 (full pipelines), every node with its own
identity and --checkpoint-dir. Churn phase: every 5-10 rounds (counted once the previous victim is back)
a random non-origin node is killed with SIGKILL (its whole process group, as when a host dies) while it
holds activations of the round in flight (its `swarm_node_activation_microbatches` gauge is above 0; a node
the plans leave idle is passed over for another), and restarted with the same identity and checkpoint
directory; the churn phase lasts --rounds rounds with every node up (the rounds that pass while a victim
restarts come on top). Soak phase: as many rounds without churn.

Reports, measured in this one run:
- rounds lost: a round number missing from the data node's history, a round with failed microbatches (those
  the origin never started included), or one that trained fewer tokens than planned;
- the delay each kill added: the wall time of the round it hit (the data node's round when the kill landed)
  minus the soak's median round;
- RSS and open file descriptors of the long-lived data node over time (after warm-up, ratio end/start);
- the soak's slowest round relative to its median;
- processes left after the swarm stopped: every process on the machine whose environment carries this run's
  tag (so orphans count, whatever their parent), and every pid seen in a node's tree whose start time still
  matches.
Writes bench/results/churn.md, churn.json and churn.png (loss and RSS against rounds, kills marked).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.process.local_swarm import LocalSwarm, NodeProcess  # noqa: E402
from tests.helpers import alive, descendants, metric  # noqa: E402

LAYOUT = [("data", "0"), ("s1a", "1"), ("s1b", "1"), ("s2a", "2"), ("s2b", "2")]
# Microbatches of 8 x 128 tokens: a round takes about a second, as in the 6-node swarm issue 8 measured
# (1.7 s); with a quarter-second round one scheduling hiccup on shared cores doubles a round.
MICROBATCHES, BATCH, SEQ = 4, 8, 128
PLANNED_TOKENS = MICROBATCHES * BATCH * SEQ  # what a whole round trains on
RUN_TAG = "BENCH_CHURN_RUN"  # an environment variable every process of the run inherits (not SWARM_NODE_*: those are settings)
HOLD_WAIT_S = 30  # how long a chosen victim may stay without activations before another node is chosen
COMMON = ["--num-stages", "3", "--microbatches", str(MICROBATCHES), "--max-inflight", "4", "--torch-threads", "1",
          "--batch-size", str(BATCH), "--seq-len", str(SEQ),
          "--device", "cpu", "--round-timeout", "60", "--heartbeat-interval", "1", "--record-ttl", "20",
          "--checkpoint-every", "5"]


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), from /proc; None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tagged(tag: str) -> list[int]:
    """Every live process whose environment holds RUN_TAG=tag: the whole tree a run started, orphans included."""
    marker = f"{RUN_TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:  # gone, or not ours to read
                pass
    return sorted(found)


def holds_activations(node: NodeProcess) -> bool:
    try:
        return metric(node, "swarm_node_activation_microbatches", timeout=2) > 0
    except OSError:
        return False


class Churn:
    def __init__(self, workdir: Path, seed: int):
        self.workdir = workdir
        self.swarm = LocalSwarm(workdir, "churn-bench", common_args=COMMON)
        self.rng = random.Random(seed)
        self.by_name: dict[str, NodeProcess] = {}
        self.pids_seen: dict[int, int] = {}  # pid -> its start time: a pid the kernel reuses later is not ours
        self.kills: list[dict] = []
        self.samples: list[dict] = []

    def start(self, name: str, stage: str, run: int = 0) -> NodeProcess:
        extra = ["--checkpoint-dir", str(self.workdir / f"{name}.ckpt"),
                 "--identity-path", str(self.workdir / f"{name}.key")]
        peers = self.swarm.initial_peers() if any(n.alive() for n in self.swarm.nodes) else None
        node = self.swarm.start_node(f"{name}.{run}", stage, extra=extra, initial_peers=peers)
        self.by_name[name] = node
        return node

    def data(self) -> NodeProcess:
        return self.by_name["data"]

    def rounds(self) -> dict[int, dict]:
        return {e["round"]: e for e in self.data().events("round")}

    def note_processes(self) -> None:
        for node in self.swarm.nodes:
            if node.alive():
                for pid in [node.process.pid, *descendants(node.process.pid)]:
                    self.pids_seen.setdefault(pid, start_time(pid))

    def sample(self) -> None:
        data = self.data()
        rounds = self.rounds()
        self.samples.append({"time": time.time(), "round": max(rounds, default=-1),
                             "rss_mb": rss_mb(data.process.pid), "fds": fds(data.process.pid)})

    def wait_rounds(self, target: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while max(self.rounds(), default=-1) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {target} not reached in {timeout:.0f}s; logs in {self.workdir}")
            self.sample()
            self.note_processes()
            time.sleep(1.0)

    def live_round(self) -> int:
        return int(metric(self.data(), "swarm_node_round ", timeout=5))  # the gauge alone, not its siblings

    def choose_victim(self) -> str:
        """A random non-origin node, caught while it holds activations; another one if the plans leave it idle."""
        candidates = [n for n, _ in LAYOUT if n != "data"]
        while True:
            name = self.rng.choice(candidates)
            deadline = time.monotonic() + HOLD_WAIT_S
            while time.monotonic() < deadline:
                if holds_activations(self.by_name[name]):
                    return name
                time.sleep(0.02)
            print(f"  {name} held no activations for {HOLD_WAIT_S}s; choosing again", flush=True)

    def kill_and_restart(self) -> None:
        self.note_processes()
        name = self.choose_victim()
        stage = dict(LAYOUT)[name]
        victim = self.by_name[name]
        at = self.live_round()  # the round the kill hits: the one the data node is working on
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        killed = time.time()
        run = sum(1 for k in self.kills if k["node"] == name) + 1
        node = self.start(name, stage, run)
        self.swarm.wait_started([node], timeout=300)
        # back: it trains (or catches up) a round
        while not [e for e in node.events() if e["event"] in ("round", "caught_up")]:
            self.sample()
            time.sleep(0.5)
        self.kills.append({"node": name, "round": at, "time": killed, "back_s": round(time.time() - killed, 1),
                           "sources": [e["source"] for e in node.events("stage_recovered")]})
        print(f"  killed {name} in round {at}; back after {self.kills[-1]['back_s']}s "
              f"(loaded from {', '.join(self.kills[-1]['sources']) or 'nothing'})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300, help="rounds of churn, then as many of soak")
    ap.add_argument("--quick", action="store_true", help="40 + 40 rounds (within 10 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    n = 40 if args.quick else args.rounds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-churn-"))
    os.environ[RUN_TAG] = workdir.name  # inherited by every node and every process a node starts
    bench = Churn(workdir, args.seed)
    started = time.time()
    try:
        first = bench.start("data", "0")
        bench.swarm.wait_started([first], timeout=300)
        rest = [bench.start(name, stage) for name, stage in LAYOUT[1:]]
        bench.swarm.wait_started(rest, timeout=300)
        bench.wait_rounds(2, 300)
        warm = max(bench.rounds())
        print(f"swarm up after {time.time() - started:.0f}s; churn for {n} rounds", flush=True)
        counted = 0  # churn rounds with every node up: the rounds a restart takes are not counted
        while counted < n:
            gap = min(bench.rng.randint(5, 10), n - counted)
            bench.wait_rounds(max(bench.rounds()) + gap, 600)
            counted += gap
            if counted < n:
                bench.kill_and_restart()
        churn_end = max(bench.rounds())
        print(f"soak for {n} rounds", flush=True)
        bench.wait_rounds(churn_end + n, 600 + 10 * n)
        bench.note_processes()
    finally:
        bench.swarm.stop()
    time.sleep(5)  # children exit within seconds of their parent
    seen_left = {p for p, started_at in bench.pids_seen.items() if alive(p) and start_time(p) == started_at}
    left = sorted(seen_left | set(tagged(workdir.name)))

    rounds = bench.rounds()
    first_round, last_round = min(rounds), max(rounds)
    missing = [r for r in range(first_round, last_round + 1) if r not in rounds]
    failed = [r for r, e in rounds.items() if e.get("failed") or e.get("tokens", 0) < PLANNED_TOKENS]
    soak = [rounds[r]["wall_s"] for r in rounds if r > churn_end]
    churn = [rounds[r]["wall_s"] for r in rounds if warm < r <= churn_end]
    soak_median = statistics.median(soak)
    delays, hit = kill_delays(rounds, bench.kills, churn_end)
    after_warm = [s for s in bench.samples if s["round"] > warm + 5]
    rss0, rss1 = after_warm[0]["rss_mb"], after_warm[-1]["rss_mb"]
    fd0, fd1 = after_warm[0]["fds"], after_warm[-1]["fds"]
    rows = [
        ("rounds (churn + soak)", f"{len(churn)} + {len(soak)}"),
        ("kills", str(len(bench.kills))),
        ("rounds lost (missing, with failed or unstarted microbatches, or short of tokens)",
         str(len(missing) + len(failed))),
        ("kills whose round re-routed a microbatch (the kill hit work)",
         f"{sum(1 for k in bench.kills if rounds.get(k['round'], {}).get('reroutes'))} of {len(bench.kills)}"),
        ("delay added per kill, median / worst", f"{statistics.median(delays):.2f} s / {max(delays):.2f} s"
         if delays else "n/a"),
        ("delay added per kill that hit work, median / worst", f"{statistics.median(hit):.2f} s / {max(hit):.2f} s"
         if hit else "n/a"),
        ("median round, churn vs soak", f"{statistics.median(churn):.2f} s vs {soak_median:.2f} s "
                                        f"({statistics.median(churn) / soak_median:.2f}x)"),
        ("soak: slowest round / median", f"{max(soak) / soak_median:.2f}x"),
        ("data node RSS after warm-up, start -> end", f"{rss0:.0f} -> {rss1:.0f} MiB ({rss1 / rss0:.2f}x)"),
        ("data node open fds, start -> end", f"{fd0} -> {fd1} ({fd1 / fd0:.2f}x)"),
        ("restarted node back (started, following rounds), median", f"{statistics.median(k['back_s'] for k in bench.kills):.0f} s"
         if bench.kills else "n/a"),
        ("processes left after stop", str(len(left))),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    header = (f"`python bench/bench_churn.py{' --quick' if args.quick else f' --rounds {n}'}` "
              f"({time.time() - started:.0f} s wall, {os.cpu_count()} cores shared)\n\n")
    (out / "churn.md").write_text(header + table + "\n")
    (out / "churn.json").write_text(json.dumps({"kills": bench.kills, "samples": bench.samples,
                                                "rounds": rounds, "left": left, "churn_end": churn_end,
                                                "warm": warm}, indent=1))
    _plot(out / "churn.png", rounds, bench.samples, bench.kills, churn_end)
    print(header + table)
    return 0 if not missing and not failed and not left else 1


def kill_delays(rounds: dict[int, dict], kills: list[dict], churn_end: int) -> tuple[list[float], list[float]]:
    """What each kill added to the round it hit, against the soak's median round: for every kill, and for those
    whose round re-routed a microbatch (the kill hit work). `rounds` may come from churn.json (string keys)."""
    rounds = {int(r): e for r, e in rounds.items()}
    soak_median = statistics.median(e["wall_s"] for r, e in rounds.items() if r > churn_end)
    hit_round = [k for k in kills if k["round"] in rounds]
    every = [max(0.0, rounds[k["round"]]["wall_s"] - soak_median) for k in hit_round]
    hit = [d for d, k in zip(every, hit_round) if rounds[k["round"]].get("reroutes")]
    return every, hit


def _plot(path: Path, rounds: dict[int, dict], samples: list[dict], kills: list[dict], churn_end: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    xs = sorted(r for r in rounds if rounds[r].get("loss") is not None)
    ax1.plot(xs, [rounds[r]["loss"] for r in xs], lw=0.8, label="loss (data node)")
    ax1.set_ylabel("loss")
    ax2.plot([s["round"] for s in samples], [s["rss_mb"] for s in samples], lw=0.8, color="tab:green")
    ax2.set_ylabel("data node RSS (MiB)")
    ax2.set_xlabel("round")
    for ax in (ax1, ax2):
        for k in kills:
            ax.axvline(k["round"], color="tab:red", lw=0.6, alpha=0.6)
        ax.axvline(churn_end, color="black", ls="--", lw=0.8)
    ax1.set_title("churn (red: a node killed with SIGKILL and restarted), then soak (after the dashed line)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
