"""The paper's analytical model (PipeSpec §3.3, Eqs. 1-6), and a check of our system against it.

alpha: probability a draft token is accepted; gamma: verification window (draft tokens);
rho: probability a verifier step verifies drafts rather than making a 1-token step; c: how many
times faster the drafter runs than the target.

>>> round(steady_state_rho(0.8, 4), 4), round(tokens_per_step(0.8, 4), 4)
(0.5434, 2.2832)
>>> round(window_term(0.9, 8), 4), round(speculative_decoding_speedup(0.9, 8, 10), 4)
(6.1258, 3.4032)
"""

from __future__ import annotations

from dataclasses import dataclass


def window_term(alpha: float, gamma: int) -> float:
    """Expected tokens from one verification of ``gamma`` drafts, bonus/correction included:
    (1 - alpha^(gamma+1)) / (1 - alpha). Also Eq. 6, PipeSpec's ideal-case throughput."""
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def steady_state_rho(alpha: float, gamma: int) -> float:
    """Eq. 3: alpha / (1 - alpha^(gamma+1) + alpha), the fixed point of Eq. 2."""
    return alpha / (1 - alpha ** (gamma + 1) + alpha)


def rho_recursion(alpha: float, gamma: int, steps: int) -> list[float]:
    """Eq. 2: rho_j = rho_{j-1} alpha^(gamma+1) + (1 - rho_{j-1}) alpha, rho_0 = alpha."""
    out = [alpha]
    for _ in range(steps - 1):
        out.append(out[-1] * alpha ** (gamma + 1) + (1 - out[-1]) * alpha)
    return out


def tokens_per_step(alpha: float, gamma: int) -> float:
    """Eq. 1 / Eq. 4: (1 - rho) + rho * window_term, tokens per target step."""
    rho = steady_state_rho(alpha, gamma)
    return (1 - rho) + rho * window_term(alpha, gamma)


def speculative_decoding_speedup(alpha: float, gamma: int, c: float) -> float:
    """Eq. 5: synchronous speculative decoding, window_term / (gamma / c + 1)."""
    return window_term(alpha, gamma) / (gamma / c + 1)


@dataclass
class FixedWindowResult:
    alpha: float
    gamma: int
    rho: float  # measured: target passes that verified drafts / all target passes
    tokens_per_step: float  # measured: tokens committed / target passes
    target_passes: int


def measure_fixed_window(
    alpha: float, gamma: int, tokens: int = 6000, seed: int = 0
) -> FixedWindowResult:
    """Run our engines (2 levels, simulated backends) in the paper's fixed-window setting and
    measure rho and tokens per target step.

    The setting of Eqs. 1-3: a verification checks exactly ``gamma`` drafts, each accepted with
    probability ``alpha`` independently; the drafter is fast enough that drafts are always there,
    but learns of a rejection only after the verifier's next step has begun, so the step after a
    rejection is a 1-token step. Here: a drafter 100x faster than the target, a window capped at
    ``gamma``, a lead long enough never to starve it, and a simulated drafter agreeing with the
    target at a hash-chosen fraction ``alpha`` of contexts.
    """
    from dataclasses import replace

    from common.backends.simulated import SimulatedBackend
    from common.simnet import build, default_engine, run_request

    def sim(agreement: float) -> SimulatedBackend:
        return SimulatedBackend(agreement=agreement, seed=seed, vocab=1000, sleep=lambda s: None)

    h = build(
        [sim(alpha), sim(1.0)],
        costs=[0.01, 1.0],
        seed=seed,
        jitter=0.0,
        config=replace(
            default_engine(),
            max_lead=4 * gamma + 4,
            max_verify_tokens=gamma,
            draft_policy="all",  # the paper's model: every window holds gamma drafts
        ),
    )
    req = run_request(h, [1, 2, 3], tokens)
    assert req is not None, "fixed-window run did not finish"
    target = req.stats[-1]
    return FixedWindowResult(
        alpha,
        gamma,
        target.drafts / target.forward_passes,
        target.emitted_tokens / target.forward_passes,
        target.forward_passes,
    )
