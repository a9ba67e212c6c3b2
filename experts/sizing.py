"""Sizing policy: spend one FLOPs budget on domain experts, homogeneously or by difficulty.

MHo-IHo: every expert has the medium MLP width and the medium step count (the baseline).
MHe-IHo: MLP widths follow a linear ramp over the difficulty ranking (easiest narrowest); same steps.
MHo-IHe: step counts follow the same kind of ramp; same width.
Training FLOPs per token are affine in the MLP width and the step count is linear, so a ramp that is
symmetric around the medium value spends exactly the baseline budget; integer rounding is absorbed by
the hardest expert, which keeps the totals equal to the token (the 1% tolerance is never needed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: keeps `swarm-node --help` from importing transformers
    from transformers import LlamaConfig

METHODS = ("MHo-IHo", "MHe-IHo", "MHo-IHe")


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (decoder and LM head) plus attention scores.

    The embedding is a lookup, not a matmul, so it is left out. The score term is Kaplan et al.'s
    2 * layers * context * width per forward token (causal, so half the full square), times 3 for training.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_o = 2 * h * config.num_attention_heads * head_dim
    k_v = 2 * h * config.num_key_value_heads * head_dim
    mlp = 3 * h * config.intermediate_size
    matmul_params = layers * (q_o + k_v + mlp) + h * config.vocab_size
    return 6 * matmul_params + 6 * layers * seq_len * h


def with_mlp_width(config: LlamaConfig, width: int) -> LlamaConfig:
    sized = copy.deepcopy(config)
    sized.intermediate_size = width
    return sized


@dataclass(frozen=True)
class ExpertPlan:
    domain: str
    difficulty: float
    intermediate_size: int
    steps: int
    flops: float


@dataclass(frozen=True)
class Plan:
    method: str
    experts: list[ExpertPlan]
    baseline_flops: float  # what MHo-IHo spends on the same domains

    @property
    def flops(self) -> float:
        return sum(e.flops for e in self.experts)

    def table(self) -> str:
        lines = [f"{self.method}: total {self.flops:.4g} FLOPs, "
                 f"{100 * (self.flops / self.baseline_flops - 1):+.3f}% vs homogeneous",
                 f"  {'domain':<14} {'difficulty':>10} {'mlp width':>9} {'steps':>6} {'FLOPs':>10}"]
        for e in self.experts:
            lines.append(f"  {e.domain:<14} {e.difficulty:>10.3f} {e.intermediate_size:>9} {e.steps:>6} {e.flops:>10.3g}")
        return "\n".join(lines)


def ramp(n: int, spread: float) -> list[float]:
    """n multipliers evenly spaced over [1 - spread, 1 + spread]; they sum to n."""
    if not 0 <= spread < 1:
        raise ValueError(f"spread {spread} must be in [0, 1) so that every expert keeps a positive size")
    if n == 1:
        return [1.0]
    return [1 - spread + 2 * spread * i / (n - 1) for i in range(n)]


def integers_summing_to(values: list[float], total: int, multiple: int) -> list[int]:
    """Round each value to a multiple, then give the remainder to the last (hardest) entry."""
    out = [max(multiple, multiple * round(v / multiple)) for v in values]
    out[-1] += total - sum(out)
    if out[-1] <= 0:
        raise ValueError("sizes are too small to round; use a smaller spread or larger sizes")
    return out


def medium_steps_for_budget(budget: float, n_experts: int, config: LlamaConfig, tokens_per_step: int,
                            seq_len: int) -> int:
    """The step count at which n medium experts spend `budget` FLOPs."""
    steps = round(budget / (n_experts * flops_per_token(config, seq_len) * tokens_per_step))
    if steps < 1:
        raise ValueError(f"budget {budget:.3g} FLOPs is less than one step per expert")
    return steps


def make_plan(method: str, difficulties: dict[str, float], config: LlamaConfig, medium_steps: int,
              tokens_per_step: int, seq_len: int, width_spread: float = 0.5, step_spread: float = 0.25,
              width_multiple: int = 8) -> Plan:
    """One expert per domain; `config.intermediate_size` is the medium MLP width."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if not difficulties:
        raise ValueError("no training domains to plan for")
    order = sorted(difficulties, key=lambda d: (difficulties[d], d))  # easiest first
    n, medium = len(order), config.intermediate_size
    widths, steps = [medium] * n, [medium_steps] * n
    if method == "MHe-IHo":
        widths = integers_summing_to([medium * m for m in ramp(n, width_spread)], n * medium, width_multiple)
    elif method == "MHo-IHe":
        steps = integers_summing_to([medium_steps * m for m in ramp(n, step_spread)], n * medium_steps, 1)

    def cost(width: int, n_steps: int) -> float:
        return flops_per_token(with_mlp_width(config, width), seq_len) * tokens_per_step * n_steps

    experts = [ExpertPlan(d, difficulties[d], w, s, cost(w, s)) for d, w, s in zip(order, widths, steps)]
    return Plan(method, experts, baseline_flops=n * cost(medium, medium_steps))


POLICIES = {"homogeneous": "MHo-IHo", "mhe": "MHe-IHo", "ihe": "MHo-IHe"}  # --expert-policy -> method


def choose_domain(difficulties: dict[str, float], flops: dict[str, float], eligible: set[str]) -> str | None:
    """The eligible domain furthest behind its share of the swarm's expert FLOPs, shares proportional to difficulty.

    `flops` holds what the swarm has spent or committed per domain. With nothing spent yet, the hardest
    domain goes first; ties go to the harder domain, then the name, so every node ranks alike.
    """
    candidates = [d for d in difficulties if d in eligible]
    if not candidates:
        return None
    total_difficulty, total_flops = sum(difficulties.values()), sum(flops.values())

    def behind(d: str) -> float:
        return difficulties[d] / total_difficulty * total_flops - flops.get(d, 0.0)
    return max(candidates, key=lambda d: (round(behind(d) / max(total_flops, 1.0), 9), difficulties[d], d))
