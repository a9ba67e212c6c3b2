"""A forced SkipPipe swap, end to end: a plan whose path visits stage 2 before stage 1 runs through real stage
servers, and its loss and gradients equal those of the same layers run in the same order in one process."""

from __future__ import annotations

import pytest
import torch
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from lm.build import build_stage
from lm.data import load_corpus
from lm.presets import resolve_model
from lm.tokenizer import load_tokenizer
from node.process.local_swarm import LocalSwarm
from protocol.envelope import HopSpec
from protocol.record_auth import RefusalCounter, load_identity, record_validators
from protocol.records import PlannedMicrobatch, RoundPlan, plan_key
from tests.helpers import REPO, wait_for

pytestmark = pytest.mark.slow

SEED, BATCH, SEQ = 3, 2, 32
ORDER = (0, 2, 1, 3)  # stage 2 before stage 1: a swap of depth 1


def test_swapped_path_matches_one_process(tmp_path):
    data = REPO / "README.md"
    swarm = LocalSwarm(tmp_path, "swap", common_args=[
        "--num-stages", "4", "--microbatches", "1", "--rounds", "1", "--torch-threads", "1", "--device", "cpu",
        "--seed", str(SEED), "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--data", str(data),
        "--min-nodes", "99",  # nobody plans: the test publishes the round's plan, signed as the planner
        "--round-timeout", "60"])
    identity = tmp_path / "planner.key"
    _, planner_key, _ = load_identity(str(identity))
    dht = None
    try:
        nodes = [swarm.start_node("d", "0", extra=["--identity-path", str(identity)])]
        swarm.wait_started(nodes, timeout=120)
        nodes += [swarm.start_node(f"s{s}", str(s), initial_peers=swarm.initial_peers()) for s in (1, 2, 3)]
        swarm.wait_started(nodes, timeout=120)
        hop = {int(n.stages): HopSpec(int(n.stages), n.started()["peer_id"], n.started()["endpoint"]) for n in nodes}
        path = tuple(hop[s] for s in ORDER) + (hop[0],)
        plan = RoundPlan(round=0, planner=hop[0].peer_id, membership_digest="forced",
                         microbatches=(PlannedMicrobatch(0, path),), deadline=get_dht_time() + 60)
        validators = record_validators(planner_key, None, RefusalCounter())
        dht = DHT(initial_peers=swarm.initial_peers(), client_mode=True, start=True, record_validators=validators)
        assert dht.store(plan_key("swap", 0), plan.to_value(), get_dht_time() + 120,
                         subkey=validators[0].local_public_key)
        wait_for(lambda: all(n.events("round") for n in nodes), 120, "the forced round on every node")
    finally:
        if dht is not None:
            dht.shutdown()
        swarm.stop()
    events = {int(n.stages): n.events("round")[0] for n in nodes}
    assert events[0]["failed"] == 0
    assert [[h[0] for h in mb["path"]] for mb in events[0]["plan"]["microbatches"]] == [[0, 2, 1, 3, 0]]

    # The same layers, in the same order, in this process.
    tokenizer = load_tokenizer(None)
    spec = resolve_model("tiny", tokenizer.vocab_size)
    stages = {s: build_stage(spec, s, 4, seed=SEED) for s in range(4)}
    gen = torch.Generator().manual_seed((SEED * 1_000_003 + 0) * 1_000_003 + 0)  # Origin.sample's stream
    ids = load_corpus([str(data)], None, tokenizer).sample(gen, BATCH, SEQ)
    hidden = stages[0](stages[0].embed(ids))
    for s in ORDER[1:]:
        hidden = stages[s](hidden)
    loss = stages[0].loss(stages[0].logits(hidden), ids)
    loss.backward()
    assert events[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for s, module in stages.items():
        norm = torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]).item()
        assert events[s]["grad_norms"][str(s)] == pytest.approx(norm, rel=1e-4), s
