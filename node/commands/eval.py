"""`swarm-node eval`: perplexity of a trained model on held-out text, optionally with stages omitted."""

from __future__ import annotations

import argparse

from node.commands.options import tls_options
from node.config import LifecycleConfig
from node.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a trained model on held-out text, optionally omitting stages",
                              description="The model comes from an HF checkpoint directory (--model DIR) or from a "
                                          "running swarm's stages (--initial-peers, fetched with FetchState).")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="held-out text or jsonl files")
    p.add_argument("--model", default="tiny", help="HF checkpoint directory, or the swarm's preset (default: tiny)")
    p.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="fetch the stages from this running swarm")
    p.add_argument("--swarm", default="swarm-node", help="swarm id with --initial-peers (default: swarm-node)")
    p.add_argument("--swarm-key", metavar="PATH", default="", help="the swarm key of a private swarm")
    tls_options(p)
    p.add_argument("--num-stages", type=int, default=4, help="stages the model is split into (default: 4)")
    p.add_argument("--omit-stages", default="", help="stages to skip, e.g. 2,3 (never 0)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per evaluated window (default: 64)")
    p.add_argument("--max-sequences", type=int, default=256, help="windows to evaluate at most (default: 256)")
    p.add_argument("--tokenizer", default="", help="HF tokenizer directory (default: the byte tokenizer)")
    p.add_argument("--save-model", metavar="DIR", help="also write the fetched model as an HF checkpoint here")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def parse_omit(text: str, num_stages: int) -> set[int]:
    try:
        omit = {int(s) for s in text.split(",") if s.strip()}
    except ValueError:
        raise UsageError(f"--omit-stages {text!r}: give stage numbers like 2,3") from None
    if 0 in omit:
        raise UsageError("--omit-stages: stage 0 (embedding, head, loss) cannot be omitted")
    if any(not 0 < s < num_stages for s in omit):
        raise UsageError(f"--omit-stages {text!r}: this model has stages 1..{num_stages - 1}")
    return omit


def run(args: argparse.Namespace) -> int:
    if args.num_stages < 1 or args.seq_len < 2 or args.max_sequences < 1:
        raise UsageError("--num-stages, --seq-len and --max-sequences must be positive (--seq-len at least 2)")
    omit = parse_omit(args.omit_stages, args.num_stages)
    import json

    from lm.build import build_stage
    from lm.data import load_corpus
    from lm.presets import resolve_model
    from lm.tokenizer import load_tokenizer
    from lm.whole import perplexity, save_stage_shard
    from node.host.trust import client_tls

    try:
        tokenizer = load_tokenizer(args.tokenizer or None)
        spec = resolve_model(args.model, tokenizer.vocab_size)
        tokens = load_corpus(args.data, None, tokenizer)
        stages = {s: build_stage(spec, s, args.num_stages) for s in range(args.num_stages)}
    except ValueError as e:
        raise UsageError(str(e)) from None
    source = args.model
    if args.initial_peers:
        source = f"swarm '{args.swarm}'"
        fetch_stages(stages, args.initial_peers, args.swarm, args.swarm_key,
                     client_tls(args.swarm_key, args.tls, args.tls_cert))
    if args.save_model:
        for module in stages.values():
            save_stage_shard(module, spec.config, args.num_stages, args.save_model)
    try:
        ppl = perplexity(stages, tokens, args.seq_len, omit, max_sequences=args.max_sequences)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({"model": source, "omit_stages": sorted(omit), "perplexity": ppl}))
    else:
        kept = [s for s in range(args.num_stages) if s not in omit]
        print(f"perplexity {ppl:.4f} ({source}, stages {','.join(map(str, kept))})")
    return 0


def fetch_stages(stages: dict, initial_peers: list[str], swarm: str, swarm_key: str = "", tls=None) -> None:
    """Load every stage's parameters from a serving replica of a running swarm (FetchState)."""
    import torch
    from hivemind.dht import DHT

    from node.control.discovery import read_members
    from node.dataplane.transport import StageClients
    from node.host.trust import NodeTrust
    from protocol.limits import WireLimits

    trust = NodeTrust.create("", swarm_key)  # signed records; in a private swarm, MACs and RPC tags
    try:
        dht = DHT(initial_peers=initial_peers, client_mode=True, start=True, **trust.dht_kwargs())
    except Exception as e:
        trust.close()
        raise UsageError(f"could not reach the swarm through {' '.join(initial_peers)}: {e}") from None
    clients = StageClients(WireLimits(), trust.auth, tls)
    try:
        members = read_members(dht, swarm)
        for stage, module in stages.items():
            sources = sorted(p for p, r in members.items() if r.serving and stage in r.stages)
            if not sources:
                raise UsageError(f"no serving replica of stage {stage} in swarm '{swarm}'")
            _, tensors, _ = clients.fetch_state(members[sources[0]].endpoint, swarm, stage, receiver=sources[0],
                                                timeout=LifecycleConfig().state_transfer_timeout)
            params = dict(module.named_parameters())
            with torch.no_grad():
                for name, tensor in tensors.items():
                    if name.startswith("param/") and name[6:] in params:
                        params[name[6:]].copy_(tensor)
    finally:
        clients.close()
        dht.shutdown()
        trust.close()
