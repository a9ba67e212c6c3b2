"""Node settings: defaults, then a TOML file, then SWARM_NODE_* environment variables, then flags.

Every option is declared once in OPTIONS; argparse flags, TOML keys and environment variables
are all derived from it, so the three sources can never disagree on names or types.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from node.errors import UsageError
from protocol.codec_names import CODEC_NAMES

ENV_PREFIX = "SWARM_NODE_"


def _number(kind: type, what: str) -> Callable[[Any], Any]:
    """A parser for ints or floats that refuses booleans (TOML's `true` is not a port)."""
    def parse(value: Any):
        if isinstance(value, bool):
            raise ValueError(f"must be {what}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {what}") from None
    return parse


def _within(parse: Callable[[Any], Any], ok: Callable[[Any], bool], message: str) -> Callable[[Any], Any]:
    def check(value: Any):
        parsed = parse(value)
        if not ok(parsed):
            raise ValueError(message)
        return parsed
    return check


_int = _number(int, "an integer")
_float = _number(float, "a number")
_positive_int = _within(_int, lambda n: n > 0, "must be a positive integer")
_port = _within(_int, lambda n: 0 <= n <= 65535, "must be a port number between 0 (pick a free one) and 65535")
_positive_float = _within(_float, lambda x: x > 0, "must be a positive number")
_non_negative_float = _within(_float, lambda x: x >= 0, "must be zero or positive")


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("must be a list of strings")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _stages(value: Any) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value).strip()
    if text == "auto":
        return text
    try:
        stages = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError("must be 'auto' or stage numbers like 0 or 2,3") from None
    if not stages or any(s < 0 for s in stages) or len(set(stages)) != len(stages):
        raise ValueError("must be 'auto' or distinct non-negative stage numbers like 0 or 2,3")
    return ",".join(str(s) for s in stages)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if str(value) not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(value)
    return parse


def _device(value: Any) -> str:
    text = str(value)
    if text in ("auto", "cpu") or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise ValueError("must be auto, cpu, cuda or cuda:<index>")


def _emulation_file(value: Any) -> str:
    """A link-emulation file, read and checked now so a malformed one stops the node at once."""
    text = str(value)
    if text:
        from node.dataplane.link_emulation import LinkEmulator  # stdlib only

        LinkEmulator.load(text)  # EmulationError is a ValueError with a one-line reason
    return text


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    flag_kind: str = "value"  # "value", "list" (nargs=+), "repeat" (repeatable, nargs=+) or "switch" (store_true)


OPTIONS: tuple[Option, ...] = (
    Option("swarm", str, "swarm id: namespaces every DHT key; nodes of other swarms are refused"),
    Option("new_swarm", _bool, "start a new swarm instead of joining one", flag_kind="switch"),
    Option("initial_peers", _str_list, "multiaddrs of peers already in the swarm", "MADDR", "list"),
    Option("host", str, "address to serve gRPC, metrics and the DHT on"),
    Option("announce_host", str, "address other peers use to reach this node (default: --host)"),
    Option("port", _port, "gRPC port (0 picks a free one)"),
    Option("dht_port", _port, "DHT (libp2p) port (0 picks a free one)"),
    Option("metrics_port", _port, "Prometheus /metrics port (0 picks a free one)"),
    Option("identity_path", str, "private key file; keeps the peer id stable across restarts"),
    Option("stages", _stages, "stages to host: 0, 2,3 or auto (the stage with the fewest replicas)"),
    Option("num_stages", _positive_int, "pipeline depth of the swarm's model"),
    Option("visits", _int, "stages each microbatch visits, stage 0 included (SkipPipe); 0: all of them"),
    Option("model", str, "tiny, llama-160m, llama-500m, llama-1b, llama-8b or an HF checkpoint directory"),
    Option("device", _device, "auto, cpu or cuda[:i]"),
    Option("dtype", _choice("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16 or float16"),
    Option("tokenizer", str, "HF tokenizer directory (default: the built-in byte tokenizer)"),
    Option("data", _str_list, "text or jsonl training files (data nodes)", "PATH", "list"),
    Option("dataset", str, "HF dataset NAME[:config] (needs internet or a local cache)"),
    Option("seq_len", _positive_int, "tokens per sequence"),
    Option("batch_size", _positive_int, "sequences per microbatch"),
    Option("microbatches", _positive_int, "microbatches each data node feeds per round"),
    Option("max_inflight", _positive_int, "microbatches a data node keeps in flight at once"),
    Option("memory_slots", _positive_int, "microbatches whose activations this node may hold at once"),
    Option("lr", _positive_float, "AdamW learning rate"),
    Option("weight_decay", _non_negative_float, "AdamW weight decay"),
    Option("grad_clip", _positive_float, "gradient norm clip"),
    Option("warmup_rounds", _non_negative_float, "rounds of linear learning-rate warm-up"),
    Option("seed", _int, "seed for model init and data sampling"),
    Option("rounds", _int, "stop after this many rounds (0: train until stopped)"),
    Option("round_timeout", _positive_float, "seconds a round may take before its stragglers are dropped"),
    Option("heartbeat_interval", _positive_float, "seconds between DHT heartbeats"),
    Option("record_ttl", _positive_float, "seconds a DHT record lives unless refreshed"),
    # faults: failure detection, re-routing, checkpoints (node/faults/detection.py, node/stage/origin.py, node/control/checkpoint.py)
    Option("hop_watch_interval", _positive_float,
           "seconds between checks that the peers after our waiting hops are alive"),
    Option("probe_timeout", _positive_float, "seconds a liveness ping may take before it counts as missed"),
    Option("hung_after_misses", _positive_int, "missed pings in a row after which a peer is taken as hung"),
    Option("unreachable_patience", _positive_float,
           "seconds a send keeps retrying a peer that refuses connections before the hop fails"),
    Option("hop_deadline_slack", _positive_float,
           "a hop fails when its gradient is not back after this many times the round's expected compute time"),
    Option("hop_deadline_min", _positive_float, "the least seconds a hop may wait for its gradient"),
    Option("max_attempts", _positive_int, "re-routes per microbatch before the origin gives it up"),
    Option("notice_timeout", _positive_float, "seconds for a failure report or a re-route notice to be delivered"),
    Option("checkpoint_dir", str, "save hosted stages here (and resume from here); empty: no checkpoints"),
    Option("checkpoint_every", _positive_int, "rounds between checkpoints"),
    Option("torch_threads", _int, "torch intra-op threads (0: torch's default)"),
    Option("events_file", str, "append one JSON line per event (round done, loss, weights digest)"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "debug, info, warning or error"),
    # -- skippipe: measured links and link emulation
    Option("min_nodes", _int, "plan no round until this many nodes serve (a local swarm starting together)"),
    Option("links_refresh_rounds", _positive_int, "rounds between refreshes of this node's measured links"),
    Option("save_model", str, "after the last round (--rounds), write each hosted stage into this HF "
           "LlamaForCausalLM checkpoint directory (safetensors, one shard per stage; lm/whole.py)", "DIR"),
    Option("emulate_links", _emulation_file, "TEST TOOL: delay and throttle sends as if nodes sat in the regions "
           "this JSON file gives their endpoints (node/dataplane/link_emulation.py); off when empty", "FILE"),
    # trust (issue 10): private swarms
    Option("swarm_key", str, "swarm key file (make one with 'swarm-node keygen PATH'): a private swarm that only "
                             "holders of the key can join"),
    # lifecycle: start-up, shutdown and the pools and timeouts they size (docs/architecture.md, "A node")
    Option("drain_grace", _non_negative_float, "seconds in-flight RPCs get to finish when the node stops"),
    Option("child_exit_timeout", _positive_float,
           "seconds the DHT and averager processes get to exit cleanly on shutdown before they are killed"),
    Option("dht_write_timeout", _positive_float,
           "seconds a heartbeat or the leaving tombstone may take to reach the DHT before it counts as failed"),
    Option("dht_read_timeout", _positive_float,
           "seconds a DHT read (members, plans, links) may take; a slower read counts as finding nothing new, "
           "so a hung DHT process never blocks the node"),
    Option("state_transfer_timeout", _positive_float,
           "seconds a joining node waits for one replica's stage state before it tries the next replica"),
    Option("grpc_workers", _positive_int, "threads serving incoming RPCs"),
    Option("send_workers", _positive_int, "threads delivering finished hops to the next peer"),
    # Compression on the wire (issue 11): this node's preference per direction. The planner picks the codec
    # most members prefer, and every node of the round uses the plan's (docs/compression.md).
    Option("activation_codec", _choice(*CODEC_NAMES), f"codec for activations: {', '.join(CODEC_NAMES)}"),
    Option("gradient_codec", _choice(*CODEC_NAMES), f"codec for gradients: {', '.join(CODEC_NAMES)}"),
    # ---- roles and HDEE domain experts (node/roles.py, node/expert/worker.py) ----
    Option("role", _choice("auto", "stage", "expert"),
           "stage, expert, or auto: a stage while one has fewer than --min-replicas live replicas, else experts"),
    Option("min_replicas", _positive_int, "live replicas per stage an auto node keeps before training experts"),
    Option("idle_rounds", _positive_int, "rounds an auto stage node may be left out of plans before it trains experts"),
    Option("domain", _str_list, "catalogue domain NAME=PATH set by the node that starts the swarm "
                                "(repeat; default: the offline corpus)", "NAME=PATH", "repeat"),
    Option("expert_dir", str, "directory of expert checkpoints (default: ~/.cache/swarm-node/experts)"),
    Option("expert_policy", _choice("ihe", "mhe", "homogeneous"),
           "HDEE sizing: ihe (more steps for harder domains), mhe (wider MLPs) or homogeneous"),
    Option("expert_steps", _within(_int, lambda n: n >= 0, "must be zero or a positive integer"),
           "steps of a medium expert (0: 300); the policy scales them per domain"),
    Option("expert_save_every", _positive_int, "expert checkpoint (and publish) every N steps"),
    Option("expert_max_bytes", _positive_int, "bytes of text kept per catalogue domain"),
    Option("expert_seed", str, "expert checkpoint directory this (expert) node serves as the catalogue's seed"),
    # trust (issue 10): hostile input, public reachability
    Option("stream_idle_timeout", _positive_float, "seconds a Forward/Backward stream may stay silent before it "
                                                   "is cancelled"),
    Option("tls", _bool, "serve and dial gRPC over TLS with a certificate derived from --swarm-key",
           flag_kind="switch"),
    Option("tls_cert", str, "TLS certificate (PEM) every node of the swarm serves and trusts; with --tls-key"),
    Option("tls_key", str, "private key (PEM) of --tls-cert"),
    Option("announce_port", _port, "gRPC port other peers reach this node on, behind NAT or port forwarding "
                                   "(0: --port)"),
)


@dataclass
class NodeConfig:
    swarm: str = "swarm-node"
    new_swarm: bool = False
    initial_peers: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    announce_host: str = ""
    port: int = 0
    dht_port: int = 0
    metrics_port: int = 0
    identity_path: str = ""
    stages: str = "auto"
    num_stages: int = 4
    visits: int = 0
    model: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    tokenizer: str = ""
    data: list[str] = field(default_factory=list)
    dataset: str = ""
    seq_len: int = 64
    batch_size: int = 4
    microbatches: int = 4
    max_inflight: int = 2
    memory_slots: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_rounds: float = 2
    seed: int = 0
    rounds: int = 0
    round_timeout: float = 120.0
    heartbeat_interval: float = 2.0
    record_ttl: float = 8.0
    hop_watch_interval: float = 0.5
    probe_timeout: float = 1.0
    hung_after_misses: int = 3
    unreachable_patience: float = 1.0
    hop_deadline_slack: float = 4.0
    hop_deadline_min: float = 5.0
    max_attempts: int = 3
    notice_timeout: float = 2.0
    checkpoint_dir: str = ""
    checkpoint_every: int = 5
    torch_threads: int = 0
    events_file: str = ""
    log_level: str = "info"
    # -- skippipe
    min_nodes: int = 0
    links_refresh_rounds: int = 3
    save_model: str = ""
    emulate_links: str = ""
    # trust (issue 10)
    swarm_key: str = ""  # path of the 256-bit key file; empty: a public swarm
    # lifecycle
    drain_grace: float = 1.0  # stop must finish within ~5 s: grace + child exits + DHT writes stay well below
    child_exit_timeout: float = 2.0
    dht_write_timeout: float = 1.0
    dht_read_timeout: float = 5.0  # loopback reads take milliseconds; WAN reads well under a second
    state_transfer_timeout: float = 60.0
    grpc_workers: int = 16
    send_workers: int = 4
    # compression on the wire
    activation_codec: str = "raw"
    gradient_codec: str = "raw"
    # roles and experts
    role: str = "auto"
    min_replicas: int = 1
    idle_rounds: int = 3
    domain: list[str] = field(default_factory=list)
    expert_dir: str = ""
    expert_policy: str = "ihe"
    expert_steps: int = 0
    expert_save_every: int = 50
    expert_max_bytes: int = 400_000
    expert_seed: str = ""
    # trust (issue 10)
    stream_idle_timeout: float = 10.0  # frees the gRPC worker a silent client holds
    tls: bool = False  # TLS on the data plane, certificate derived from the swarm key
    tls_cert: str = ""
    tls_key: str = ""
    announce_port: int = 0  # with --announce-host: the address peers dial (the reachability check tests it)

    def hosted_stages(self) -> list[int] | None:
        """The explicit stage list, or None for `auto`."""
        return None if self.stages == "auto" else [int(s) for s in self.stages.split(",")]


assert [o.name for o in OPTIONS] == [f.name for f in fields(NodeConfig)], "OPTIONS and NodeConfig must match"
_DEFAULTS = NodeConfig()


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every option. Defaults are left unset so that only flags given on the command line override."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with node settings (flags and env override it)")
    for opt in OPTIONS:
        flag = "--" + opt.name.replace("_", "-")
        if opt.flag_kind == "switch":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=opt.help)
        elif opt.flag_kind == "repeat":
            parser.add_argument(flag, nargs="+", action="extend", metavar=opt.metavar, default=argparse.SUPPRESS,
                                help=opt.help)
        elif opt.flag_kind == "list":
            parser.add_argument(flag, nargs="+", metavar=opt.metavar, default=argparse.SUPPRESS, help=opt.help)
        else:
            parser.add_argument(flag, metavar=opt.metavar or opt.name.upper(), default=argparse.SUPPRESS,
                                help=f"{opt.help} (default: {getattr(_DEFAULTS, opt.name)!r})")


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> NodeConfig:
    """Merge defaults < TOML file < SWARM_NODE_* environment < flags, validating every value."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(_read_toml(Path(config_path)))
    known = {o.name for o in OPTIONS}
    for key, raw in environ.items():
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG":
            name = key[len(ENV_PREFIX):].lower()
            if name not in known:
                raise UsageError(f"environment variable {key} is not a setting; "
                                 f"see 'swarm-node run --help' for the settings")
            values[name] = (raw, f"environment variable {key}")
    for opt in OPTIONS:
        if hasattr(args, opt.name):
            values[opt.name] = (getattr(args, opt.name), "--" + opt.name.replace("_", "-"))
    parsed = {}
    for opt in OPTIONS:
        if opt.name in values:
            raw, source = values[opt.name]
            try:
                parsed[opt.name] = opt.parse(raw)
            except (TypeError, ValueError) as e:
                raise UsageError(f"{source} = {raw!r}: {e}") from None
    config = NodeConfig(**parsed)
    _check_consistency(config)
    return config


def _read_toml(path: Path) -> dict[str, tuple[Any, str]]:
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    known = {o.name for o in OPTIONS}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"config file {path}: unknown setting {key!r}; see 'swarm-node run --help'")
        out[name] = (value, f"{path}: {key}")
    return out


def _check_consistency(config: NodeConfig) -> None:
    if config.new_swarm and config.initial_peers:
        raise UsageError("--new-swarm starts a swarm, --initial-peers joins one: give only one of them")
    if not config.new_swarm and not config.initial_peers:
        raise UsageError("give --initial-peers MADDR ... to join a swarm, or --new-swarm to start one")
    stages = config.hosted_stages()
    if stages is not None and max(stages) >= config.num_stages:
        raise UsageError(f"--stages {config.stages}: this swarm has stages 0..{config.num_stages - 1}")
    if config.visits and not (min(2, config.num_stages) <= config.visits <= config.num_stages):
        raise UsageError(f"--visits {config.visits}: give between 2 and --num-stages ({config.num_stages}), "
                         f"or 0 for full pipelines")
    if config.data and config.dataset:
        raise UsageError("give either --data or --dataset, not both")
    for spec in config.domain:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or "/" in name or name.startswith(("_", "*")):
            raise UsageError(f"--domain {spec!r}: expected NAME=PATH with a NAME without '/', '_' or '*' first")
        if not path.startswith("hf:") and not Path(path).is_file():
            raise UsageError(f"--domain {spec!r}: {path} does not exist")
    if config.expert_seed and not (Path(config.expert_seed) / "manifest.json").is_file():
        raise UsageError(f"--expert-seed {config.expert_seed}: not an expert checkpoint (no manifest.json)")
    if config.role == "expert" and config.stages != "auto":
        raise UsageError("--role expert hosts no stage; drop --stages")
    if config.max_inflight > config.memory_slots:
        raise UsageError(f"--max-inflight {config.max_inflight} exceeds --memory-slots {config.memory_slots}")
