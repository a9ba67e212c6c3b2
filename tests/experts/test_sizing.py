import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from experts.sizing import METHODS, flops_per_token, make_plan, medium_steps_for_budget, ramp


def test_flops_count_matches_the_real_model(tiny_config):
    model = LlamaForCausalLM(tiny_config)
    matmul = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n and "embed" not in n)
    attention = 6 * tiny_config.num_hidden_layers * 64 * tiny_config.hidden_size
    assert flops_per_token(tiny_config, seq_len=64) == 6 * matmul + attention


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), medium=st.sampled_from([64, 96, 192, 1000, 3072]), steps=st.integers(10, 5000),
       width_spread=st.floats(0.0, 0.7), step_spread=st.floats(0.0, 0.7), seed=st.integers(0, 1000))
def test_heterogeneous_plans_spend_the_homogeneous_budget(n, medium, steps, width_spread, step_spread, seed):
    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=medium, num_hidden_layers=2,
                         num_attention_heads=4)
    difficulties = {f"d{i}": ((i * 7919 + seed) % 101) / 10 for i in range(n)}
    plans = {m: make_plan(m, difficulties, config, steps, 1024, 128, width_spread, step_spread) for m in METHODS}
    baseline = plans["MHo-IHo"].flops
    for plan in plans.values():
        assert abs(plan.flops / baseline - 1) <= 0.01
        assert plan.baseline_flops == pytest.approx(baseline)
        assert [e.domain for e in plan.experts] == sorted(difficulties, key=lambda d: (difficulties[d], d))
    widths = [e.intermediate_size for e in plans["MHe-IHo"].experts]
    steps_he = [e.steps for e in plans["MHo-IHe"].experts]
    assert widths == sorted(widths) and steps_he == sorted(steps_he)  # harder domains get more
    assert min(widths) > 0 and min(steps_he) > 0


def test_hdee_shape_three_domains(tiny_config):
    plan = make_plan("MHo-IHe", {"easy": 1.0, "mid": 2.0, "hard": 3.0}, tiny_config, 400, 1024, 128,
                     step_spread=0.25)
    assert [e.steps for e in plan.experts] == [300, 400, 500]  # HDEE's step counts
    plan = make_plan("MHe-IHo", {"easy": 1.0, "mid": 2.0, "hard": 3.0}, tiny_config, 400, 1024, 128,
                     width_spread=0.5)
    assert [e.intermediate_size for e in plan.experts] == [32, 64, 96]  # small + large = 2 x medium


def test_budget_sets_the_medium_step_count(tiny_config):
    budget = 3e13
    steps = medium_steps_for_budget(budget, 6, tiny_config, 1024, 128)
    plan = make_plan("MHe-IHo", {f"d{i}": float(i) for i in range(6)}, tiny_config, steps, 1024, 128)
    assert abs(plan.flops / budget - 1) <= 0.01


def test_bad_inputs_are_refused(tiny_config):
    with pytest.raises(ValueError, match="spread"):
        ramp(3, 1.0)
    with pytest.raises(ValueError, match="unknown"):
        make_plan("MoE", {"a": 1.0}, tiny_config, 10, 1024, 128)
    with pytest.raises(ValueError, match="less than one step"):
        medium_steps_for_budget(1.0, 6, tiny_config, 1024, 128)
