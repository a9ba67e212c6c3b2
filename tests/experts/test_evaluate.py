import math

import pytest
import torch

from experts.evaluate import (EvalSettings, PriorCache, evaluate_ensemble, reference_difficulty, token_logprobs,
                              write_csv)
from experts.mixture import mixture_logprobs, perplexity


def test_ensemble_picks_the_right_expert_per_domain(trained_pair, tmp_path):
    pairs, domains = trained_pair
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


def test_prior_on_one_real_expert_reproduces_its_perplexity(trained_pair):
    pairs, domains = trained_pair
    settings = EvalSettings(seq_len=32)
    test = domains[1].test.windows(32, 8)
    logp = torch.stack([token_logprobs(m, test, settings) for _, m in pairs])
    single = perplexity(token_logprobs(pairs[1][1], test, settings))
    assert perplexity(mixture_logprobs(logp, torch.tensor([-math.inf, 0.0]))) == pytest.approx(single, rel=1e-6)
    assert perplexity(logp[0]) != pytest.approx(single, rel=1e-3)  # the experts really differ


def test_token_logprobs_matches_the_model_loss(trained_pair):
    pairs, domains = trained_pair
    manifest, model = pairs[0]
    windows = domains[0].test.windows(32, 4)
    logp = token_logprobs(model, windows, EvalSettings(seq_len=32, batch_size=3))
    assert logp.shape == (4, 31)
    loss = model(input_ids=windows, labels=windows).loss
    assert -logp.mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_reference_difficulty_is_the_dev_loss_in_bits(trained_pair):
    pairs, domains = trained_pair
    settings = EvalSettings(seq_len=32, dev_windows=8)
    code_expert = pairs[0][1]
    bits = reference_difficulty(code_expert, domains, settings)
    assert bits["code"] < bits["prose"]  # the code expert finds its own domain easier
    dev = domains[0].dev.windows(32, 8)
    assert bits["code"] == pytest.approx(-token_logprobs(code_expert, dev, settings).mean().item() / math.log(2))
