"""Where does a stage's time go: model passes, engine, codec, sockets or waiting?

``python -m benchmarks.run ... --profile-stages`` starts every stage as
``python -m benchmarks.stage_profile`` instead of ``python -m services.stage``: the same
``main()``, profiled (main thread only; the heartbeat thread is not), the profile written to
``$PIPESPEC_BENCH_PROFILE`` when the stage stops. ``breakdown(path)`` splits the main loop's
time into

* forward   model passes: ``step`` of the stage's batched backend (whichever class under
            ``common/backends`` it is: every stage serves through one), prefill included
* engine    the rest of ``StageEngine.step`` and ``handle`` (Python bookkeeping, pydantic
            message construction)
* codec     msgpack + pydantic: ``common.codec.encode`` / ``decode`` (both directions)
* sockets   ``zmq`` sends and receives (not the poll)
* waiting   ``zmq.Poller.poll`` (idle: nothing to do, or waiting for input)
* other     the loop itself, metrics, ticks

>>> [model_pass(f"/x/common/{f}.py", "step") for f in ("backends/quantized", "stage_engine")]
[True, False]
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
from typing import Any

ENV = "PIPESPEC_BENCH_PROFILE"


def main() -> int:
    from services.stage.__main__ import main as stage_main

    profile = cProfile.Profile()
    profile.enable()
    try:
        code = stage_main()
    finally:
        profile.disable()
        path = os.environ.get(ENV)
        if path:
            profile.dump_stats(path)
    return code


def _cumulative(stats: pstats.Stats, match) -> float:
    """Cumulative seconds of the functions ``match(file, name)`` selects, not counting calls
    nested inside another selected function (so recursion or wrappers are not double counted)."""
    chosen = {key for key in stats.stats if match(key[0], key[2])}  # type: ignore[attr-defined]
    total = 0.0
    for key in chosen:
        cc, nc, tt, ct, callers = stats.stats[key]  # type: ignore[attr-defined]
        outside = sum(v[3] for caller, v in callers.items() if caller not in chosen)
        total += outside if callers else ct
    return total


def model_pass(file: str, name: str) -> bool:
    """A batched backend's pass (what ``StageEngine.step`` calls once per pass); a ``step`` that
    calls another (a subclass's to its base's) is counted once, by ``_cumulative``."""
    return name == "step" and "common/backends/" in file


def breakdown(path: str) -> dict[str, Any]:
    stats = pstats.Stats(path)
    loop = _cumulative(stats, lambda f, n: n == "run" and f.endswith("services/stage/service.py"))
    forward = _cumulative(stats, model_pass)
    step = _cumulative(
        stats, lambda f, n: n in ("step", "handle") and f.endswith("common/stage_engine.py")
    )
    codec = _cumulative(
        stats, lambda f, n: n in ("encode", "decode") and f.endswith("common/codec.py")
    )
    sends = _cumulative(stats, lambda f, n: "zmq" in f and n in ("send", "send_multipart"))
    recvs = _cumulative(stats, lambda f, n: "zmq" in f and n in ("recv", "recv_multipart"))
    waiting = _cumulative(stats, lambda f, n: "zmq" in f and n == "poll" and "poll.py" in f)
    encode = _cumulative(stats, lambda f, n: n == "encode" and f.endswith("common/codec.py"))
    out = {
        "loop_s": loop,
        "forward_s": forward,
        "engine_s": max(0.0, step - forward - encode - sends),
        "codec_s": codec,
        "sockets_s": sends + recvs,
        "waiting_s": waiting,
    }
    out["other_s"] = max(0.0, loop - forward - out["engine_s"] - codec - out["sockets_s"] - waiting)
    return {k: round(v, 3) for k, v in out.items()}


def format_breakdown(name: str, b: dict[str, Any]) -> str:
    loop = b["loop_s"] or 1.0
    parts = ", ".join(
        f"{k[:-2]} {b[k]:.2f} s ({100 * b[k] / loop:.1f}%)"
        for k in ("forward_s", "engine_s", "codec_s", "sockets_s", "waiting_s", "other_s")
    )
    return f"{name}: main loop {b['loop_s']:.1f} s = {parts}"


if __name__ == "__main__":
    sys.exit(main())
