"""How many drafts each request's verification checks in a batched pass: speculation that never
hurts under load.

A pass's cost grows with the tokens in the whole batch (``relative_cost``: a measured curve, cost
relative to a one-token pass), while a draft that is accepted saves a whole pass for its request.
With acceptance rate ``a`` per draft, checking ``k`` drafts yields on average
``1 + a + a^2 + ... + a^k`` tokens (the chain stops at the first rejection; the 1 is the
correction/bonus token every pass emits). The policy picks every request's ``k`` to maximise the
batch's expected tokens per unit of pass cost (its goodput), one draft at a time, the draft with
the highest chance of being accepted first, and stops when one more draft would lower the goodput.
At low load a pass of few tokens costs what one token does (rows are padded to 4, and small passes
are launch-bound), so drafting grows; as the batch fills, each extra token costs, and drafting
shrinks toward plain batched decoding (``k = 0``), like TensorRT-LLM's ``draft_len_schedule``.

Worked example, with the default curve (flat up to 4 tokens: 1.0, then 1.1 at 8, 1.5 at 16, 1.8 at
32, 3.5 at 64). One request decoding (1 token fed) with acceptance 0.8 and 8 drafts on offer:
k = 3 gives (1 + .8 + .64 + .512) / cost(4) = 2.95; k = 7: 4.16 / cost(8) = 3.78; k = 8 costs
9 tokens (1.15) for 4.33: 3.76, lower, so it stops at 7:

>>> draft_lengths([1], [0.8], [8])
[7]

Sixteen such requests share a pass: 16 tokens cost 1.5 already, and drafts add cost fast, so only the
likeliest pay for themselves (goodput (16 + 16 x 0.8) / cost(32) = 16.0 with one each; 16 / 1.5 =
10.7 with none; 14.7 with two each):

>>> draft_lengths([1] * 16, [0.8] * 16, [8] * 16)
[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]

A request whose drafts are rarely right gets none, while a good one next to it keeps its drafts:

>>> draft_lengths([1, 1], [0.9, 0.05], [8, 8])
[8, 0]

A cost curve that is flat (a GPU pass far from compute-bound) keeps every draft:

>>> draft_lengths([1, 1], [0.5, 0.5], [4, 4], curve=((1, 1.0), (64, 1.0)))
[4, 4]

Drafts are free to check on that curve, but not always free to make. Where the drafter shares
this level's compute (every level on one CPU, as in a one-machine launch), each draft token it makes slows
this level by ``draft_cost`` (relative to a one-token pass; 0, the default, for a drafter on its
own device). A drafter costing 0.45 pays at acceptance 0.8 (2 drafts: 2.44 / (1 + 2 x 0.45) =
1.28 tokens per unit, against 1.0 without; a third lowers it to 1.26), but not at 0.3 (1.3 / 1.45
= 0.9 for one draft): then it gets none and, through ``drafter_lead``, idles, and the level
decodes as if alone:

>>> draft_lengths([1], [0.8], [8], draft_cost=0.45), draft_lengths([1], [0.3], [8], draft_cost=0.45)
([2], [0])

Drafters get the same signal (``drafter_lead``): a verifier tells the level below how far past the
target's committed length to draft, from the drafts its policy would check if it had them. A lone
request wanting 7 drafts lets its drafter run the full lead; sixteen wanting 1 each keep their
drafters 4 tokens ahead, so the drafters stop spending passes on drafts that would never be checked
and leave the machine to the target:

>>> drafter_lead(7, max_lead=16), drafter_lead(1, max_lead=16), drafter_lead(0, max_lead=16)
(16, 4, 0)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# (tokens in the batch, pass cost / one-token pass cost): the batched runner on SmolLM2-135M, fp32,
# one thread (``python -m benchmarks.batched_costs curve``; two runs under heavy load, min of 7
# each, averaged: docs/batched-runner.md). 1 to 4 tokens cost the same: rows are padded to 4.
DEFAULT_CURVE: tuple[tuple[int, float], ...] = (
    (1, 1.0),
    (4, 1.0),
    (8, 1.1),
    (16, 1.5),
    (32, 1.8),
    (64, 3.5),
)

PRIOR_ACCEPTANCE = 0.5  # what a request's drafts are assumed to score before any is checked
PRIOR_WEIGHT = 4  # ... worth this many checked drafts


def relative_cost(tokens: int, curve: Sequence[tuple[int, float]] = DEFAULT_CURVE) -> float:
    """Piecewise-linear interpolation of ``curve`` at ``tokens`` (0 tokens cost nothing).

    >>> relative_cost(1), relative_cost(4), relative_cost(6), relative_cost(48)
    (1.0, 1.0, 1.05, 2.65)
    >>> relative_cost(100, curve=((1, 1.0), (10, 2.0)))   # past the end: the last slope, extended
    12.0
    """
    if tokens <= 0:
        return 0.0
    xs = [x for x, _ in curve]
    i = bisect.bisect_left(xs, tokens)
    if i < len(xs) and xs[i] == tokens:
        return curve[i][1]
    if i == 0:
        return curve[0][1]
    lo, hi = (i - 1, i) if i < len(xs) else (len(xs) - 2, len(xs) - 1)
    (x0, y0), (x1, y1) = curve[lo], curve[hi]
    return round(y0 + (tokens - x0) * (y1 - y0) / (x1 - x0), 9)


def padded_curve(curve: Sequence[tuple[int, float]], rows: int) -> tuple[tuple[int, float], ...]:
    """``curve`` for a runner that pads every product to ``rows`` rows: a pass of 1 to ``rows``
    tokens costs what ``rows`` tokens cost, and costs are relative to that padded one-token pass.
    With 16-row padding, up to 15 drafts ride along a lone decode step for free.

    >>> padded_curve(DEFAULT_CURVE, 16)
    ((1, 1.0), (16, 1.0), (32, 1.2), (64, 2.333333333))
    >>> padded_curve(DEFAULT_CURVE, 4) == padded_curve(DEFAULT_CURVE, 1) == DEFAULT_CURVE
    True
    """
    base = relative_cost(rows, curve)
    tail = tuple((x, round(y / base, 9)) for x, y in curve if x > rows)
    return ((1, 1.0), (rows, 1.0), *tail) if rows > 1 else ((1, 1.0), *tail)


def acceptance_estimate(accepted: int, checked: int, prior: float = PRIOR_ACCEPTANCE) -> float:
    """A request's acceptance rate so far, pulled toward ``prior`` while few drafts were checked
    (``PRIOR_ACCEPTANCE``, or what this level's finished requests scored: ``level_prior``).

    >>> acceptance_estimate(0, 0), acceptance_estimate(8, 8), acceptance_estimate(0, 12)
    (0.5, 0.8333333333333334, 0.125)
    >>> acceptance_estimate(0, 0, prior=0.9)
    0.9
    """
    return (accepted + prior * PRIOR_WEIGHT) / (checked + PRIOR_WEIGHT)


EVIDENCE = 64  # drafts checked (or passes awaited) by a level's finished requests before it counts


def level_prior(hits: int, tries: int) -> float | None:
    """The rate a level's finished requests scored, all together (``hits`` of ``tries``: drafts
    accepted of those checked, or passes that found drafts of those that awaited them), once
    there are ``EVIDENCE`` tries; None before: nothing known yet.

    >>> level_prior(30, 40) is None, level_prior(60, 80)
    (True, 0.75)
    """
    return hits / tries if tries >= EVIDENCE else None


ON_TIME_PRIOR_WEIGHT = 4  # passes a drafter is assumed on time for before any is counted


def on_time_estimate(supplied: int, awaited: int, prior: float = 1.0) -> float:
    """The share of a request's passes that found drafts waiting, among those whose drafter had
    been advised a lead in time to make them (``awaited``), pulled toward 1 while few were
    counted. A drafter too slow to stay ahead of this level makes drafts no pass checks, whatever
    their acceptance, so the lead advice weighs each draft's chance by it. ``prior``: what is
    assumed before any pass is counted (1, or this level's record: ``level_prior``).

    >>> on_time_estimate(0, 0), on_time_estimate(8, 8), on_time_estimate(1, 12)
    (1.0, 1.0, 0.3125)
    >>> on_time_estimate(0, 0, prior=0.25)
    0.25
    """
    return (supplied + prior * ON_TIME_PRIOR_WEIGHT) / (awaited + ON_TIME_PRIOR_WEIGHT)


def draft_lengths(
    fed: Sequence[int],
    acceptance: Sequence[float],
    offered: Sequence[int],
    curve: Sequence[tuple[int, float]] = DEFAULT_CURVE,
    draft_cost: float = 0.0,
    sharing_cost: float = 1.0,
    reach: Sequence[float] | None = None,
) -> list[int]:
    """Drafts to check per request: ``fed[i]`` tokens request ``i`` feeds anyway (what its cache
    lacks), ``acceptance[i]`` its per-draft acceptance rate, ``offered[i]`` the drafts it has. The
    ``k`` that maximise the batch's expected tokens per pass cost, the pass's own (``curve``) plus
    ``draft_cost`` per draft for making it (module docstring). ``reach[i]``: the chance that a
    pass finds request ``i``'s drafts at all (a drafter that cannot keep up supplies some passes,
    not fewer drafts each): its first draft counts ``reach x acceptance``, each next one
    ``acceptance`` more (None: every pass finds them).

    ``sharing_cost``: what every pass costs, relative to passes without drafts, while this level
    drafts at all, because drafting makes it share its cores with its drafters (the cores rule:
    ``threads`` instead of ``threads_alone``). Drafting must then pay for it as a whole: the best
    ``k`` at that cost, or none where decoding alone on every core yields more. One request at
    acceptance 0.8 drafts on a flat curve at half speed; four such requests on the quantized
    runner's curve decode alone:

    >>> draft_lengths([1], [0.8], [8], curve=((1, 1.0), (9, 1.0)), sharing_cost=2.0)
    [8]
    >>> quantized = ((1, 1.0), (4, 1.31), (8, 1.51), (16, 2.52))
    >>> draft_lengths([1] * 4, [0.8] * 4, [8] * 4, quantized, sharing_cost=1.83)
    [0, 0, 0, 0]
    >>> draft_lengths([1] * 4, [0.8] * 4, [8] * 4, quantized)   # cores not shared: drafts pay
    [2, 2, 2, 2]

    A drafter that supplies two passes in three, its drafts all but always right:

    >>> draft_lengths([1], [0.97], [8], quantized, sharing_cost=2.0, reach=[0.67])
    [8]
    >>> draft_lengths([1] * 4, [0.97] * 4, [8] * 4, quantized, sharing_cost=2.0, reach=[0.67] * 4)
    [0, 0, 0, 0]
    """
    k = [0] * len(fed)
    tokens = sum(fed)
    if not tokens:
        return k
    alone = len(fed) / relative_cost(tokens, curve)  # every request emits its correction/bonus
    reach = [1.0] * len(fed) if reach is None else reach
    k, goodput = _greedy_drafts(fed, acceptance, reach, offered, curve, draft_cost, sharing_cost)
    return k if sharing_cost <= 1.0 or goodput > alone else [0] * len(fed)


def _greedy_drafts(fed, acceptance, reach, offered, curve, draft_cost, sharing_cost):
    """:func:`draft_lengths`' search: drafts added one at a time, the likeliest first, while the
    goodput of passes that cost ``sharing_cost`` times the curve grows; ``(k, goodput)``."""
    k = [0] * len(fed)
    tokens = sum(fed)
    expected = float(len(fed))  # every request emits its correction/bonus token
    # the chance that request i's next draft is accepted (all earlier ones being accepted)
    chance = [max(0.0, min(1.0, a)) * max(0.0, min(1.0, r)) for a, r in zip(acceptance, reach)]
    fed_tokens = tokens

    def cost(tokens: int) -> float:  # the pass, plus making its drafts (tokens past those fed)
        return sharing_cost * relative_cost(tokens, curve) + draft_cost * (tokens - fed_tokens)

    best = expected / cost(tokens)
    while True:
        pick = max(
            (i for i in range(len(fed)) if k[i] < offered[i] and chance[i] > 0),
            key=lambda i: chance[i],
            default=None,
        )
        if pick is None:
            return k, best
        goodput = (expected + chance[pick]) / cost(tokens + 1)
        if goodput < best:
            return k, best
        best, expected, tokens = goodput, expected + chance[pick], tokens + 1
        k[pick] += 1
        chance[pick] *= max(0.0, min(1.0, acceptance[pick]))


def drafter_lead(wanted: int, max_lead: int, above: int = 0) -> int:
    """The lead (tokens past the target's committed length) to advise the level below, when this
    verifier would check ``wanted`` drafts per pass and runs ``above`` tokens past the target
    itself (0 at the target). At most ``max_lead``.

    A pass checks ``wanted`` drafts and commits up to ``wanted + 1`` tokens; the drafter must already
    hold the next pass's drafts when it ends (the verifier plans right after it commits), so it
    runs two passes' worth ahead: ``2 * wanted + 2``. A verifier that wants no drafts asks for none:
    its drafter idles until the load falls and the policy wants drafts again.

    >>> drafter_lead(2, max_lead=16), drafter_lead(2, max_lead=16, above=4), drafter_lead(9, 16)
    (6, 10, 16)
    """
    if wanted <= 0:
        return min(max_lead, above)
    return min(max_lead, above + 2 * wanted + 2)


def pass_threads(wanted_drafts: Sequence[int | None], share: int, alone: int) -> int:
    """Threads for a pass of a level whose drafter shares its machine's cores: ``alone`` (every
    core) while the policy wants no drafts for any request in the pass (the drafters below are
    told to idle, and free their cores), else ``share`` (the cores it splits with them). No advice
    yet (``None``) counts as wanting drafts: the drafters are running.

    >>> pass_threads([0, 0], share=1, alone=2)
    2
    >>> pass_threads([0, 3], share=1, alone=2)
    1
    >>> pass_threads([None], share=1, alone=2)
    1
    >>> pass_threads([], share=1, alone=2)
    1
    """
    idle = bool(wanted_drafts) and all(w == 0 for w in wanted_drafts)
    return alone if idle else share


LOAD_MEMORY = 64  # passes whose most requests make the load a level decides to draft for


def drafting_allowed(recent_loads: Sequence[int], max_load: int | None) -> bool:
    """Whether a level under the cores rule drafts at all: while the most requests it ran in any
    of its last passes (``recent_loads``, ``LOAD_MEMORY`` of them) is at most ``max_load`` (None:
    no cap; ``EngineConfig.max_drafting_load``).

    Measured on two cores split between a target and its drafter, drafting pays for one request
    and costs more than it saves for two or more: each new request's prefill runs on half the
    cores, and batching already fills the passes (docs/cpu-kernels.md). The most of recent
    passes, not the pass at hand, because a switch to drafting costs the drafter a catch-up (the
    request's context to prefill) while the level already runs on its share of the cores: the
    moment between one client's requests, or the first request after a burst, must not switch
    modes; for the same reason a request that ran above the cap never drafts (its last tokens
    alone would not repay the catch-up).

    >>> drafting_allowed([1, 1, 1], max_load=1), drafting_allowed([2, 1, 1], max_load=1)
    (True, False)
    >>> drafting_allowed([16], max_load=None)
    True
    """
    return max_load is None or max(recent_loads, default=0) <= max_load
