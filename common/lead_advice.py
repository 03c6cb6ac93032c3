"""Lead advice: how far past the target's committed length a drafter runs, as the level above
tells it (``Notice.drafter_lead``).

A verifier's draft-length policy (``common.draft_policy``) knows how many drafts it would check
per pass; it advises the level below a *lead* to keep (``draft_policy.drafter_lead``), so that a
drafter whose drafts would never be checked stops spending passes on them. Every request carries a
:class:`LeadState` at each level: the verifier's side (``wanted``, and how often the drafts it
asked for arrived in time) and the drafter's side (``hint``, the lead it was told). The rest of
this module is pure functions of those numbers, which the engine (``common.stage_engine``) applies:

- planning a pass: :func:`after_planned_pass` counts whether the drafts asked for arrived;
- choosing drafts (async schedule, goodput policy): :func:`wanted_drafts`, from each running
  request's :func:`draft_value`, is what the policy would check in the passes to come, kept as
  ``LeadState.wanted``;
- publishing a notice: :func:`advice` turns that into the lead for the level below;
- hearing a notice: the drafter keeps the lead as ``hint``; :func:`lead_limit` is how far its
  schedule lets it run past the target;
- a new request: :func:`first_hint` decides whether it waits for advice of its own.

A lone request whose drafts are taken at the prior (acceptance 0.5, always on time) is worth
4 drafts a pass, so its target advises a lead of 10; sixteen such requests are worth 1 draft
each, and their drafters are kept 4 tokens ahead:

>>> [advice(w, above=0, at_target=True, max_lead=16) for w in wanted_drafts([0.5], draft_cap=32)]
[10]
>>> set(advice(w, 0, True, 16) for w in wanted_drafts([0.5] * 16, draft_cap=32))
{4}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from common.draft_policy import (
    DEFAULT_CURVE,
    PRIOR_ACCEPTANCE,
    acceptance_estimate,
    draft_lengths,
    drafter_lead,
    level_prior,
    on_time_estimate,
)


@dataclass(frozen=True)
class LeadState:
    """One request's lead advice at one level (replaced, never changed in place)."""

    wanted: int | None = None  # verifier: drafts its policy would check now (None: no advice yet)
    advised_passes: int = 0  # verifier: passes planned after advising the level below a lead
    supplied_passes: int = 0  # ... of those but the first (no time), ones that found drafts
    hint: int | None = None  # drafter: the lead the level above advises (None: none yet)


def after_planned_pass(state: LeadState, found_drafts: bool) -> LeadState:
    """``state`` once a pass is planned for its request, with drafts from below or without. Only
    passes after advice to draft count; the first of them cannot have found drafts (the drafter
    had no time to make them), so only the later ones count as supplied or not.

    >>> after_planned_pass(LeadState(), found_drafts=True) == LeadState()   # no advice yet
    True
    >>> s = after_planned_pass(LeadState(wanted=2), found_drafts=True)
    >>> s.advised_passes, s.supplied_passes
    (1, 0)
    >>> s = after_planned_pass(after_planned_pass(s, found_drafts=True), found_drafts=False)
    >>> s.advised_passes, s.supplied_passes
    (3, 1)
    """
    if not state.wanted:
        return state
    advised = state.advised_passes + 1
    supplied = state.supplied_passes + (advised > 1 and found_drafts)
    return replace(state, advised_passes=advised, supplied_passes=supplied)


def draft_chances(
    accepted: int,
    checked: int,
    state: LeadState,
    prior: float = PRIOR_ACCEPTANCE,
    on_time_prior: float = 1.0,
) -> tuple[float, float]:
    """A request's drafts' chance of being accepted and a pass's chance of finding them
    (:func:`draft_value` is their product).

    >>> draft_chances(8, 8, LeadState(wanted=3, advised_passes=13, supplied_passes=8))
    (0.8333333333333334, 0.75)
    """
    awaited = awaited_passes(state)
    on_time = on_time_estimate(state.supplied_passes, awaited, on_time_prior)
    return acceptance_estimate(accepted, checked, prior), on_time


def draft_value(
    accepted: int,
    checked: int,
    state: LeadState,
    prior: float = PRIOR_ACCEPTANCE,
    on_time_prior: float = 1.0,
) -> float:
    """What one draft of a request is worth to the advice: its chance of being accepted
    (``accepted`` of ``checked`` so far: ``acceptance_estimate``) times its chance of arriving
    before the pass that would check it (``on_time_estimate`` over the advised passes but the
    first). A drafter too slow to keep ahead makes drafts no pass checks, however good.
    ``prior`` and ``on_time_prior``: what the two are taken to be before the request has its
    own record (the defaults, or what the level's finished requests scored).

    >>> draft_value(0, 0, LeadState())   # nothing known: the priors, 0.5 and on time
    0.5
    >>> draft_value(0, 0, LeadState(wanted=3, advised_passes=13, supplied_passes=1))
    0.15625
    """
    acceptance, on_time = draft_chances(accepted, checked, state, prior, on_time_prior)
    return acceptance * on_time


def awaited_passes(state: LeadState) -> int:
    """Passes after advice in which the drafter had time to supply drafts (all but the first).

    >>> awaited_passes(LeadState(wanted=2, advised_passes=5, supplied_passes=3))
    4
    """
    return max(0, state.advised_passes - 1)


def wanted_drafts(
    values: Sequence[float],
    draft_cap: int,
    curve: Sequence[tuple[int, float]] = DEFAULT_CURVE,
    draft_cost: float = 0.0,
    sharing_cost: float = 1.0,
    reach: Sequence[float] | None = None,
) -> list[int]:
    """Drafts the policy would check per running request (``values``: each one's
    :func:`draft_value`) in the passes to come, if every request had them, counting what making
    them costs where the drafter shares this level's compute (``draft_cost``), and what sharing
    the cores with the drafters costs every pass (``sharing_cost``; see
    ``draft_policy.draft_lengths``, also for ``reach``: then ``values`` are acceptances alone).

    In those passes every running request feeds one token (its correction or bonus), whatever the
    current pass feeds: a prefill's many tokens would make any draft look cheap and send the
    drafters to prefill for passes that then check none.

    >>> wanted_drafts([0.8], draft_cap=8), wanted_drafts([0.8, 0.05], draft_cap=8)
    ([7], [6, 0])
    >>> wanted_drafts([0.3], draft_cap=8, draft_cost=0.45)   # not worth making: idle
    [0]
    """
    n = len(values)
    return draft_lengths(
        [1] * n, list(values), [draft_cap] * n, curve, draft_cost, sharing_cost, reach
    )


def advice(wanted: int | None, above: int, at_target: bool, max_lead: int) -> int | None:
    """The lead to advise the level below (``Notice.drafter_lead``), from the drafts this level
    would check (``wanted``; None: no verdict yet, so no advice) and the lead it runs itself
    (``above``; 0 at the target). A middle level told to idle (lead 0) tells its drafter to idle.

    >>> advice(None, above=0, at_target=True, max_lead=16) is None
    True
    >>> advice(2, above=0, at_target=True, max_lead=16)    # the target: 2 x 2 + 2
    6
    >>> advice(2, above=4, at_target=False, max_lead=16)   # a middle level 4 ahead: 4 more
    10
    >>> advice(2, above=0, at_target=False, max_lead=16)   # a middle level told to idle
    0
    """
    if wanted is None:
        return None
    if above == 0 and not at_target:
        return 0  # the level above wants no drafts from us: we idle, and so does our drafter
    return drafter_lead(wanted, max_lead, above=above)


def lead_limit(hint: int | None, max_lead: int) -> int:
    """Tokens past the target's committed length a drafter drafts at most: ``max_lead``, or less
    where the level above advises less (``hint``).

    >>> lead_limit(None, max_lead=16), lead_limit(3, max_lead=16), lead_limit(40, max_lead=16)
    (16, 3, 16)
    """
    return max_lead if hint is None else min(max_lead, hint)


FRESH_ADVICE_S = 1.0  # seconds after which the last advice no longer speaks for a new request


def first_hint(
    last_advised: int | None, others_in_flight: bool, advice_age_s: float = 0.0
) -> int | None:
    """The hint a new request starts with at a drafter, given the last lead the level above
    advised for any request (None: it never advised), ``advice_age_s`` seconds ago. Once it
    advises, a new request waits for its own advice (hint 0: no pass, not even a prefill the
    level above may never check) when it finds others in flight, or the last advice was to idle
    or is older than ``FRESH_ADVICE_S``. One that finds the drafter idle right after advice to
    draft (one client's next request) starts at once: waiting would only delay its drafts by the
    target's first pass. After a pause the load ahead is unknown: a burst's first request would
    wake the drafter, whose prefill then competes for the cores with the target's.

    >>> first_hint(None, others_in_flight=True) is None   # no advice ever: run the full lead
    True
    >>> first_hint(5, others_in_flight=True), first_hint(0, others_in_flight=False)
    (0, 0)
    >>> first_hint(5, others_in_flight=False) is None
    True
    >>> first_hint(5, others_in_flight=False, advice_age_s=10.0)
    0
    """
    if last_advised is None:
        return None
    if last_advised == 0 or others_in_flight or advice_age_s > FRESH_ADVICE_S:
        return 0
    return None


@dataclass(frozen=True)
class DraftRecord:
    """What a level's ended requests scored, all together: drafts accepted of those checked, and
    passes that found drafts of those that awaited them (replaced, never changed in place)."""

    accepted: int = 0
    checked: int = 0
    supplied: int = 0
    awaited: int = 0

    def add(self, accepted: int, checked: int, state: LeadState) -> DraftRecord:
        """This record with one more ended request's drafts and lead.

        >>> DraftRecord().add(6, 8, LeadState(wanted=2, advised_passes=5, supplied_passes=3))
        DraftRecord(accepted=6, checked=8, supplied=3, awaited=4)
        """
        return DraftRecord(
            self.accepted + accepted,
            self.checked + checked,
            self.supplied + state.supplied_passes,
            self.awaited + awaited_passes(state),
        )


def evidence(record: DraftRecord, sharing_cost: float) -> tuple[float, float, float]:
    """The acceptance and on-time priors of a new request, and the sharing cost, that a level
    weighs its advice with. Under the cores rule (``sharing_cost`` > 1: drafting makes passes
    run on fewer cores) a request starts from what the level's ended requests scored, and
    drafting must pay for the cores it takes, but only once they checked enough drafts
    (``draft_policy.level_prior``): until then the level drafts to find out. Without the rule,
    the defaults.

    >>> evidence(DraftRecord(), 2.0)                   # nothing known yet: explore
    (0.5, 1.0, 1.0)
    >>> evidence(DraftRecord(90, 100, 60, 80), 2.0)
    (0.9, 0.75, 2.0)
    >>> evidence(DraftRecord(90, 100, 60, 80), 1.0)    # no cores rule
    (0.5, 1.0, 1.0)
    """
    prior = level_prior(record.accepted, record.checked)
    if sharing_cost <= 1.0 or prior is None:
        return PRIOR_ACCEPTANCE, 1.0, 1.0
    on_time = level_prior(record.supplied, record.awaited)
    return prior, 1.0 if on_time is None else on_time, sharing_cost
