"""`swarm-node demo`: a private swarm of separate processes on 127.0.0.1 training the tiny LLaMA."""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

from node.errors import UsageError

# 4 stages; stage 0 (the data nodes) and stage 1 have two replicas each.
DEFAULT_LAYOUT = "0,0,1,1,2,3"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train the tiny LLaMA on a local swarm of separate processes",
                              description="Starts one `swarm-node run` process per entry of --layout on "
                                          "127.0.0.1, trains for --rounds, prints progress and exits.")
    p.add_argument("--rounds", type=int, default=20, help="training rounds (default: 20)")
    p.add_argument("--layout", default=DEFAULT_LAYOUT,
                   help=f"stage of each node, comma-separated; 0 marks a data node (default: {DEFAULT_LAYOUT})")
    p.add_argument("--visits", type=int, default=0,
                   help="stages each microbatch visits, stage 0 included (SkipPipe); default 0: all of them")
    p.add_argument("--emulate-links", metavar="FILE",
                   help="TEST TOOL: emulate geo-distributed links; FILE is a benchmark instance such as "
                        "bench/instances/gcp12-20nodes.json (node i sits in its node i's region) or an "
                        "emulation file with endpoints")
    p.add_argument("--model", default="tiny", help="model preset or HF checkpoint directory (default: tiny)")
    p.add_argument("--summary-json", metavar="PATH", help="write a JSON summary of the run here")
    p.add_argument("--workdir", metavar="DIR", help="where node logs and event files go (default: a temp dir)")
    p.add_argument("--swarm-key", metavar="PATH",
                   help="swarm key file to use (default: a new one in the work dir, so the demo swarm is private)")
    p.add_argument("--timeout", type=float, default=900, help="give up after this many seconds (default: 900)")
    p.set_defaults(handler=run)


def _layout(text: str) -> list[int]:
    try:
        stages = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--layout {text!r}: give stage numbers like {DEFAULT_LAYOUT}") from None
    num_stages = max(stages) + 1
    if 0 not in stages or set(stages) != set(range(num_stages)):
        raise UsageError(f"--layout {text!r}: every stage from 0 to {num_stages - 1} needs a node")
    return stages


def run(args: argparse.Namespace) -> int:
    if args.rounds <= 0:
        raise UsageError("--rounds must be a positive number")
    stages = _layout(args.layout)
    num_stages = max(stages) + 1
    if args.visits and not 2 <= args.visits <= num_stages:
        raise UsageError(f"--visits {args.visits}: give between 2 and {num_stages} (the layout's stages), or 0")
    from node.dataplane.link_emulation import place_endpoints
    from node.process.local_swarm import LocalSwarm, free_port

    ports = [free_port() for _ in stages]
    emulation = None
    if args.emulate_links:
        try:
            instance = json.loads(Path(args.emulate_links).read_text())
            has_endpoints = any("endpoint" in n for n in instance.get("nodes", []) if isinstance(n, dict))
            emulation = instance if has_endpoints else place_endpoints(instance, [f"127.0.0.1:{p}" for p in ports])
        except (OSError, ValueError, AttributeError) as e:  # EmulationError and JSON errors are ValueErrors
            raise UsageError(f"--emulate-links {args.emulate_links}: {e}") from None

    # Ctrl-C and SIGTERM both end the demo through the `finally` below, which stops every node. Set
    # explicitly: a shell starts background jobs with SIGINT ignored, and SIGTERM would skip `finally`.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-node-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    key = args.swarm_key or str(workdir / "swarm.key")
    if not args.swarm_key:
        from protocol.swarm_key import generate_key_file

        Path(key).unlink(missing_ok=True)
        generate_key_file(key)
    extra = ["--visits", str(args.visits), "--min-nodes", str(len(stages))]
    if emulation is not None:
        (workdir / "links.json").write_text(json.dumps(emulation, indent=1))
        extra += ["--emulate-links", str(workdir / "links.json")]
    swarm = LocalSwarm(workdir, swarm=f"demo-{secrets.token_hex(4)}", common_args=[
        "--num-stages", str(num_stages), "--model", args.model, "--rounds", str(args.rounds),
        "--torch-threads", "1", "--device", "cpu", "--log-level", "warning", "--swarm-key", key, *extra])
    started = time.monotonic()
    visits = args.visits or num_stages
    print(f"demo: {len(stages)} nodes, {num_stages} stages, each microbatch visits {visits}, {args.rounds} rounds"
          f"{', links emulated from ' + args.emulate_links if emulation else ''}; private swarm key {key}; "
          f"logs in {workdir}", flush=True)
    try:
        first = swarm.start_node("node0", str(stages[0]), extra=["--port", str(ports[0])])
        swarm.wait_started([first], timeout=120)
        peers = swarm.initial_peers()
        rest = [swarm.start_node(f"node{i}", str(s), extra=["--port", str(ports[i])], initial_peers=peers)
                for i, s in enumerate(stages[1:], 1)]
        swarm.wait_started(rest, timeout=180)
        for node in swarm.nodes:
            print(f"demo: {node.name} (stage {node.stages})  metrics {node.started()['metrics_url']}", flush=True)
        losses = _watch(swarm, args.rounds, started + args.timeout, num_stages)
    except (RuntimeError, TimeoutError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        swarm.stop()
    wall = time.monotonic() - started
    data_nodes = [n for n in swarm.nodes if n.stages == "0"]
    tokens = sum(e.get("tokens", 0) for n in data_nodes for e in n.events("round"))
    summary = {"rounds": len(losses), "loss_per_round": losses, "tokens": tokens, "wall_s": round(wall, 2),
               "nodes": [{"name": n.name, "stages": [int(n.stages)], **{k: n.started()[k] for k in
                          ("peer_id", "endpoint", "metrics_url")}} for n in swarm.nodes if n.started()]}
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    if len(losses) < args.rounds:
        print(f"demo: only {len(losses)} of {args.rounds} rounds finished; see {workdir}", file=sys.stderr)
        return 1
    print(f"demo: done: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} rounds, {tokens} tokens, "
          f"{wall:.1f}s", flush=True)
    return 0


def _watch(swarm, rounds: int, deadline: float, num_stages: int) -> list[float]:
    """Print one progress line per finished round; returns each round's mean loss over the data nodes.

    A round is finished when every data node has trained it or, having joined late, caught up past it. The
    line shows the round's iteration time (the slowest data node, averaging excluded) next to the
    simulator's prediction for its plan, the whole round (from the previous round's end: the plan's wait and the
    sync included) next to the plan's prediction of it, and the stage visits the nodes executed (their backward
    counters).
    """
    data_nodes = [n for n in swarm.nodes if n.stages == "0"]
    shown, losses, last_time = 0, [], time.monotonic()
    while shown < rounds and time.monotonic() < deadline:
        per_node = [{e["round"]: e for e in n.events() if e["event"] in ("round", "caught_up")} for n in data_nodes]
        while shown < rounds and all(shown in r for r in per_node):
            events = [r[shown] for r in per_node]
            values = [e["loss"] for e in events if e.get("loss") is not None]
            loss = sum(values) / len(values) if values else float("nan")
            losses.append(loss)
            now = time.monotonic()
            tokens = sum(e.get("tokens", 0) for e in events)
            up = sum(n.alive() for n in swarm.nodes)
            timed = [e for e in events if "executed_s" in e]
            took = (f"{max(e['executed_s'] for e in timed):.2f}s (predicted {timed[0]['predicted_s']:.2f}s), round "
                    f"{max(e['round_s'] for e in timed):.2f}s (predicted {timed[0]['predicted_round_s']:.2f}s)") \
                if timed else "n/a"
            print(f"round {shown + 1:>3}/{rounds} | loss {loss:.4f} | iteration {took} | visits "
                  f"{_executed_visits(swarm, shown, num_stages)} | {tokens / max(now - last_time, 1e-3):7.0f} tok/s"
                  f" | nodes up {up}/{len(swarm.nodes)}", flush=True)
            last_time = now
            shown += 1
        if not any(n.alive() for n in data_nodes):
            break
        time.sleep(0.3)
    return losses


def _executed_visits(swarm, round_: int, num_stages: int, wait_s: float = 3.0) -> str:
    """Microbatches each stage ran in `round_`, summed over the nodes' counters (waits briefly for stragglers)."""
    until = time.monotonic() + wait_s
    while True:
        found = [next((e for e in n.events("round") if e["round"] == round_), None) for n in swarm.nodes]
        if all(f is not None for f in found) or time.monotonic() > until:
            break
        time.sleep(0.2)
    visits = [0] * num_stages
    for e in filter(None, found):
        for stage, count in e["counts"].items():
            visits[int(stage)] += count
    return ",".join(map(str, visits))
