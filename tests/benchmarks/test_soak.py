"""The soak's verdicts on tiny arrays: RSS stability after warm-up and which requests failed."""

import pytest

from benchmarks.load_test import Result
from benchmarks.soak import request_errors, rss_verdict, verdicts


def test_baseline_is_the_first_sample_at_or_after_warmup():
    # the climb during warm-up (50 -> 100 MB) does not count; later samples stay within 10 %
    check = rss_verdict([0, 5, 10, 15, 20], [50, 80, 100, 108, 97], warmup_s=7, tolerance=0.10)
    assert (check.baseline_t_s, check.baseline_mb) == (10, 100)
    assert check.max_change == pytest.approx(0.08)
    assert check.ok


@pytest.mark.parametrize(
    ("later", "change"),
    [([105, 111], 0.11), ([105, 88], -0.12)],  # growth and shrinkage both count
)
def test_any_later_sample_outside_the_tolerance_fails(later, change):
    check = rss_verdict([0, 10, 20, 30], [60, 100, *later], warmup_s=10, tolerance=0.10)
    assert check.max_change == pytest.approx(change)
    assert not check.ok


def test_exactly_at_the_tolerance_passes():
    assert rss_verdict([0, 1], [200, 220], warmup_s=0, tolerance=0.10).ok


@pytest.mark.parametrize(
    ("times", "rss"),
    [
        ([0, 10, 20], [50, 100, 100]),  # no sample at or after the warm-up (30 s)
        ([0, 30], [50, 100]),  # the baseline is the last sample: nothing to compare
        ([0, 30, 40], [50, 0, 100]),  # the process was gone at the baseline
    ],
)
def test_no_judgement_is_a_failure(times, rss):
    check = rss_verdict(times, rss, warmup_s=30, tolerance=0.10)
    assert check.max_change is None
    assert not check.ok


def test_verdicts_per_process_from_samples():
    samples = [
        {"t_s": t, "gateway": {"rss_mb": g}, "stage2": {"rss_mb": s}}
        for t, g, s in [(0, 90, 300), (15, 100, 400), (30, 102, 460)]
    ]
    checks = verdicts(samples, ["gateway", "stage2"], warmup_s=15, tol=0.10)
    assert checks["gateway"].ok
    assert not checks["stage2"].ok
    assert checks["stage2"].max_change == pytest.approx(0.15)


def test_request_errors_counts_errors_and_truncation_only_when_exact():
    results = [Result(tokens=8), Result(error="HTTP 503: b'busy'"), Result(tokens=5)]
    assert request_errors(results, exact_tokens=None) == ["HTTP 503: b'busy'"]
    assert request_errors(results, exact_tokens=8) == [
        "HTTP 503: b'busy'",
        "truncated: 5 of 8 tokens",
    ]
