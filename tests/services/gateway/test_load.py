"""The load test script, short: 8 streaming clients for 10 s against a k=3 simulated system,
with no failed request and every request run to its full length."""

from __future__ import annotations

import pytest

from benchmarks.load_test import main, run_simulated

pytestmark = pytest.mark.slow

MAX_TOKENS = 32


def test_load_test_runs_without_errors(tmp_path):
    report = run_simulated(
        clients=8, duration_s=10, max_tokens=MAX_TOKENS, levels=3, target_ms=10, log_dir=tmp_path
    )
    print(report.summary())
    assert report.results and not report.errors
    assert all(r.tokens == MAX_TOKENS and r.ttft_s is not None for r in report.results)
    assert "time to first token p50" in report.summary()


def test_errors_make_the_script_fail(capsys):
    assert main(["--url", "http://127.0.0.1:9", "--clients", "1", "--duration", "0.1"]) == 1
    out = capsys.readouterr().out
    assert "0 requests ok, 1 errors" in out and "ConnectError" in out
