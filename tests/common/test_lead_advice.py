"""The lead advice's pure functions (``common.lead_advice``), on tiny inputs."""

from __future__ import annotations

import pytest

from common.lead_advice import (
    FRESH_ADVICE_S,
    LeadState,
    advice,
    after_planned_pass,
    draft_value,
    first_hint,
    lead_limit,
    wanted_drafts,
)


def test_passes_count_only_after_advice_and_the_first_never_as_supplied():
    s = LeadState()
    for found in (True, False, True):
        s = after_planned_pass(s, found_drafts=found)
    assert s == LeadState()  # no advice to draft yet
    s = LeadState(wanted=0)
    assert after_planned_pass(s, found_drafts=True) == s  # advice to idle: nothing awaited
    s = LeadState(wanted=1)
    for found in (True, True, False, True):
        s = after_planned_pass(s, found_drafts=found)
    assert (s.advised_passes, s.supplied_passes) == (4, 2)  # the first pass's drafts don't count
    assert s.wanted == 1 and s.hint is None


def test_a_pass_does_not_change_the_state_it_was_given():
    s = LeadState(wanted=2, advised_passes=3, supplied_passes=1, hint=5)
    after_planned_pass(s, found_drafts=True)
    assert s == LeadState(wanted=2, advised_passes=3, supplied_passes=1, hint=5)


def test_a_draft_is_worth_its_acceptance_times_its_chance_to_arrive():
    assert draft_value(0, 0, LeadState()) == 0.5  # the priors
    assert draft_value(8, 8, LeadState()) == pytest.approx(10 / 12)
    late = LeadState(wanted=2, advised_passes=9, supplied_passes=0)
    assert draft_value(8, 8, late) == pytest.approx(10 / 12 * 4 / 12)
    # the first advised pass is not awaited: one pass after advice is still all on time
    assert draft_value(0, 0, LeadState(wanted=2, advised_passes=1)) == 0.5


def test_wanted_drafts_shrink_with_load_and_with_the_cost_of_making_them():
    assert wanted_drafts([], draft_cap=8) == []
    assert wanted_drafts([0.8], draft_cap=8) == [7]
    assert wanted_drafts([0.8], draft_cap=3) == [3]  # the cap
    assert wanted_drafts([0.8] * 16, draft_cap=8) == [1] * 16
    assert wanted_drafts([0.8], draft_cap=8, draft_cost=0.45) == [2]
    assert wanted_drafts([0.0, 0.9], draft_cap=4) == [0, 4]


def test_advice_is_none_before_a_verdict_and_zero_down_an_idle_chain():
    assert advice(None, above=0, at_target=True, max_lead=16) is None
    assert advice(0, above=0, at_target=True, max_lead=16) == 0  # the target wants no drafts
    assert advice(3, above=0, at_target=True, max_lead=16) == 8  # 2 * 3 + 2
    assert advice(3, above=0, at_target=True, max_lead=5) == 5  # at most max_lead
    assert advice(3, above=4, at_target=False, max_lead=16) == 12  # on top of our own lead
    assert advice(0, above=4, at_target=False, max_lead=16) == 4
    assert advice(3, above=0, at_target=False, max_lead=16) == 0  # told to idle: so is ours


def test_lead_limit_is_max_lead_unless_advised_less():
    assert [lead_limit(h, max_lead=8) for h in (None, 0, 3, 8, 20)] == [8, 0, 3, 8, 8]


@pytest.mark.parametrize(
    "last, others, hint",
    [
        (None, False, None),  # never advised: draft at once
        (None, True, None),
        (0, False, 0),  # advised to idle: wait for this request's own advice
        (0, True, 0),
        (4, True, 0),  # others in flight: wait
        (4, False, None),  # alone after advice to draft: start at once
    ],
)
def test_first_hint(last, others, hint):
    assert first_hint(last, others_in_flight=others) == hint


def test_first_hint_after_a_pause_waits_for_advice():
    assert first_hint(4, others_in_flight=False, advice_age_s=0.2) is None
    assert first_hint(4, others_in_flight=False, advice_age_s=FRESH_ADVICE_S + 0.1) == 0
    assert first_hint(None, others_in_flight=False, advice_age_s=100.0) is None
