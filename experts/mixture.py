"""The Bayesian mixture of experts (Branch-Train-Merge style), on per-token log-probabilities.

`logp[j, b, t]` is log p_j(x_t | x_<t) for expert j on sequence b. The weight of expert j at token t is
    w_j(t) = softmax_j(log prior_j + sum_{s<t} logp[j, b, s]),
the posterior over experts given the sequence so far; the mixture predicts sum_j w_j(t) p_j(x_t | x_<t).
"""

from __future__ import annotations

import math

import torch


def posterior_weights(logp: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Log-weights [E, B, T]; at t=0 they are the prior. -inf in the prior keeps an expert out."""
    seen = torch.cumsum(logp, dim=-1) - logp  # sum over s < t
    return torch.log_softmax(log_prior.view(-1, 1, 1) + seen, dim=0)


def mixture_logprobs(logp: torch.Tensor, log_prior: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """log p_mix(x_t | x_<t), shape [B, T]. `top_k` keeps the k heaviest experts per token, renormalised."""
    logw = posterior_weights(logp, log_prior)
    if top_k is not None and top_k < logp.shape[0]:
        kth = logw.topk(top_k, dim=0).values[-1:]
        logw = torch.log_softmax(logw.masked_fill(logw < kth, -math.inf), dim=0)
    return torch.logsumexp(logw + logp, dim=0)


def estimate_prior(logp_dev: torch.Tensor) -> torch.Tensor:
    """The domain prior: the mean over dev sequences of each sequence's posterior under a uniform prior."""
    per_sequence = torch.softmax(logp_dev.sum(dim=-1), dim=0)  # [E, B]
    return per_sequence.mean(dim=1)


def uniform_log_prior(n_experts: int) -> torch.Tensor:
    return torch.full((n_experts,), -math.log(n_experts))


def perplexity(logprobs: torch.Tensor) -> float:
    return math.exp(-logprobs.double().mean().item())
