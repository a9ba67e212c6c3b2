"""Random small problems for property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from routing.synthetic import generate


@st.composite
def problems(draw):
    n = draw(st.integers(8, 24))
    stages = draw(st.integers(2, 6))
    if n // 4 + stages - 1 > n:  # every stage needs a replica
        stages = 2
    visits = draw(st.integers(2, stages))
    return generate(
        n,
        seed=draw(st.integers(0, 10_000)),
        stages=stages,
        visits=visits,
        memory=draw(st.integers(1, 4)),
        microbatches_per_data_node=draw(st.integers(1, 4)),
    )
