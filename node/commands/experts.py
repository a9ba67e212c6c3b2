"""`swarm-node experts plan|train|eval|bench`: HDEE domain experts (see docs/experts.md)."""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import tempfile
from pathlib import Path

from node.commands.options import tls_options
from node.errors import UsageError

DEFAULT_REPORT = "bench/results/experts.md"


def _usage_errors(handler):
    """Expected failures in the library are ValueErrors; the CLI shows them as one line."""
    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            if getattr(args, "threads", 0):
                import torch

                torch.set_num_threads(args.threads)
            return handler(args)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from e
    return wrapped


def _load_domains(args: argparse.Namespace):
    from experts.domains import default_domains, domains_from_specs
    from lm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.domain or args.held_out:
        domains = domains_from_specs(args.domain, args.held_out, tokenizer, args.max_bytes, args.text_field)
    else:
        domains, missing = default_domains(tokenizer, args.max_bytes)
        if missing:
            print(f"experts: this host lacks {', '.join(missing)}; skipped", file=sys.stderr)
    if not domains.trained:
        raise UsageError("no training domains; give --domain NAME=PATH")
    return domains, tokenizer


def _model_spec(args: argparse.Namespace, vocab_size: int):
    """(config, checkpoint directory or None) for --model bench|PRESET|DIR."""
    from experts.bench import BenchConfig
    from lm.presets import resolve_model

    if args.model == "bench":
        return BenchConfig().model_config(vocab_size), None
    spec = resolve_model(args.model, vocab_size)
    return spec.config, spec.checkpoint_dir


def _difficulties(args: argparse.Namespace, domains, reference_model) -> dict[str, float]:
    """The seed model's dev bits per token when there is one, else the model-free zlib measure."""
    from experts.evaluate import EvalSettings, reference_difficulty

    if reference_model is None or args.difficulty == "compression":
        return {d.name: d.difficulty for d in domains.trained}
    return reference_difficulty(reference_model, domains.trained, EvalSettings(seq_len=args.seq_len,
                                                                               device=reference_model.device))


def _plans(args: argparse.Namespace, domains, config, reference_model=None) -> list:
    from experts.sizing import METHODS, make_plan, medium_steps_for_budget

    tokens_per_step = args.batch_size * args.seq_len
    steps = args.steps
    if args.budget is not None:
        steps = medium_steps_for_budget(args.budget, len(domains.trained), config, tokens_per_step, args.seq_len)
    methods = METHODS if args.method == "all" else (args.method,)
    difficulties = _difficulties(args, domains, reference_model)
    return [make_plan(m, difficulties, config, steps, tokens_per_step, args.seq_len, args.width_spread,
                      args.step_spread) for m in methods]


@_usage_errors
def plan(args: argparse.Namespace) -> int:
    from experts.checkpoint import load_expert

    domains, tokenizer = _load_domains(args)
    print(domains.table(), end="\n\n")
    if args.seed_model:
        seed_model, _ = load_expert(args.seed_model)
        config = seed_model.config
    else:
        seed_model, config = None, _model_spec(args, tokenizer.vocab_size)[0]
    print("difficulty:", "seed model dev bits/token" if seed_model is not None and args.difficulty == "reference"
          else "zlib bits/byte", end="\n\n")
    for p in _plans(args, domains, config, seed_model):
        print(p.table(), end="\n\n")
    return 0


@_usage_errors
def train_cmd(args: argparse.Namespace) -> int:
    from transformers import LlamaForCausalLM

    from experts.checkpoint import load_expert, new_model
    from experts.run import ExpertSettings, train_ensemble, train_seed
    from lm.build import resolve_device

    if args.method == "all":
        raise UsageError("experts train takes one --method (MHo-IHo, MHe-IHo or MHo-IHe)")
    domains, tokenizer = _load_domains(args)
    out = Path(args.out)
    settings = ExpertSettings(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                              save_every=args.save_every, device=str(resolve_device(args.device)), dtype=args.dtype)
    if args.seed_model:
        seed_model, seed_manifest = load_expert(args.seed_model, settings.device)
    else:
        config, checkpoint_dir = _model_spec(args, tokenizer.vocab_size)
        seed_model = (LlamaForCausalLM.from_pretrained(checkpoint_dir) if checkpoint_dir
                      else new_model(config, args.seed))
        seed_manifest = train_seed(seed_model, domains, args.seed_steps, settings, out / "seed-model",
                                   tokenizer.name, args.seed, args.resume)
        print(f"seed model: {out / 'seed-model'} (dev ppl {seed_manifest.val_ppl:.3f})")
    [the_plan] = _plans(args, domains, seed_model.config, seed_model)
    print(the_plan.table())
    train_ensemble(seed_model, seed_manifest, domains, the_plan, settings, out / args.method, args.seed,
                   args.resume, only=args.only)
    return 0


def _load_experts(paths: list[str], device) -> list[tuple]:
    """(manifest, model) for each expert directory, or each expert below a directory (never a seed model)."""
    from experts.checkpoint import MANIFEST, load_expert

    dirs = []
    for d in map(Path, paths):
        if (d / MANIFEST).is_file():
            dirs.append(d)
        else:  # a training or fetch output directory: every expert below it, not the seed model
            dirs += sorted(p.parent for p in d.glob(f"**/{MANIFEST}") if p.parent.name != "seed-model")
    if not dirs:
        raise UsageError(f"no expert checkpoints (directories with {MANIFEST}) in {' '.join(paths)}")
    return [tuple(reversed(load_expert(d, device))) for d in dirs]


@_usage_errors
def eval_cmd(args: argparse.Namespace) -> int:
    from experts.evaluate import EvalSettings, PriorCache, evaluate_ensemble, results_table, write_csv
    from lm.build import resolve_device, resolve_dtype

    if args.from_swarm:
        if not args.initial_peers:
            raise UsageError("--from-swarm needs --initial-peers MADDR")
        fetched = Path(args.fetch_dir or tempfile.mkdtemp(prefix="swarm-experts-"))
        _fetch_into(argparse.Namespace(**{**vars(args), "expert": [], "domain": [], "finished": True}), fetched)
        args.experts = [str(fetched)]
    if not args.experts:
        raise UsageError("give --experts DIR ... or --from-swarm --initial-peers MADDR")
    device = resolve_device(args.device)
    experts = _load_experts(args.experts, device)
    domains, _ = _load_domains(args)
    settings = EvalSettings(seq_len=args.seq_len, dev_windows=args.dev_windows, test_windows=args.test_windows,
                            top_k=args.top_k, device=device, dtype=resolve_dtype(args.dtype, device))
    cache = PriorCache(Path(args.prior_cache) if args.prior_cache else None)
    results = evaluate_ensemble(experts, domains.all, settings, cache)
    print(results_table(results))
    if args.csv:
        write_csv(results, Path(args.csv))
        print(f"wrote {args.csv}")
    return 0


def _swarm_experts(args: argparse.Namespace):
    """(records, malformed count, RPC auth) of the swarm's experts, read through a client-mode DHT."""
    from node.expert.directory import ExpertDirectory
    from node.expert.owner import CatalogueOwner, introducer_of
    from node.host.trust import reading_swarm

    skipped = []  # malformed or forged records
    owner = CatalogueOwner(named=args.catalogue_owner, introducer=introducer_of(args.initial_peers))
    with reading_swarm(args.initial_peers, args.swarm_key) as (dht, trust):
        records = ExpertDirectory(dht, args.swarm, owner, on_malformed=skipped.append,
                                  on_refused=skipped.append, warn=False).all_experts()
    return records, len(skipped), trust.auth


def list_cmd(args: argparse.Namespace) -> int:
    records, malformed, _ = _swarm_experts(args)
    if args.json:
        import json

        print(json.dumps([{**r.summary(), "manifest": r.manifest} for r in records], indent=2))
        return 0
    print(f"swarm '{args.swarm}': {len(records)} expert(s)" + (f", {malformed} malformed or forged record(s) skipped"
                                                                 if malformed else ""))
    header = ("id", "domain", "steps", "dev_loss", "bytes", "sha256", "peer", "endpoint")
    rows = [header] + [(r.id, r.domain, f"{r.steps}/{r.target_steps}",
                        "-" if r.dev_loss is None else f"{r.dev_loss:.3f}", str(r.bytes), r.sha256[:16],
                        r.peer_id[-12:], r.endpoint) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


def _fetch_into(args: argparse.Namespace, out: Path) -> list[Path]:
    from node.expert.service import FetchError, download_any
    from node.host.trust import client_tls

    records, _, auth = _swarm_experts(args)
    tls = client_tls(args.swarm_key, args.tls, args.tls_cert)
    if args.expert:
        chosen = [r for r in records if r.id in args.expert]
        missing = sorted(set(args.expert) - {r.id for r in chosen})
        if missing:
            raise UsageError(f"no expert {', '.join(missing)} in swarm '{args.swarm}'; see 'swarm-node experts list'")
    elif args.domain:
        chosen = [r for r in records if r.domain in args.domain]
        if not chosen:
            raise UsageError(f"no experts for domain {', '.join(args.domain)} in swarm '{args.swarm}'")
    else:
        chosen = [r for r in records if r.domain != "*" and (r.complete or not args.finished)]
        if not chosen:
            raise UsageError(f"swarm '{args.swarm}' has no {'finished ' if args.finished else ''}experts yet")
    copies: dict[tuple[str, str], list] = {}  # several peers may serve one expert (a seed): try each in turn
    for record in chosen:
        copies.setdefault((record.id, record.sha256), []).append(record)
    paths = []
    for group in copies.values():
        try:
            path, record = download_any(group, args.swarm, out, auth=auth, tls=tls,
                                        on_wrong_bytes=lambda why: print(f"refused a copy: {why}", flush=True))
        except FetchError as e:
            first = group[0]
            if not args.expert and not first.complete and "FAILED_PRECONDITION" in str(e):
                print(f"skipped {first.id}: it published a newer checkpoint during the download", flush=True)
                continue
            raise UsageError(str(e)) from None
        paths.append(path)
        print(f"fetched {record.id} ({record.domain}, {record.steps}/{record.target_steps} steps, "
              f"{record.bytes} bytes, sha256 {record.sha256[:16]} verified) into {path}", flush=True)
    return paths


def fetch_cmd(args: argparse.Namespace) -> int:
    _fetch_into(args, Path(args.out))
    return 0


@_usage_errors
def generate_cmd(args: argparse.Namespace) -> int:
    from experts.generate import generate
    from lm.tokenizer import load_tokenizer

    experts = _load_experts(args.experts, "cpu")
    tokenizer = load_tokenizer(args.tokenizer)
    print(generate([model for _, model in experts], tokenizer, args.prompt, args.max_new_tokens,
                   args.temperature, args.seed))
    return 0


@_usage_errors
def bench(args: argparse.Namespace) -> int:
    from experts.bench import BenchConfig, report, run_bench, write_csv
    from lm.build import resolve_device

    device = str(resolve_device(args.device))
    overrides = {"max_bytes": args.max_bytes} if args.max_bytes else {}
    cfg = BenchConfig.at_scale(args.scale, seeds=tuple(args.seeds), device=device, dtype=args.dtype,
                               difficulty=args.difficulty, **overrides)
    args.max_bytes = cfg.max_bytes
    domains, tokenizer = _load_domains(args)
    print(domains.table(), flush=True)
    work = Path(args.work or f"runs/experts-bench/scale{args.scale}")
    result = run_bench(cfg, domains, tokenizer.name, tokenizer.vocab_size, work,
                       log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = sys.argv[3:] if sys.argv[1:3] == ["experts", "bench"] else []
    command = shlex.join(["swarm-node", "experts", "bench", *flags])
    out.write_text(report(result, command))
    write_csv(result, out.with_suffix(".csv"))
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


def _domain_options(p: argparse.ArgumentParser, max_bytes: int | None = 400_000) -> None:
    p.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                   help="a training domain: text/jsonl file or hf:DATASET[:CONFIG] (repeat; default: offline corpus)")
    p.add_argument("--held-out", action="append", default=[], metavar="NAME=PATH",
                   help="a domain that is only scored, never trained on (repeat)")
    p.add_argument("--max-bytes", type=int, default=max_bytes, help="bytes kept per domain")
    p.add_argument("--text-field", default="text", help="jsonl / dataset field holding the text")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: byte tokenizer)")


def _plan_options(p: argparse.ArgumentParser, with_all: bool) -> None:
    from experts.sizing import METHODS

    p.add_argument("--model", default="bench",
                   help="'bench' (the bench's medium expert), a preset, or an HF LLaMA checkpoint directory")
    p.add_argument("--method", default="all" if with_all else "MHe-IHo", choices=(*METHODS, "all"))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=300, help="steps of a medium (baseline) expert")
    budget.add_argument("--budget", type=float, default=None, help="total expert FLOPs instead of --steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--width-spread", type=float, default=0.5, help="MHe widths span (1±spread) x medium")
    p.add_argument("--step-spread", type=float, default=0.25, help="IHe steps span (1±spread) x medium")
    _difficulty_option(p)


def _difficulty_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--difficulty", default="reference", choices=("reference", "compression"),
                   help="rank domains by the seed model's dev loss (reference) or by zlib compression")


def _device_options(p: argparse.ArgumentParser, threads: int) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=threads, help="torch CPU threads (0: torch's default)")


def _swarm_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--initial-peers", nargs="+", required=required, metavar="MADDR", help="any peer of the swarm")
    p.add_argument("--swarm", default="swarm-node", help="swarm id (default: swarm-node)")
    p.add_argument("--swarm-key", metavar="PATH", default="", help="the swarm key of a private swarm")
    p.add_argument("--catalogue-owner", metavar="PEER_ID", default="",
                   help="peer id of the swarm's creator (default: the first initial peer, or the owner it names)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("experts", help="HDEE domain experts: plan, train, list, fetch, eval, generate, bench")
    sub = p.add_subparsers(dest="experts_command", metavar="SUBCOMMAND")
    sub.required = True

    sp = sub.add_parser("plan", help="measure domains and print equal-FLOPs expert plans")
    _domain_options(sp)
    _plan_options(sp, with_all=True)
    sp.add_argument("--seed-model", default=None,
                    help="expert checkpoint used as the reference model (without it: zlib difficulty)")
    sp.set_defaults(handler=plan)

    sp = sub.add_parser("train", help="train (or resume) a shared seed model and one expert per domain")
    _domain_options(sp)
    _plan_options(sp, with_all=False)
    sp.add_argument("--out", required=True, help="output directory (seed-model/ and METHOD/DOMAIN/ below it)")
    sp.add_argument("--seed-model", default=None, help="branch from this expert checkpoint instead of training one")
    sp.add_argument("--seed-steps", type=int, default=200, help="steps of the shared seed model")
    sp.add_argument("--only", action="append", default=[], metavar="DOMAIN", help="train only these experts")
    sp.add_argument("--lr", type=float, default=3e-3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    sp.add_argument("--resume", action="store_true", help="continue the checkpoints in --out")
    _device_options(sp, threads=2)
    sp.set_defaults(handler=train_cmd)

    sp = sub.add_parser("eval", help="score an ensemble per domain: posterior, uniform, top-k, best single")
    sp.add_argument("--experts", nargs="+", default=[], help="expert checkpoint directories, or a train/fetch --out")
    sp.add_argument("--from-swarm", action="store_true", help="fetch the swarm's finished experts first")
    sp.add_argument("--fetch-dir", default=None, help="with --from-swarm: where to put them (default: a temp dir)")
    _swarm_options(sp, required=False)
    tls_options(sp)
    _domain_options(sp)
    sp.add_argument("--seq-len", type=int, default=128)
    sp.add_argument("--dev-windows", type=int, default=100, help="dev sequences for the prior")
    sp.add_argument("--test-windows", type=int, default=64)
    sp.add_argument("--top-k", type=int, default=2)
    sp.add_argument("--prior-cache", default=None, help="JSON file caching the dev priors")
    sp.add_argument("--csv", default=None, help="also write the table as CSV")
    _device_options(sp, threads=2)
    sp.set_defaults(handler=eval_cmd)

    sp = sub.add_parser("list", help="the swarm's published experts (from the DHT)")
    _swarm_options(sp, required=True)
    sp.add_argument("--json", action="store_true", help="a JSON list of manifests instead of a table")
    sp.set_defaults(handler=list_cmd)

    sp = sub.add_parser("fetch", help="download experts from the peers that serve them, sha256 verified")
    _swarm_options(sp, required=True)
    tls_options(sp)
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--expert", action="append", default=[], metavar="ID", help="an expert id (repeat)")
    which.add_argument("--domain", action="append", default=[], metavar="D", help="every expert of a domain (repeat)")
    which.add_argument("--all", action="store_true", help="every expert")
    sp.add_argument("--finished", action="store_true", help="with --all: only experts that reached their last step")
    sp.add_argument("--out", required=True, help="directory; each expert goes to OUT/<id>/")
    sp.set_defaults(handler=fetch_cmd)

    sp = sub.add_parser("generate", help="sample text from the posterior mixture of experts")
    sp.add_argument("--experts", nargs="+", required=True, help="expert directories (e.g. an experts fetch --out)")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: byte tokenizer)")
    sp.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    sp.set_defaults(handler=generate_cmd)

    sp = sub.add_parser("bench", help="MHo-IHo vs MHe-IHo vs MHo-IHe at equal FLOPs, 3 seeds")
    _domain_options(sp, max_bytes=None)
    sp.add_argument("--scale", type=int, default=1, help="1: 2 CPU cores, ~30 min; 8+: a GPU host")
    sp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sp.add_argument("--out", default=DEFAULT_REPORT, help="markdown report; the CSV goes beside it")
    sp.add_argument("--work", default=None, help="checkpoints (default runs/experts-bench/scaleN); reused if present")
    _difficulty_option(sp)
    _device_options(sp, threads=1)
    sp.set_defaults(handler=bench)
