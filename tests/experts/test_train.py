import pytest
import torch

from experts.branch import branch
from experts.checkpoint import load_expert, new_model
from experts.train import Identity, TrainConfig, train


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 8, "batch_size": 2, "seq_len": 32, "warmup_steps": 2, "eval_windows": 2, **kw})


def test_resume_continues_at_the_same_step_with_the_same_loss(tmp_path, tiny_config, code_domain):
    ident = Identity("e", "code", "bytes-v1")
    full = train(new_model(tiny_config, 0), code_domain.train, code_domain.dev, _cfg(), tmp_path / "full", ident,
                 progress=False)
    first = train(new_model(tiny_config, 0), code_domain.train, code_domain.dev, _cfg(), tmp_path / "cut", ident,
                  stop_at=3, progress=False)
    assert first.manifest.steps == 3 and not first.manifest.complete
    # a fresh process would build a fresh model; resume must restore weights, optimizer, schedule and data order
    rest = train(new_model(tiny_config, 123), code_domain.train, code_domain.dev, _cfg(), tmp_path / "cut", ident,
                 resume=True, progress=False)
    assert rest.start_step == 3 and rest.manifest.steps == 8
    assert first.losses + rest.losses == full.losses
    assert rest.manifest.weights_sha256 == full.manifest.weights_sha256


def test_resume_refuses_a_different_schedule(tmp_path, tiny_config, code_domain):
    ident = Identity("e", "code", "bytes-v1")
    train(new_model(tiny_config, 0), code_domain.train, code_domain.dev, _cfg(), tmp_path, ident, stop_at=2,
          progress=False)
    with pytest.raises(ValueError, match="targets 8 steps"):
        train(new_model(tiny_config, 0), code_domain.train, code_domain.dev, _cfg(steps=9), tmp_path, ident,
              resume=True, progress=False)


def test_training_lowers_the_loss(tmp_path, tiny_config, code_domain):
    result = train(new_model(tiny_config, 0), code_domain.train, code_domain.dev, _cfg(steps=30, lr=1e-2),
                   tmp_path, Identity("e", "code", "bytes-v1"), progress=False)
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.0


@torch.no_grad()
def test_branching_wider_keeps_the_function_and_narrower_keeps_the_strongest_units(tiny_config):
    seed = new_model(tiny_config, 0).eval()
    x = torch.randint(0, 256, (2, 16))
    wide = branch(seed, 96, seed=1).eval()
    assert wide.model.layers[0].mlp.up_proj.weight.shape == (96, 32)
    assert torch.allclose(wide(input_ids=x).logits, seed(input_ids=x).logits, atol=1e-6)
    mlp = seed.model.layers[0].mlp
    mlp.down_proj.weight[:, :8] *= 100  # make units 0..7 dominant
    narrow = branch(seed, 8, seed=1)
    assert torch.equal(narrow.model.layers[0].mlp.down_proj.weight, mlp.down_proj.weight[:, :8])
    assert torch.equal(narrow.model.embed_tokens.weight, seed.model.embed_tokens.weight)


def test_identity_records_lineage(tmp_path, tiny_config, code_domain):
    seed = train(new_model(tiny_config, 0), code_domain.train, code_domain.dev, _cfg(steps=1), tmp_path / "seed",
                 Identity("seed", "*", "bytes-v1"), progress=False).manifest
    seed_model, _ = load_expert(tmp_path / "seed")
    child = train(branch(seed_model, 32, seed=1), code_domain.train, code_domain.dev, _cfg(steps=1),
                  tmp_path / "child", Identity.branched_from(seed, "child", "code", {}), progress=False).manifest
    assert child.seed_hash == seed.weights_sha256 == child.parent and child.lineage == [seed.weights_sha256]
    assert child.config["intermediate_size"] == 32
