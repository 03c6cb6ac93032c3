"""The benchmark's records and what is built from them: per-method summaries, the printed table,
the JSON document and the PNG plot. Pure functions over plain data (the plot needs matplotlib).

Vocabulary (the same for every method, so rows compare):

* ``tokens``: generated tokens; ``wall_s``: from sending the request (or calling ``generate``)
  to the last token, prefill included; ``ttft_s``: to the first token.
* ``ms/tok`` = wall / tokens (end to end); ``decode ms/tok`` = (wall - ttft) / (tokens - 1),
  the steady-state rate without the prefill.
* ``speedup`` = the autoregressive row's ms/tok / this row's (same suite, same prompts).
* ``tok/pass``: tokens / target forward passes; a pass is one model call of the target, the
  one that produces the first token included, so autoregressive decoding is 1.00.
* ``acceptance`` per verifier level i (i checks level i-1's drafts): accepted / checked drafts.
* ``rollbacks``: verification passes that rejected a draft, all levels.
* ``busy``: seconds each level spent in forward passes (prefill included), and that as a share
  of the wall time: the first cut of where the time goes.
* ``exact``: outputs equal, token for token, to the target's greedy output (``generate``);
  ``agreement``: mean share of the reference's tokens in the common prefix (1.0 when exact).
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LevelCount:
    """One verifier level's counters for one request (vLLM spec-decode vocabulary)."""

    level: int
    drafts: int = 0  # passes that checked >= 1 draft
    draft_tokens: int = 0
    accepted_tokens: int = 0
    rollbacks: int = 0


@dataclass
class PromptRun:
    prompt_id: str
    tokens: list[int]
    wall_s: float
    ttft_s: float | None
    target_passes: int
    levels: list[LevelCount] = field(default_factory=list)  # verifier levels, level 1 first
    busy_s: list[float] = field(default_factory=list)  # per level, level 0 first; [] = unknown
    passes: list[int] = field(default_factory=list)  # forward passes per level; [] = unknown
    exact: bool | None = None  # set by compare()
    agreement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodResult:
    suite: str  # "qwen", "smollm2", "simulated"
    name: str  # "autoregressive", "assisted", "prompt-lookup", "sync-k3", "pipespec-k3", ...
    kind: str = "measured"  # "measured" (real clock) or "ideal" (simnet, zero overhead)
    levels: list[str] = field(default_factory=list)  # what runs at each level, level 0 first
    runs: list[PromptRun] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}" + ("" if self.kind == "measured" else f"/{self.kind}")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(result: MethodResult, reference: dict[str, list[int]]) -> None:
    """Mark every run exact or not against ``reference`` (prompt id -> the target's greedy ids)."""
    for run in result.runs:
        want = reference.get(run.prompt_id)
        if want is None:
            continue
        run.exact = list(run.tokens) == list(want)
        run.agreement = 1.0 if run.exact else common_prefix(run.tokens, want) / max(1, len(want))


def summarize(result: MethodResult, baseline: MethodResult | None = None) -> dict[str, Any]:
    """One table row: totals over the prompts, and speedups against ``baseline``."""
    row: dict[str, Any] = {
        "suite": result.suite,
        "method": result.name,
        "kind": result.kind,
        "levels": list(result.levels),
        "prompts": len(result.runs),
    }
    if result.error is not None or not result.runs:
        row["error"] = result.error or "no runs"
        return row
    runs = result.runs
    tokens = sum(len(r.tokens) for r in runs)
    wall = sum(r.wall_s for r in runs)
    row |= {"tokens": tokens, "wall_s": round(wall, 4)}
    row["tokens_per_s"] = round(tokens / wall, 3) if wall > 0 else None
    row["ms_per_token"] = round(1000 * wall / tokens, 2) if tokens else None
    timed = [r for r in runs if r.ttft_s is not None and len(r.tokens) > 1]
    if timed:
        decode_tokens = sum(len(r.tokens) - 1 for r in timed)
        row["decode_ms_per_token"] = round(
            1000 * sum(r.wall_s - r.ttft_s for r in timed) / decode_tokens, 2
        )
        row["ttft_s"] = round(sum(r.ttft_s for r in timed) / len(timed), 4)
    passes = sum(r.target_passes for r in runs)
    row["target_passes"] = passes
    row["tokens_per_target_pass"] = round(tokens / passes, 3) if passes else None
    levels: dict[int, LevelCount] = {}
    for r in runs:
        for lc in r.levels:
            acc = levels.setdefault(lc.level, LevelCount(lc.level))
            acc.drafts += lc.drafts
            acc.draft_tokens += lc.draft_tokens
            acc.accepted_tokens += lc.accepted_tokens
            acc.rollbacks += lc.rollbacks
    row["acceptance"] = {
        str(lv): round(c.accepted_tokens / c.draft_tokens, 4) if c.draft_tokens else None
        for lv, c in sorted(levels.items())
    }
    row["draft_tokens"] = {str(lv): c.draft_tokens for lv, c in sorted(levels.items())}
    row["rollbacks"] = sum(c.rollbacks for c in levels.values())
    row["rollbacks_per_level"] = {str(lv): c.rollbacks for lv, c in sorted(levels.items())}
    if all(r.busy_s for r in runs):
        n = max(len(r.busy_s) for r in runs)
        busy = [sum(r.busy_s[i] for r in runs if i < len(r.busy_s)) for i in range(n)]
        row["busy_s"] = [round(b, 3) for b in busy]
        row["busy_share"] = [round(b / wall, 4) if wall > 0 else None for b in busy]
    if all(r.passes for r in runs):
        n = max(len(r.passes) for r in runs)
        row["passes"] = [sum(r.passes[i] for r in runs if i < len(r.passes)) for i in range(n)]
    checked = [r for r in runs if r.exact is not None]
    if checked:
        row["exact"] = f"{sum(r.exact for r in checked)}/{len(checked)}"
        row["all_exact"] = all(r.exact for r in checked)
        row["agreement"] = round(sum(r.agreement for r in checked) / len(checked), 4)
    if baseline is not None and baseline.runs and baseline.error is None:
        base = summarize(baseline)
        if base.get("ms_per_token") and row.get("ms_per_token"):
            row["speedup"] = round(base["ms_per_token"] / row["ms_per_token"], 3)
        if base.get("decode_ms_per_token") and row.get("decode_ms_per_token"):
            row["decode_speedup"] = round(
                base["decode_ms_per_token"] / row["decode_ms_per_token"], 3
            )
    return row


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


COLUMNS = [  # header, width, how to render a row
    (
        "method",
        22,
        lambda r: (
            r["method"] + ("" if r.get("kind", "measured") == "measured" else f" ({r['kind']})")
        ),
    ),
    ("tok/s", 7, lambda r: _fmt(r.get("tokens_per_s"), ".2f")),
    ("ms/tok", 8, lambda r: _fmt(r.get("ms_per_token"), ".1f")),
    ("TTFT s", 6, lambda r: _fmt(r.get("ttft_s"), ".2f")),
    ("speedup", 7, lambda r: _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else "")),
    ("tok/pass", 8, lambda r: _fmt(r.get("tokens_per_target_pass"), ".2f")),
    (
        "accept L1/L2",
        12,
        lambda r: "/".join(_fmt(v, ".2f") for v in r.get("acceptance", {}).values()) or "-",
    ),
    ("rollbk", 6, lambda r: _fmt(r.get("rollbacks"))),
    (
        "busy s (% wall) L0/L1/L2",
        30,
        lambda r: (
            " ".join(
                f"{b:.1f}({100 * s:.0f}%)"
                for b, s in zip(r.get("busy_s", []), r.get("busy_share", []))
            )
            or "-"
        ),
    ),
    ("exact", 5, lambda r: _fmt(r.get("exact"))),
]


def table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """Rows of ``summarize`` as a fixed-width text table."""
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w, _ in COLUMNS))
    lines.append("  ".join("-" * w for _, w, _ in COLUMNS))
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method'].ljust(COLUMNS[0][1])}  FAILED: {r['error']}")
            continue
        lines.append("  ".join(render(r).ljust(w) for _, w, render in COLUMNS))
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def percentile(values: Sequence[float], q: int) -> float | None:
    """The ``q``-th percentile (1..99) of ``values``, interpolated between the closest ranks;
    None for no values.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([5.0], 99), percentile([], 50)
    (2.5, 5.0, None)
    >>> round(percentile(list(range(101)), 99), 6)
    99.0
    """
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measured_vs_ideal(measured: dict[str, Any], ideal: dict[str, Any]) -> dict[str, Any]:
    """Throughput of a measured row as a share of its ideal-schedule row (same method)."""
    return {
        "method": measured["method"],
        "measured_tokens_per_s": measured.get("tokens_per_s"),
        "ideal_tokens_per_s": ideal.get("tokens_per_s"),
        "share": ratio(measured.get("tokens_per_s"), ideal.get("tokens_per_s")),
        "decode_share": ratio(
            ideal.get("decode_ms_per_token"), measured.get("decode_ms_per_token")
        ),
        "measured_tokens_per_pass": measured.get("tokens_per_target_pass"),
        "ideal_tokens_per_pass": ideal.get("tokens_per_target_pass"),
    }


def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def document(
    meta: dict[str, Any],
    results: Sequence[MethodResult],
    rows: Sequence[dict[str, Any]],
    comparisons: dict[str, Any],
) -> dict[str, Any]:
    """The JSON written to results/DIR/results.json."""
    return to_jsonable(
        {
            "meta": meta,
            "summary": list(rows),
            "comparisons": comparisons,
            "methods": [r for r in results],
        }
    )


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


@contextlib.contextmanager
def figure(path: Path, panels: int = 1, panel_size: tuple[float, float] = (6.5, 4.6)):
    """Axes for ``panels`` side-by-side panels; the figure is saved to ``path`` (PNG) when the
    block ends. matplotlib without a display; ImportError where it is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = panel_size
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot(
    path: Path,
    rows: Sequence[dict[str, Any]],
    paper: dict[str, float] | None = None,
    paper_suite: str = "simulated",
) -> None:
    """One panel per suite: end-to-end speedup over autoregressive per method; the simulated
    panel also shows the ideal schedule and the paper's numbers."""
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    with figure(path, len(suites)) as axes:
        for ax, suite in zip(axes, suites):
            _speedup_panel(ax, suite, rows, paper if suite == paper_suite else None)


def _speedup_panel(ax, suite: str, rows: Sequence[dict[str, Any]], paper) -> None:
    measured = [
        r for r in rows if r["suite"] == suite and r.get("kind") == "measured" and "error" not in r
    ]
    ideal = {
        r["method"]: r
        for r in rows
        if r["suite"] == suite and r.get("kind") == "ideal" and "error" not in r
    }
    names = [r["method"] for r in measured]
    x = list(range(len(names)))
    series = [("measured", [r.get("speedup") or 0 for r in measured])]
    if ideal:
        series.append(("ideal schedule", [ideal.get(n, {}).get("speedup") or 0 for n in names]))
    if paper:
        series.append(("paper (A100)", [paper.get(n, 0) for n in names]))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        bars = ax.bar(
            [v + (i - (len(series) - 1) / 2) * width for v in x], values, width, label=label
        )
        ax.bar_label(
            bars,
            labels=[f"{v:.2f}" if v else "" for v in values],
            fontsize=6,
            rotation=90,
            padding=2,
        )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("speedup over autoregressive (x)")
    ax.set_title(suite)
    ax.legend(fontsize=7)
    ax.margins(y=0.2)
