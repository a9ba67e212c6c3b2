"""Correctness anchor: a full-pipeline microbatch through real stage servers (separate processes, gRPC)
computes the same logits, loss and gradients as the unsplit `LlamaForCausalLM` it was sliced from."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hivemind.utils import get_dht_time
from transformers import LlamaForCausalLM

from lm.build import build_stage
from lm.presets import resolve_model
from lm.tokenizer import ByteTokenizer
from node.config import NodeConfig
from node.daemon import Daemon
from node.process.local_swarm import LocalSwarm
from node.control.planning import plan_round
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def test_pipeline_through_stage_servers_matches_the_unsplit_model(tmp_path):
    torch.manual_seed(0)
    full = LlamaForCausalLM(resolve_model("tiny", ByteTokenizer.vocab_size).config)
    checkpoint = tmp_path / "ckpt"
    full.save_pretrained(checkpoint)
    swarm_id = "anchor"

    # Stage 0 runs in this process (so the test can read its logits); stages 1 and 2 are separate daemons.
    node = Daemon.create(NodeConfig.of(swarm=swarm_id, new_swarm=True, stages="0", num_stages=3,
                                      model=str(checkpoint), device="cpu", dtype="float32", round_timeout=60))
    servers = LocalSwarm(tmp_path, swarm_id, common_args=["--num-stages", "3", "--model", str(checkpoint),
                                                          "--torch-threads", "1", "--device", "cpu",
                                                          "--round-timeout", "60"])
    try:
        origin, host = node.role, node.host.services  # stage 0's role, and the host it serves on
        assert origin.join() == 0  # serving, but the test drives the round itself instead of run()
        nodes = [servers.start_node(f"stage{s}", str(s), initial_peers=host.maddrs[:1]) for s in (1, 2)]
        servers.wait_started(nodes, timeout=120)
        members = wait_for(lambda: (m := host.directory.members()) and len(m) == 3
                           and all(r.serving for r in m.values()) and m, 60, "all three nodes serving")

        # Round 0 plans two microbatches but the test feeds only the first: the stage servers keep
        # waiting for the second, so their accumulated gradients stay readable until the test is done.
        plan, _ = plan_round(members, {}, round_=0, num_stages=3, visits=3, microbatches_per_origin=2,
                             activation_bytes=2 * 32 * 64 * 4, planner=host.peer_id, deadline=get_dht_time() + 60)
        host.directory.publish_plan(plan, ttl=120)
        origin.executor.begin_round(0, {(mb, hop) for mb, hop, _ in plan.work_of(host.peer_id)})
        ids = torch.randint(0, ByteTokenizer.vocab_size, (2, 32))
        result = origin.origin.run_round(0, [plan.microbatches[0]], time.monotonic() + 60, threading.Event(),
                                         inputs={0: ids}, keep_logits=True)
        assert not result.failed, result.failed

        expected = full(ids, labels=ids)
        expected.loss.backward()
        torch.testing.assert_close(result.logits[0], expected.logits)
        assert result.losses[0] == pytest.approx(expected.loss.item(), rel=1e-6)

        full_params = dict(full.named_parameters())
        grads = {0: {n: p.grad for n, p in origin.trainers[0].module.named_parameters()}}
        for server, stage in zip(nodes, (1, 2)):
            _, tensors, _ = host.clients.fetch_state(server.started()["endpoint"], swarm_id, stage,
                                                     include_grads=True, receiver=server.started()["peer_id"],
                                                     timeout=60)
            grads[stage] = {k.removeprefix("grad/"): v for k, v in tensors.items() if k.startswith("grad/")}
        compared = 0
        spec = resolve_model(str(checkpoint))
        for stage in (0, 1, 2):
            names = build_stage(spec, stage, 3).checkpoint_names()
            assert set(grads[stage]) == set(names), f"stage {stage} sent gradients for other parameters"
            for name, ckpt_name in names.items():
                torch.testing.assert_close(grads[stage][name], full_params[ckpt_name].grad)
                compared += 1
        assert compared == len(full_params)  # every parameter of the model, across the three stages
    finally:
        servers.stop()
        node.shutdown()

