import pytest
import torch
from transformers import LlamaForCausalLM

from lm.build import build_stage, stage_parameters
from lm.presets import resolve_model, stage_layers
from lm.tokenizer import ByteTokenizer


def test_stage_layers_cover_every_layer_once():
    for layers, stages in [(8, 3), (8, 8), (5, 2), (32, 6)]:
        split = stage_layers(layers, stages)
        assert [i for r in split for i in r] == list(range(layers))
        assert max(map(len, split)) - min(map(len, split)) <= 1
    with pytest.raises(ValueError, match="cannot split"):
        stage_layers(4, 5)


def test_stage_parameters_count_what_the_built_stages_hold():
    spec = resolve_model("tiny", ByteTokenizer.vocab_size)
    built = [sum(p.numel() for p in build_stage(spec, s, 3).parameters()) for s in range(3)]
    assert stage_parameters(spec, 3) == built
    assert built[0] > built[1] > 0  # stage 0 also holds the embedding, the norm and the head


def test_sliced_stages_match_the_unsplit_model(tmp_path):
    """Stages built from slices of a checkpoint compute the same logits, loss and gradients as the whole model."""
    torch.manual_seed(0)
    full = LlamaForCausalLM(resolve_model("tiny", ByteTokenizer.vocab_size).config)
    full.save_pretrained(tmp_path)
    spec = resolve_model(str(tmp_path))
    stages = [build_stage(spec, s, 3) for s in range(3)]
    ids = torch.randint(0, ByteTokenizer.vocab_size, (2, 24))

    hidden = stages[0].embed(ids)
    for stage in stages:
        hidden = stage(hidden)
    logits = stages[0].logits(hidden)
    loss = stages[0].loss(logits, ids)
    loss.backward()

    expected = full(ids, labels=ids)
    expected.loss.backward()
    torch.testing.assert_close(logits, expected.logits)
    torch.testing.assert_close(loss, expected.loss)
    full_params = dict(full.named_parameters())
    for stage in stages:
        for name, ckpt_name in stage.checkpoint_names().items():
            torch.testing.assert_close(dict(stage.named_parameters())[name].grad, full_params[ckpt_name].grad)


def test_replicas_of_a_preset_stage_start_identical():
    spec = resolve_model("tiny", ByteTokenizer.vocab_size)
    a, b = build_stage(spec, 1, 4, seed=7), build_stage(spec, 1, 4, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_stage(spec, 1, 4, seed=8)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
