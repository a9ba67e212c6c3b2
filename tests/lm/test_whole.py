"""The whole model from its stages: perplexity with omitted stages, and HF checkpoints transformers loads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from lm.build import build_stage
from lm.data import TokenStream
from lm.presets import resolve_model
from lm.whole import missing_shards, perplexity, save_stage_shard
from tests.helpers import run_cli

S = 4


@pytest.fixture(scope="module")
def stages():
    spec = resolve_model("tiny", 259)
    return spec, {s: build_stage(spec, s, S, seed=5) for s in range(S)}


def test_shards_form_a_checkpoint_transformers_loads(stages, tmp_path):
    spec, modules = stages
    for s in (0, 1, 2):
        save_stage_shard(modules[s], spec.config, S, tmp_path)
    assert missing_shards(tmp_path) == ["model-stage-3.safetensors"]  # each node writes its own shard
    save_stage_shard(modules[3], spec.config, S, tmp_path)
    assert missing_shards(tmp_path) == []
    tokens = TokenStream(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0)))
    ours = perplexity(modules, tokens, 32, max_sequences=8)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = tokens.windows(32, 8)
    with torch.no_grad():
        theirs = math.exp(model(ids, labels=ids).loss.item())
    assert ours == pytest.approx(theirs, rel=1e-5)
    omitted = perplexity(modules, tokens, 32, omit={2, 3}, max_sequences=8)
    assert omitted != pytest.approx(ours, rel=1e-9)  # the omitted layers were really skipped
    with pytest.raises(ValueError, match="stage 0"):
        perplexity(modules, tokens, 32, omit={0})


def test_eval_command_on_a_checkpoint(stages, tmp_path):
    spec, modules = stages
    for module in modules.values():
        save_stage_shard(module, spec.config, S, tmp_path / "model")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("def f(x):\n    return x + 1\n" * 200)
    part = run_cli("eval", "--model", str(tmp_path / "model"), "--data", str(heldout), "--omit-stages", "2,3",
                   "--json")
    assert part.returncode == 0, part.stderr
    result = json.loads(part.stdout)
    tokens = TokenStream(torch.tensor(list(heldout.read_bytes()), dtype=torch.long))
    assert result["omit_stages"] == [2, 3]
    assert result["perplexity"] == pytest.approx(perplexity(modules, tokens, 64, omit={2, 3}, max_sequences=256))
    bad = run_cli("eval", "--model", str(tmp_path / "model"), "--data", str(heldout), "--omit-stages", "0,2")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
