"""Stage checkpoints (atomic, verified) and CheckFree's rebuild of a lost stage from its neighbours."""

from __future__ import annotations

import torch

from lm.build import build_stage
from lm.presets import resolve_model
from lm.tokenizer import load_tokenizer
from node.config import TrainingConfig
from node.control.checkpoint import StageCheckpoints
from node.control.restore import checkfree
from node.stage.trainer import StageTrainer

NUM_STAGES = 3


def trainer(stage: int, seed: int = 0) -> StageTrainer:
    spec = resolve_model("tiny", load_tokenizer(None).vocab_size)
    module = build_stage(spec, stage, NUM_STAGES, seed, torch.device("cpu"), torch.float32)
    return StageTrainer(module, TrainingConfig(lr=1e-2, weight_decay=0.0, grad_clip=1.0, warmup_rounds=0),
                        recheck_s=0.25)


def step(t: StageTrainer, round_: int) -> None:
    t.set_grads([torch.full_like(p, 0.01) for p in t.params])
    t.step(round_)


def test_a_checkpoint_restores_parameters_optimizer_and_round(tmp_path):
    t = trainer(1)
    for r in range(3):
        step(t, r)
    checkpoints = StageCheckpoints(tmp_path)
    path = checkpoints.save(t)
    assert (path / "manifest.json").is_file() and not list(path.parent.glob(".round-*"))  # renamed into place
    fresh = trainer(1, seed=1)
    assert fresh.digest() != t.digest()
    round_, tensors, metadata, _ = checkpoints.latest(1)
    fresh.load(tensors, metadata)
    assert round_ == 2 and fresh.completed_round == 2 and fresh.digest() == t.digest()
    step(t, 3)
    step(fresh, 3)  # the same AdamW state: the same next step
    assert fresh.digest() == t.digest()


def test_a_checkpoint_keeps_the_outer_state_and_a_replica_copy_keeps_the_copiers_residual(tmp_path):
    t = trainer(1)
    t.start_outer()
    step(t, 0)
    t.begin_sync("int8", 0)  # a pseudo-gradient posted: the residual is what int8 lost of it
    step(t, 1)
    path = StageCheckpoints(tmp_path).save(t)
    _, tensors, metadata, _ = StageCheckpoints(tmp_path).latest(1)
    restarted = trainer(1, seed=1)
    restarted.load(tensors, metadata)
    assert restarted.anchor_digest() == t.anchor_digest() and path.is_dir()
    assert torch.equal(restarted.outer.residual, t.outer.residual) and float(t.outer.residual.abs().sum()) > 0
    shared, shared_metadata = t.export()  # what FetchState sends: no residual
    assert "outer/residual" not in shared and "outer/residual" in tensors
    joiner = trainer(1, seed=2)
    joiner.start_outer()
    joiner.load(shared, shared_metadata)
    assert joiner.anchor_digest() == t.anchor_digest() and float(joiner.outer.residual.abs().sum()) == 0


def test_checkfree_forgets_the_outer_state_of_the_weights_it_replaced():
    t = trainer(1)
    t.start_outer()
    assert checkfree(t, {0: trainer(0).export(), 2: trainer(2).export()})
    assert t.outer is None and not t.optimizer.state


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    t = trainer(1)
    checkpoints = StageCheckpoints(tmp_path)
    step(t, 0)
    checkpoints.save(t)
    step(t, 1)
    newest = checkpoints.save(t)
    data = bytearray((newest / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "state.safetensors").write_bytes(bytes(data))
    assert checkpoints.latest(1)[0] == 0
    assert checkpoints.latest(2) is None


def test_checkfree_averages_the_neighbours_layers_by_their_gradient_norms():
    lost, before, after = trainer(1, seed=5), trainer(0), trainer(2)
    neighbours = {}
    for s, t, norm in ((0, before, 1.0), (2, after, 3.0)):
        tensors, metadata = t.export()
        metadata["grad_norm"] = repr(norm)
        neighbours[s] = (tensors, metadata)
    weights = checkfree(lost, neighbours)
    assert weights == {0: 0.25, 2: 0.75}
    mine = [n for n in lost.names if n.startswith("layers.")]
    assert mine
    layer = mine[0].split(".")[1]
    suffix = mine[0].split(".", 2)[2]
    first = lambda t: next(p for n, p in zip(t.names, t.params) if n.startswith("layers.") and n.endswith(suffix))
    expected = 0.25 * first(before) + 0.75 * first(after)
    assert torch.allclose(dict(zip(lost.names, lost.params))[f"layers.{layer}.{suffix}"], expected)


def test_a_replica_waiting_for_the_state_after_a_round_waits_for_the_whole_outer_step():
    t = trainer(1)
    t.start_outer()
    t.set_grads([torch.full_like(p, 0.01) for p in t.params])
    t.step(0, complete=False)  # under outer the sync is applied and the next one begun after the step
    assert t.completed_round == -1 and not t.wait_completed(0, timeout=0.3)
    t.begin_sync("raw", 0)
    t.complete(0)
    assert t.wait_completed(0, timeout=0.3)
    tensors, metadata = t.export()
    joiner = trainer(1, seed=2)
    joiner.load(tensors, metadata, source="donor")
    assert joiner.missed_sync() == (0, "donor")  # the copy lacks the sync the donor began
