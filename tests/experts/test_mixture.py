import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experts.mixture import (estimate_prior, mixture_logprobs, perplexity, posterior_weights,
                             uniform_log_prior)


def test_posterior_mixture_matches_hand_computation():
    p1, p2, prior = [0.5, 0.2, 0.9], [0.1, 0.6, 0.3], [0.7, 0.3]
    logp = torch.tensor([[p1], [p2]], dtype=torch.float64).log()  # [E=2, B=1, T=3]
    got = mixture_logprobs(logp, torch.tensor(prior, dtype=torch.float64).log()).exp()[0].tolist()
    # w(t) is proportional to prior * product of the expert's probabilities of the tokens before t
    w0 = [0.7, 0.3]
    w1 = [0.7 * 0.5 / 0.38, 0.3 * 0.1 / 0.38]
    w2 = [0.7 * 0.5 * 0.2 / 0.088, 0.3 * 0.1 * 0.6 / 0.088]
    expected = [w0[0] * 0.5 + w0[1] * 0.1, w1[0] * 0.2 + w1[1] * 0.6, w2[0] * 0.9 + w2[1] * 0.3]
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(0.38)
    # the sequence probability is the Bayesian marginal: sum_j prior_j * prod_t p_j(x_t)
    assert math.prod(got) == pytest.approx(0.7 * 0.5 * 0.2 * 0.9 + 0.3 * 0.1 * 0.6 * 0.3, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**16))
def test_weights_are_a_distribution(n_experts, batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n_experts, batch, length, generator=gen, dtype=torch.float64) * 8
    log_prior = torch.log_softmax(torch.randn(n_experts, generator=gen, dtype=torch.float64), dim=0)
    w = posterior_weights(logp, log_prior).exp()
    assert torch.allclose(w.sum(dim=0), torch.ones(batch, length, dtype=torch.float64))
    assert torch.allclose(w[:, :, 0], log_prior.exp().view(-1, 1).expand(-1, batch))  # t=0: the prior


def test_prior_on_one_expert_reproduces_that_expert():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 4, 10, generator=gen) * 5
    for j in range(3):
        log_prior = torch.full((3,), -math.inf)
        log_prior[j] = 0.0
        assert perplexity(mixture_logprobs(logp, log_prior)) == pytest.approx(perplexity(logp[j]), rel=1e-6)


def test_top1_follows_the_heaviest_expert_and_topk_all_is_the_full_mixture():
    logp = torch.tensor([[[-1.0, -3.0, -0.1]], [[-2.0, -0.5, -4.0]]])
    prior = uniform_log_prior(2)
    # t0 tie keeps both; t1: expert 0 saw -1 vs -2 so it leads; t2: expert 0 saw -4 vs -2.5, expert 1 leads
    top1 = mixture_logprobs(logp, prior, top_k=1)[0]
    assert top1[1].item() == pytest.approx(-3.0)
    assert top1[2].item() == pytest.approx(-4.0)
    assert torch.equal(mixture_logprobs(logp, prior, top_k=2), mixture_logprobs(logp, prior))


def test_prior_estimate_concentrates_on_the_expert_that_explains_dev():
    good, bad = torch.full((1, 8, 16), -0.5), torch.full((1, 8, 16), -2.0)
    prior = estimate_prior(torch.cat([bad, good]))
    assert prior.sum().item() == pytest.approx(1.0)
    assert prior[1] > 0.99
    assert torch.allclose(estimate_prior(torch.cat([good, good])), torch.tensor([0.5, 0.5]))
