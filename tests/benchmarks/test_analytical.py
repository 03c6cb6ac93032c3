"""The paper's analytical model: its formulas against the test vectors of
docs/pipespec.md §2.1, and our system in fixed-window mode against the formulas."""

import pytest

from benchmarks.analytical import (
    measure_fixed_window,
    rho_recursion,
    speculative_decoding_speedup,
    steady_state_rho,
    tokens_per_step,
    window_term,
)

# alpha, gamma, rho (Eq. 3), window term, PipeSpec Eq. 4, SD Eq. 5 c=4, SD Eq. 5 c=10
VECTORS = [
    (0.3, 4, 0.2312, 1.4251, 1.0983, 0.7126, 1.0179),
    (0.5, 1, 0.4000, 1.5000, 1.2000, 1.2000, 1.3636),
    (0.5, 4, 0.3404, 1.9375, 1.3191, 0.9688, 1.3839),
    (0.7, 4, 0.4569, 2.7731, 1.8102, 1.3865, 1.9808),
    (0.8, 4, 0.5434, 3.3616, 2.2832, 1.6808, 2.4011),
    (0.8, 8, 0.4803, 4.3289, 2.5987, 1.4430, 2.4050),
    (0.9, 4, 0.6873, 4.0951, 3.1272, 2.0476, 2.9251),
    (0.9, 8, 0.5950, 6.1258, 4.0499, 2.0419, 3.4032),
]


@pytest.mark.parametrize("a, g, rho, win, ps, sd4, sd10", VECTORS)
def test_formulas_match_the_test_vectors(a, g, rho, win, ps, sd4, sd10):
    got = (
        steady_state_rho(a, g),
        window_term(a, g),
        tokens_per_step(a, g),
        speculative_decoding_speedup(a, g, 4),
        speculative_decoding_speedup(a, g, 10),
    )
    assert got == pytest.approx((rho, win, ps, sd4, sd10), abs=1e-4)


def test_recursion_converges_to_steady_state():
    seq = rho_recursion(0.7, 4, 2000)
    assert sum(seq) / len(seq) == pytest.approx(steady_state_rho(0.7, 4), rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("a, g", [(v[0], v[1]) for v in VECTORS])
def test_fixed_window_system_matches_eq1_and_eq3(a, g):
    runs = [measure_fixed_window(a, g, tokens=3000, seed=s) for s in range(2)]
    rho = sum(r.rho for r in runs) / len(runs)
    tps = sum(r.tokens_per_step for r in runs) / len(runs)
    assert rho == pytest.approx(steady_state_rho(a, g), rel=0.03)
    assert tps == pytest.approx(tokens_per_step(a, g), rel=0.03)
