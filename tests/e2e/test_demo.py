"""``python -m deploy.launch CONFIG --demo PROMPT`` (what ``make demo`` runs), as a user runs it:
the streamed completion, its statistics, and the side-by-side line against the target alone,
whose text must be the same."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow  # three processes and two models: about half a minute


def test_demo_prints_the_side_by_side_line_with_the_same_text(tmp_path):
    target = tiny_llama(tmp_path / "target", layers=2, hidden=64)
    config = tmp_path / "demo.toml"
    config.write_text(
        f"""
[gateway]
tokenizer = "{target}"
served_model_name = "tiny"
num_levels = 2
http_port = 0
registry_port = 0
client_port = 0

[[stages]]
level = 0
backend = "ngram"

[[stages]]
level = 1
backend = "hf"
model = "{target}"
threads = 1
"""
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.launch",
            str(config),
            "--demo",
            "a b c",
            "--max-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = re.search(
        r"PipeSpec [\d.]+ tokens/s \| target alone \(target\) [\d.]+ tokens/s \| [\d.]+x \| "
        r"same text: (\w+)",
        run.stdout,
    )
    assert line is not None, run.stdout[-3000:]
    assert line[1] == "yes", run.stdout[-3000:]
    assert "tokens per pass" in run.stdout
