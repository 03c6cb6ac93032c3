"""The verdict replay behind the pipeline-vs-offline acceptance checks, on tiny arrays."""

from __future__ import annotations

import torch

from benchmarks.acceptance_replay import NEAR_TIE, drafter_picks, replay, verifications
from common.sampling import SamplingParams, choose


def event(rid: str, position: int, drafts: int, accepted: int) -> dict[str, str]:
    return {
        "request_id": rid,
        "position": str(position),
        "drafts": str(drafts),
        "accepted": str(accepted),
    }


TEXT = {"a": [1, 2, 3, 4, 5, 6]}


def test_a_pass_accepting_everything_checks_only_its_drafts():
    picks = {"a": ([1, 2, 3, 4, 5, 6], [1.0] * 6)}
    r = replay([event("a", 1, 3, 3)], TEXT, picks)
    assert (r.checked, r.accepted, r.offline_hits, r.differ) == (3, 3, 3, [])


def test_a_rejection_is_checked_and_later_drafts_are_not():
    picks = {"a": ([1, 2, 9, 4, 5, 6], [1.0] * 6)}  # the drafter is wrong at position 2 only
    r = replay([event("a", 0, 5, 2)], TEXT, picks)
    assert (r.checked, r.accepted, r.offline_hits, r.differ) == (3, 2, 2, [])


def test_a_verdict_the_drafter_offline_would_not_give_is_reported():
    picks = {"a": ([1, 2, 3, 4, 5, 6], [1.0] * 6)}  # offline, position 2 would be accepted
    r = replay([event("a", 0, 5, 2)], TEXT, picks)
    assert r.differ == [("a", 2, False)] and r.near_ties == 0


def test_a_differing_verdict_at_a_near_tie_is_counted_not_reported():
    picks = {"a": ([1, 2, 3, 4, 5, 6], [1.0, 1.0, NEAR_TIE / 2, 1.0, 1.0, 1.0])}
    r = replay([event("a", 0, 5, 2)], TEXT, picks)
    assert r.differ == [] and r.near_ties == 1


def test_positions_past_the_text_and_other_requests_are_ignored():
    picks = {"a": ([1, 2, 3, 4, 5, 6], [1.0] * 6)}
    r = replay([event("a", 4, 5, 5), event("b", 0, 3, 0)], TEXT, picks)
    assert (r.checked, r.accepted) == (2, 2)


def test_drafter_picks_are_the_samplers_choices_with_their_margins():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [2.0, 2.0005, 0.0, 0.0]])
    picks, margins = drafter_picks(logits)
    assert picks == [1, 1] and abs(margins[0] - 2.0) < 1e-9 and margins[1] < NEAR_TIE
    p = SamplingParams(0.7, seed=11, top_p=0.9)
    picks, margins = drafter_picks(logits, p)
    assert picks == choose(logits, p, [0, 1]) and all(m > 0 for m in margins)


def test_verifications_reads_only_the_verification_events():
    log = (
        "level=debug event=drafts_verified request_id=x position=7 drafts=4 accepted=2\n"
        "level=info event=request_finished request_id=x tokens=9\n"
    )
    assert verifications(log) == [
        {
            "level": "debug",
            "event": "drafts_verified",
            "request_id": "x",
            "position": "7",
            "drafts": "4",
            "accepted": "2",
        }
    ]
