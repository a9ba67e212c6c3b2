"""HDEE experts in a real swarm on loopback: separate `swarm-node run` processes, the DHT, gRPC.

One swarm serves the whole module, in order: a two-stage pipeline with two replicas per stage (the
smallest pipeline in which `--min-replicas 2` holds) trains while an expert node and an auto node train
experts for different domains; the expert node is killed mid-training
and resumes from its checkpoint; a separate process lists, fetches (sha256 verified), evaluates and samples
the experts; a corrupted file is refused; a stage replica dies and the auto node takes its stage.

Before the expert nodes start, a peer that joined the swarm's DHT from this process forges what an attacker
could: catalogue entries (unsigned, and signed by itself), a note naming itself the catalogue's owner, a seed
record under the real seed's id with other weights, a copy of the real seed's record served with other bytes
(from a gRPC server here), and an inflated claim on the hardest domain. None of it may change what the expert
nodes train or branch from; they count each forgery as refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from node.cli import main
from node.process.local_swarm import LocalSwarm
from protocol.generated.swarm.v1 import experts_pb2 as pb
from protocol.generated.swarm.v1 import experts_pb2_grpc as pb_grpc
from protocol.record_auth import owner_peer_id
from protocol.records import catalogue_key, experts_key, seed_id, vouch_value
from tests.helpers import metric, rounds, run_cli, wait_for

pytestmark = pytest.mark.slow

SWARM = "experts-swarm"
COMMON = ["--num-stages", "2", "--torch-threads", "1", "--device", "cpu", "--microbatches", "2", "--seq-len", "32",
          "--round-timeout", "20", "--heartbeat-interval", "1", "--record-ttl", "30", "--log-level", "info"]
EXPERT = ["--expert-steps", "24", "--expert-save-every", "6"]


def domain_text(kind: str, n: int = 30_000) -> str:
    """Two clearly different toy domains, generated here: code-like and prose-like."""
    if kind == "code":
        return "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(n // 30))[:n]
    words = ["red", "blue", "green", "grey", "old", "quiet", "tall", "river", "hill", "slowly"]
    return " ".join(f"The {words[i % 4]} {words[7 + i % 2]} flows {words[9]} past the {words[4 + i % 3]} hills."
                    for i in range(n // 50))[:n]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    work = tmp_path_factory.mktemp("experts-swarm")
    domains = []
    for kind in ("code", "prose"):
        (work / f"{kind}.txt").write_text(domain_text(kind))
        domains += ["--domain", f"{kind}={work / f'{kind}.txt'}"]
    swarm = LocalSwarm(work, SWARM, common_args=COMMON)
    swarm.expert_dir = work / "experts"
    swarm.domains = domains
    seed = _seed_checkpoint(work / "seed")  # the creator names it in the catalogue; e1 serves it
    swarm.seed_sha256 = json.loads((seed / "manifest.json").read_text())["weights_sha256"]
    attackers, liar = [], grpc.server(ThreadPoolExecutor(max_workers=2))
    try:  # a failed start-up must not leave nodes running
        first = swarm.start_node("data0", "0", extra=domains + ["--expert-seed", str(seed)])
        swarm.wait_started([first], timeout=120)
        peers = swarm.initial_peers()
        pipeline = [swarm.start_node(n, s, initial_peers=peers)
                    for n, s in [("data0b", "0"), ("s1a", "1"), ("s1b", "1")]]
        swarm.wait_started(pipeline, timeout=180)  # started: their records are in the DHT, so `auto` counts 2 replicas
        signer = RSASignatureValidator(RSAPrivateKey())  # the attacker's own key: it signs only its own subkeys
        attackers.append(DHT(initial_peers=peers, start=True, record_validators=[signer]))
        swarm.hardest = _forge(attackers[0], signer.local_public_key, swarm)
        signer = RSASignatureValidator(RSAPrivateKey())  # a second key: the first one wrote the seed id's subkey
        attackers.append(DHT(initial_peers=peers, start=True, record_validators=[signer]))
        _substitute_seed(attackers[1], signer.local_public_key, liar, seed)
        experts = [swarm.start_node("e1", "auto", initial_peers=peers,
                                    extra=_expert_args(swarm, "e1", "expert") + ["--expert-seed", str(seed)]),
                   swarm.start_node("a1", "auto", initial_peers=peers,
                                    extra=_expert_args(swarm, "a1", "auto") + ["--min-replicas", "2"])]
        swarm.wait_started(experts, timeout=120)
        yield swarm
    finally:
        swarm.stop()
        liar.stop(0)
        for attacker in attackers:
            attacker.shutdown()


def _substitute_seed(dht: DHT, owner: bytes, liar: grpc.Server, seed) -> None:
    """Publish the real seed's record (id, sha256, size) as served by `liar`, which streams other bytes."""
    size = (seed / "model.safetensors").stat().st_size
    manifest = json.loads((seed / "manifest.json").read_text())

    class Substituting(pb_grpc.ExpertServiceServicer):
        def FetchExpert(self, request, context):
            yield pb.ExpertChunk(offset=0, total=size, sha256=manifest["weights_sha256"], data=b"\0" * size)
    pb_grpc.add_ExpertServiceServicer_to_server(Substituting(), liar)
    port = liar.add_insecure_port("127.0.0.1:0")
    liar.start()
    expert_id = seed_id(manifest["weights_sha256"])
    assert dht.store(experts_key(SWARM, "*"), {**manifest, "domain": "*", "id": expert_id,
                                               "peer_id": owner_peer_id(owner), "endpoint": f"127.0.0.1:{port}",
                                               "bytes": size, "dev_loss": None, "v": 1},
                     get_dht_time() + 3600, subkey=expert_id.encode() + owner)


def _forge(dht: DHT, owner: bytes, swarm) -> str:
    """Store the forgeries (see the module's docstring); returns the hardest domain, whose claim is inflated."""
    from experts.domains import make_domain
    from lm.tokenizer import ByteTokenizer

    me = owner_peer_id(owner)
    hour = get_dht_time() + 3600
    later = iter(hour + i for i in range(10))  # distinct: hivemind orders equal expiries by subkey
    text = {kind: make_domain(kind, "test", domain_text(kind), ByteTokenizer()) for kind in ("code", "prose")}
    hardest = max(text, key=lambda k: (text[k].difficulty, k))
    entry = {"source": "/nowhere", "sha256": "ee" * 32, "tokens": 1000, "difficulty": 15.0, "v": 1}
    catalogue = catalogue_key(SWARM)
    assert dht.store(catalogue, entry, next(later), subkey=b"code")  # unsigned, with another sha256: code never trains
    assert dht.store(catalogue, entry, next(later), subkey=b"code" + owner)  # signed by a member, not the owner
    assert dht.store(catalogue, entry, next(later), subkey=b"evil" + owner)  # a fake domain
    assert dht.store(catalogue, {**entry, "sha256": text["prose"].sha256, "seed": seed_id("dd" * 32),
                                 "seed_sha256": "dd" * 32}, next(later), subkey=b"prose" + owner)  # its own seed
    assert dht.store(catalogue, vouch_value(me), next(later), subkey=b"_owner" + owner)  # "I own it"
    manifest = {"name": "x", "domain": "*", "config": {"hidden_size": 8}, "tokenizer": "bytes-v1", "seed_hash": "",
                "parent": None, "lineage": [], "steps": 2, "target_steps": 2, "tokens": 10, "flops": 1.0,
                "val_ppl": 3.0, "weights_sha256": "dd" * 32, "extra": {}, "format": "swarm-node/expert-v1"}
    real_seed = seed_id(swarm.seed_sha256)  # the real seed's id over other weights: a re-pointed seed
    assert dht.store(experts_key(SWARM, "*"), {**manifest, "id": real_seed, "peer_id": me, "endpoint": "127.0.0.1:9",
                                               "bytes": 100, "dev_loss": 1.0, "v": 1},
                     next(later), subkey=real_seed.encode() + owner)
    claim_id = f"{hardest}-{me[-8:]}-0"  # a claim of the whole swarm's budget and more
    assert dht.store(experts_key(SWARM, hardest),
                     {**manifest, "domain": hardest, "steps": 0, "target_steps": 24, "flops": 0.0,
                      "extra": {"planned_flops": 1e30}, "id": claim_id, "peer_id": me, "endpoint": "127.0.0.1:9",
                      "bytes": 100, "dev_loss": None, "v": 1}, next(later), subkey=claim_id.encode() + owner)
    return hardest


def _seed_checkpoint(out):
    """A seed expert of the swarm's model (the tiny preset, byte tokenizer), trained for two steps."""
    from experts.checkpoint import new_model
    from experts.domains import make_domain
    from experts.train import Identity, TrainConfig, train
    from lm.presets import resolve_model
    from lm.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    domain = make_domain("seed", "test", domain_text("code", 6000) + domain_text("prose", 6000), tokenizer)
    train(new_model(resolve_model("tiny", tokenizer.vocab_size).config, 0), domain.train, domain.dev,
          TrainConfig(steps=2, batch_size=2, seq_len=32, eval_windows=2), out, Identity("seed", "*", tokenizer.name),
          progress=False)
    return out


def _expert_args(swarm, name: str, role: str) -> list[str]:
    return ["--role", role, "--expert-dir", str(swarm.expert_dir), "--identity-path",
            str(swarm.workdir / f"{name}.key"), *EXPERT]


def node(swarm, name):
    return [n for n in swarm.nodes if n.name == name][-1]


def listed(swarm) -> list[dict]:
    result = run_cli("experts", "list", "--swarm", SWARM, "--json", "--initial-peers", *swarm.initial_peers())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_experts_train_while_the_pipeline_trains(swarm):
    e1, a1, data = node(swarm, "e1"), node(swarm, "a1"), node(swarm, "data0")
    assert e1.started()["role"] == "expert" and a1.started()["role"] == "expert"  # auto: every stage has 2
    before = max(rounds(data), default=-1)
    wait_for(lambda: e1.events("expert_published") and a1.events("expert_published"), 120,
             "both expert nodes to publish a checkpoint")
    wait_for(lambda: max(rounds(data), default=-1) >= before + 2, 120, "pipeline rounds while the experts train")
    # Different domains: the second claim yields to the first.
    wait_for(lambda: {e["domain"] for e in e1.events("expert_started") + a1.events("expert_started")} ==
             {"code", "prose"}, 60, "experts for both domains")
    wait_for(lambda: metric(e1, "swarm_node_expert_steps_total") > 0, 60, "the steps metric to count")
    assert e1.events("expert_started")[0]["seed_source"].startswith("catalogue seed seed-")
    assert metric(e1, 'swarm_node_role{role="expert"}') == 1


def test_forged_catalogue_seed_and_claim_change_nothing(swarm, tmp_path):
    e1, a1 = node(swarm, "e1"), node(swarm, "a1")
    started = wait_for(lambda: e1.events("expert_started") and a1.events("expert_started")
                       and e1.events("expert_started") + a1.events("expert_started"), 120, "both experts to start")
    # The catalogue is the creator's: both real domains train (code's sha256 was not moved, the inflated claim
    # did not push both nodes off the hardest domain), the fake one never does, every expert branches from the
    # creator's seed and not from the attacker's.
    assert {e["domain"] for e in started} == {"code", "prose"}
    assert {e["seed_source"] for e in started} == {f"catalogue seed {seed_id(swarm.seed_sha256)}"}
    first = min(started, key=lambda e: e["time"])
    assert first["domain"] == swarm.hardest  # nothing spent yet: the hardest domain goes first, as without a claim
    trained = [r for r in listed(swarm) if r["domain"] != "*" and r["peer_id"] in
               {e1.started()["peer_id"], a1.started()["peer_id"]}]
    assert trained and all(r["manifest"]["lineage"][0] == swarm.seed_sha256 for r in trained)
    for reason in ("unowned", "not_owner", "id", "not_member"):
        assert metric(e1, f'swarm_node_expert_records_refused_total{{reason="{reason}"}}') + \
            metric(a1, f'swarm_node_expert_records_refused_total{{reason="{reason}"}}') > 0, reason
    log = e1.log_path.read_text()
    assert "refusing catalogue entry 'evil'" in log and "is no live member" in log
    # Two peers serve the seed's id and sha256, one with other bytes: a fetch ends with the real ones.
    seed = seed_id(swarm.seed_sha256)
    assert len([r for r in listed(swarm) if r["id"] == seed]) == 2  # the re-pointed record was refused
    result = run_cli("experts", "fetch", "--swarm", SWARM, "--initial-peers", *swarm.initial_peers(),
                     "--out", str(tmp_path), "--expert", seed)
    assert result.returncode == 0 and result.stdout.count("verified") == 1, result.stdout + result.stderr
    assert hashlib.sha256((tmp_path / seed / "model.safetensors").read_bytes()).hexdigest() == swarm.seed_sha256


def test_killed_expert_node_resumes_from_its_checkpoint(swarm):
    e1 = node(swarm, "e1")
    peer = e1.started()["peer_id"]

    def mid_expert():  # the newest checkpoint is in the middle of an expert: at least 6 steps to go
        published = e1.events("expert_published")
        last = published[-1] if published else None
        return last if last and 0 < last["steps"] < last["target_steps"] else None
    mid = wait_for(mid_expert, 120, "a checkpoint in the middle of an expert", interval=0.05)
    os.killpg(e1.process.pid, signal.SIGKILL)  # the host dies
    e1.process.wait()
    on_disk = json.loads((swarm.expert_dir / SWARM / peer / mid["id"] / "manifest.json").read_text())
    assert 0 < on_disk["steps"] < on_disk["target_steps"]
    again = swarm.start_node("e1", "auto", initial_peers=swarm.initial_peers(), extra=_expert_args(swarm, "e1", "expert"))
    swarm.wait_started([again], timeout=120)
    assert again.started()["peer_id"] == peer  # the same identity
    resumed = wait_for(lambda: [e for e in again.events("expert_started") if e["id"] == mid["id"]], 120,
                       "the unfinished expert to resume")[0]
    assert resumed["resumed"]
    stopped = wait_for(lambda: [e for e in again.events("expert_stopped") if e["id"] == mid["id"]], 120,
                       "the resumed expert to finish")[0]
    # The step count continues from the checkpoint; it never starts over.
    assert stopped["start_step"] == on_disk["steps"] and stopped["steps"] == stopped["target_steps"]


def test_list_fetch_eval_generate(swarm, tmp_path, capsys):
    def finished_domains():  # from the event files: cheaper than polling the DHT
        return {e["domain"] for n in (node(swarm, "e1"), node(swarm, "a1")) for e in n.events("expert_stopped")
                if e["steps"] == e["target_steps"]}
    wait_for(lambda: finished_domains() == {"code", "prose"}, 180, "a finished expert for each domain")
    done = {}
    for r in listed(swarm):  # the CLI, as an operator would look
        if r["steps"] == r["target_steps"] and r["domain"] != "*":  # "*": the seed every expert branched from
            done.setdefault(r["domain"], r)
    assert set(done) == {"code", "prose"}
    for r in done.values():
        assert {"id", "domain", "sha256", "bytes", "steps", "dev_loss", "peer_id"} <= set(r)
    out = tmp_path / "fetched"
    ids = [r["id"] for r in done.values()]
    result = run_cli("experts", "fetch", "--swarm", SWARM, "--initial-peers", *swarm.initial_peers(),
                     "--out", str(out), *[f"--expert={i}" for i in ids])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("verified") == 2
    for r in done.values():
        assert sorted(p.name for p in (out / r["id"]).iterdir()) == ["config.json", "manifest.json",
                                                                     "model.safetensors"]
        assert (out / r["id"] / "model.safetensors").stat().st_size == r["bytes"]
    served_by = {r["peer_id"] for r in done.values()}
    assert sum(metric(n, "swarm_node_expert_bytes_served_total") for n in swarm.nodes
               if n.alive() and n.started()["peer_id"] in served_by) >= sum(r["bytes"] for r in done.values())

    # In this process (one torch import for both commands), as `swarm-node experts eval|generate`.
    table = tmp_path / "eval.csv"
    assert main(["experts", "eval", "--experts", str(out), *swarm.domains, "--seq-len", "32", "--dev-windows", "8",
                 "--test-windows", "8", "--device", "cpu", "--threads", "1", "--csv", str(table)]) == 0
    ppl = {(row["domain"], row["variant"]): float(row["perplexity"]) for row in csv.DictReader(table.open())}
    for domain in ("code", "prose"):
        assert math.isfinite(ppl[domain, "posterior"]) and ppl[domain, "posterior"] > 1
        assert ppl[domain, "posterior"] <= ppl[domain, "best-single"] * 1.01, ppl

    capsys.readouterr()
    assert main(["experts", "generate", "--experts", str(out), "--prompt", "def f1(x):", "--max-new-tokens", "8",
                 "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip()


def test_corrupt_weights_are_refused_and_withdrawn(swarm, tmp_path):
    e1 = node(swarm, "e1")
    record = next(e for e in e1.events("expert_stopped") if e["steps"] == e["target_steps"])
    weights = swarm.expert_dir / SWARM / e1.started()["peer_id"] / record["id"] / "model.safetensors"
    middle = weights.stat().st_size // 2
    with open(weights, "r+b") as f:  # one flipped byte, in place: the served snapshot shares the inode
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "bad"
    result = run_cli("experts", "fetch", "--swarm", SWARM, "--initial-peers", *swarm.initial_peers(),
                     "--out", str(out), "--expert", record["id"])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "DATA_LOSS" in result.stderr, result.stderr
    assert not (out / record["id"] / "model.safetensors").exists()
    assert record["id"] not in {r["id"] for r in listed(swarm)}  # withdrawn before the refusal was sent


def test_auto_node_takes_a_stage_that_runs_short(swarm):
    a1, victim = node(swarm, "a1"), node(swarm, "s1b")
    assert a1.events("expert_published")
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    relaunch = wait_for(lambda: a1.events("relaunch"), 60, "the auto node to leave its experts for the stage")[0]
    assert relaunch["role"] == "stage" and relaunch["stage"] == 1
    stopped = [e for e in a1.events("expert_stopped") if e["time"] <= relaunch["time"]]
    assert stopped  # it stopped at a checkpoint
    restarted = wait_for(lambda: [e for e in a1.events("started") if e["stages"] == [1]], 120,
                         "the auto node to start as a stage-1 replica")[0]
    assert a1.alive()
    # It serves stage 1 and follows the swarm's rounds with the replicas' state; whether a round routes
    # microbatches through it is the planner's choice.
    wait_for(lambda: [e for e in a1.events("serving") if e["time"] > restarted["time"]], 120, "serving stage 1")
    wait_for(lambda: [e for e in a1.events("round") + a1.events("caught_up") if e["time"] > restarted["time"]
                      and "1" in e["digests"]], 120, "the auto node to hold stage 1 through a round")
