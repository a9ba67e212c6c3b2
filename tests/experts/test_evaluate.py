import math

import pytest
import torch

from transformers import LlamaConfig

from experts.checkpoint import new_model
from experts.domains import make_domain
from experts.evaluate import EvalSettings, PriorCache, evaluate_ensemble, token_logprobs, write_csv
from experts.mixture import mixture_logprobs, perplexity
from experts.train import Identity, TrainConfig, train
from lm.tokenizer import ByteTokenizer

from conftest import text_of  # module-scoped fixture below cannot take the function-scoped one


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two tiny experts, each trained briefly on its own domain."""
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("experts")
    domains = [make_domain(k, "toy", text_of(k), ByteTokenizer()) for k in ("code", "prose")]
    pairs = []
    for d in domains:
        cfg = TrainConfig(steps=25, batch_size=4, seq_len=32, lr=1e-2, eval_windows=4)
        model = new_model(config, 0)
        manifest = train(model, d.train, d.dev, cfg, out / d.name, Identity(d.name, d.name, "bytes-v1"),
                         progress=False).manifest
        pairs.append((manifest, model))
    return pairs, domains


def test_ensemble_picks_the_right_expert_per_domain(experts, tmp_path):
    pairs, domains = experts
    settings = EvalSettings(seq_len=32, dev_windows=8, test_windows=8)
    cache = PriorCache(tmp_path / "priors.json")
    results = evaluate_ensemble(pairs, domains, settings, cache)
    for r, own in zip(results, (0, 1)):
        assert r.best_single == r.domain
        assert r.prior[own] > 0.9 and sum(r.prior) == pytest.approx(1.0)
        assert set(r.ppl) == {"posterior", "uniform", "top2", "best-single"}
        assert r.ppl["posterior"] <= r.ppl["uniform"] * 1.001
    # the cached priors are reused: a second pass gives the same numbers
    again = evaluate_ensemble(pairs, domains, settings, PriorCache(tmp_path / "priors.json"))
    assert [r.ppl for r in again] == [r.ppl for r in results]
    write_csv(results, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text().count("\n") == 1 + 2 * 4


def test_prior_on_one_real_expert_reproduces_its_perplexity(experts):
    pairs, domains = experts
    settings = EvalSettings(seq_len=32)
    test = domains[1].test.windows(32, 8)
    logp = torch.stack([token_logprobs(m, test, settings) for _, m in pairs])
    single = perplexity(token_logprobs(pairs[1][1], test, settings))
    assert perplexity(mixture_logprobs(logp, torch.tensor([-math.inf, 0.0]))) == pytest.approx(single, rel=1e-6)
    assert perplexity(logp[0]) != pytest.approx(single, rel=1e-3)  # the experts really differ


def test_token_logprobs_matches_the_model_loss(experts):
    pairs, domains = experts
    manifest, model = pairs[0]
    windows = domains[0].test.windows(32, 4)
    logp = token_logprobs(model, windows, EvalSettings(seq_len=32, batch_size=3))
    assert logp.shape == (4, 31)
    loss = model(input_ids=windows, labels=windows).loss
    assert -logp.mean().item() == pytest.approx(loss.item(), rel=1e-5)
