"""A level hijack, replayed against a real system (launcher, fresh CURVE keys):
a script registers itself as the target under the live target's replica id with a new
incarnation and the public vocabulary fingerprint, then answers any prompt it receives with
" HACKED TEXT". Without an allowed key the handshake stops it; with another level's key the
registry refuses it; with the target level's own key it still cannot take over a live replica.
In every case the user's completions stay the target's greedy output and the script receives
nothing."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import zmq

from common.codec import DecodeError, decode, encode
from common.protocol import Heartbeat, Output, Start
from common.security import Curve, load_curve, release, secret_file
from common.sockets import bound_endpoint, open_socket
from common.tokenization import fingerprint, load_tokenizer
from deploy.harness import complete
from tests.harness import GreedyOracle, launched, leftover_service_processes
from tests.harness import config as e2e_config
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow
MAX_TOKENS = 12
PROMPTS = ["w5 w9 w13", "w40 w41 w42 w40", "w7 w7 w70"]


class Hijacker:
    """The 40-line script: heartbeats as the target, answers prompts with HACKED TEXT."""

    def __init__(self, registry: str, replica: str, vocab: str, curve: Curve | None, level: int):
        self.ctx = zmq.Context()
        self.curve, self.level = curve, level
        self.inbox = open_socket(
            self.ctx, zmq.PULL, "tcp://127.0.0.1:0", linger_ms=0, curve=curve, allow={"gateway"}
        )
        self.push = open_socket(
            self.ctx, zmq.PUSH, registry, linger_ms=0, curve=curve, server="gateway"
        )
        self.beat = Heartbeat(
            replica=replica,
            incarnation=uuid.uuid4().hex,  # a new incarnation of the live replica's id
            level=level,
            inbox=bound_endpoint(self.inbox, "127.0.0.1"),
            notices="tcp://127.0.0.1:1",
            ready=True,
            model="hacked",
            backend="hf",
            tokenizer_fingerprint=vocab,
        )
        self.received: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.push.send(encode(self.beat), zmq.NOBLOCK)
            except zmq.Again:
                pass  # no handshake completed: nothing to send to
            if self.inbox.poll(100):
                try:
                    msg = decode(self.inbox.recv())
                except DecodeError:
                    continue
                self.received.append(msg.TYPE)
                if isinstance(msg, Start):  # what the original script did with the prompt
                    answer = Output(
                        request_id=msg.request_id,
                        replica=self.beat.replica,
                        start=0,
                        tokens=[3, 4, 5],
                        done=True,
                        finish_reason="stop",
                    )
                    out = open_socket(
                        self.ctx, zmq.PUSH, msg.reply_to, linger_ms=200, curve=self.curve,
                        server="gateway",
                    )  # fmt: skip
                    out.send(encode(answer), zmq.NOBLOCK)
                    out.close()

    def __enter__(self) -> Hijacker:
        self._thread.start()
        time.sleep(1.0)  # several heartbeats before any request
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        release(self.ctx)
        self.ctx.destroy(linger=0)


@pytest.fixture(scope="module", autouse=True)
def no_process_left_behind():
    """One system serves every test here: check for leftovers once it has stopped."""
    yield
    left = leftover_service_processes()
    assert not left, f"service processes left running: {left}"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    target = str(tiny_llama(root / "target"))
    stages = [{"level": 0, "backend": "ngram"}, {"level": 1, "backend": "hf", "model": target}]
    config = e2e_config(target, stages)
    with launched(config, root / "logs") as sys_:
        oracle = GreedyOracle(target)
        want = {p: oracle.text(oracle.ids(p, MAX_TOKENS)) for p in PROMPTS}
        yield sys_, target, want


def target_replica(url: str) -> tuple[str, dict]:
    health = httpx.get(f"{url}/health", timeout=5).json()
    assert health["insecure"] is False
    [target] = health["levels"][1]
    return target["replica"], health


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}(?:{{{re.escape(labels)}}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def attack(system, curve: Curve | None, level: int = 1) -> Hijacker:
    sys_, target, want = system
    url, port = sys_.plan.http_url, sys_.plan.gateway.registry_port
    replica, _ = target_replica(url)
    vocab = fingerprint(load_tokenizer(target))
    hijacker = Hijacker(f"tcp://127.0.0.1:{port}", replica, vocab, curve, level)
    with hijacker:
        texts = {p: complete(sys_.plan, p, MAX_TOKENS)["choices"][0]["text"] for p in PROMPTS}
        after, health = target_replica(url)
    assert texts == want, "a completion was not the target's output"
    assert hijacker.received == [], f"the hijacker received {hijacker.received}"
    assert after == replica and health["levels"][1][0]["model"] != "hacked"
    return hijacker


def intruder(keys: Path) -> Curve:
    """A valid CURVE keypair that is on no allow-list (knows every public key)."""
    public, secret = zmq.curve_keypair()
    real = load_curve("client", keys / "public", secret_file(keys, "client"))
    return Curve("intruder", public, secret, real.peers)


def test_a_peer_without_an_allowed_key_cannot_register_or_receive_a_prompt(system):
    sys_, _, _ = system
    url = sys_.plan.http_url
    denied = metric(url, "pipespec:denied_handshakes_total")
    attack(system, curve=None)  # plain TCP, exactly what the script did
    attack(system, curve=intruder(sys_.plan.keys_dir))  # CURVE, but with an unknown key
    assert metric(url, "pipespec:denied_handshakes_total") > denied


def test_a_peer_with_another_levels_key_cannot_register_as_the_target(system):
    sys_, _, _ = system
    keys, url = sys_.plan.keys_dir, sys_.plan.http_url
    level0 = load_curve("level0", keys / "public", secret_file(keys, "level0"))
    before = metric(url, "pipespec:heartbeats_rejected_total", 'reason="wrong_key"')
    attack(system, curve=level0)
    assert metric(url, "pipespec:heartbeats_rejected_total", 'reason="wrong_key"') > before


def test_a_second_incarnation_with_the_right_key_cannot_take_over_a_live_replica(system):
    sys_, _, _ = system
    keys, url = sys_.plan.keys_dir, sys_.plan.http_url
    level1 = load_curve("level1", keys / "public", secret_file(keys, "level1"))
    before = metric(url, "pipespec:heartbeats_rejected_total", 'reason="takeover"')
    attack(system, curve=level1)
    assert metric(url, "pipespec:heartbeats_rejected_total", 'reason="takeover"') > before
