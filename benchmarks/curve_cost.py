"""What does CURVE encryption add per hop? On loopback, plain and CURVE in the same run:

    python -m benchmarks.curve_cost [--messages 3000] [--bytes 200 4096]

One hop is a PUSH -> PULL pair made by ``common.sockets.open_socket`` (CURVE server on the bound
side, exactly as the services use them). An echo thread sends every message straight back over a
second hop, so half a round trip is one hop's latency; sockets, framing and the echo thread are
the same in both runs, so the difference is the encryption (and the authenticator, which runs
once per connection, not per message). Prints median and p99 per-hop latency and the throughput
of a one-way burst.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import zmq

from common.security import generate, load_curve, release, secret_file
from common.sockets import open_socket


def hop_pair(ctx: zmq.Context, curve_a, curve_b) -> tuple[zmq.Socket, zmq.Socket]:
    """(push from a, pull at b): b binds as a CURVE server accepting a."""
    pull = open_socket(
        ctx, zmq.PULL, "tcp://127.0.0.1:0", curve=curve_b, allow={curve_a.role} if curve_a else None
    )
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    push = open_socket(
        ctx, zmq.PUSH, endpoint, curve=curve_a, server=curve_b.role if curve_b else None
    )
    return push, pull


def measure(curves: tuple, messages: int, size: int) -> dict:
    ctx = zmq.Context()
    a, b = curves
    try:
        out_push, out_pull = hop_pair(ctx, a, b)
        back_push, back_pull = hop_pair(ctx, b, a)
        stop = threading.Event()

        def echo() -> None:
            while not stop.is_set():
                if out_pull.poll(100):
                    back_push.send(out_pull.recv())

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        payload = b"x" * size
        for _ in range(200):  # warm up: handshakes done, buffers allocated
            out_push.send(payload)
            back_pull.recv()
        hops = []
        for _ in range(messages):
            t0 = time.perf_counter()
            out_push.send(payload)
            back_pull.recv()
            hops.append((time.perf_counter() - t0) / 2)
        stop.set()
        thread.join()
        t0 = time.perf_counter()
        for _ in range(messages):
            out_push.send(payload)
        for _ in range(messages):
            out_pull.recv()
        burst_s = time.perf_counter() - t0
        for sock in (out_push, out_pull, back_push, back_pull):
            sock.close(linger=0)
    finally:
        release(ctx)
        ctx.term()
    hops.sort()
    return {
        "median_us": statistics.median(hops) * 1e6,
        "p99_us": hops[int(0.99 * len(hops))] * 1e6,
        "msgs_per_s": messages / burst_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curve_cost", description=__doc__)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--bytes", type=int, nargs="+", default=[200, 4096])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as keys:
        generate(keys, 2)
        pub = f"{keys}/public"
        curve = (
            load_curve("gateway", pub, secret_file(keys, "gateway")),
            load_curve("level1", pub, secret_file(keys, "level1")),
        )
        print(f"{'bytes':>6} {'mode':>6} {'median us/hop':>14} {'p99 us/hop':>11} {'msgs/s':>9}")
        for size in args.bytes:
            rows = {}
            for mode, curves in (("plain", (None, None)), ("curve", curve)):
                rows[mode] = r = measure(curves, args.messages, size)
                print(
                    f"{size:>6} {mode:>6} {r['median_us']:>14.1f} {r['p99_us']:>11.1f} "
                    f"{r['msgs_per_s']:>9.0f}"
                )
            extra = rows["curve"]["median_us"] - rows["plain"]["median_us"]
            print(f"{size:>6} CURVE adds {extra:.1f} us per hop (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
