"""Drafters get the draft-length policy's signal: a verifier advises the level below how far to run
ahead (Notice.drafter_lead), and a drafter keeps within it."""

from common.backends.simulated import SimulatedBackend
from common.draft_policy import LOAD_MEMORY
from common.engine_config import EngineConfig
from common.protocol import Notice, RouteHop, Start
from common.stage_engine import StageEngine
from tests.common.test_engine_config import ROUTE, Recorder, drafts


def engine(level: int, **config) -> tuple[StageEngine, Recorder]:
    outbox = Recorder()
    backend = SimulatedBackend(agreement=0.8, seed=1, vocab=50, sleep=lambda s: None)
    cfg = EngineConfig(level=level, **config)
    return StageEngine(cfg, backend, outbox, replica=f"L{level}", clock=lambda: 0.0), outbox


def start(e: StageEngine, n: int, max_tokens: int = 64) -> None:
    for i in range(n):
        e.handle(
            Start(
                request_id=f"q{i}",
                prompt=[1, 2, 3],
                max_tokens=max_tokens,
                route=ROUTE,
                reply_to="gw",
            )
        )


def advised(outbox: Recorder) -> dict[str, int | None]:
    return {n.request_id: n.drafter_lead for n in outbox.sent if isinstance(n, Notice)}


def test_a_lone_request_lets_its_drafter_run_the_full_lead_and_a_full_batch_reins_it_in():
    alone, out_alone = engine(level=1, max_lead=16)
    start(alone, 1)
    assert alone.step()
    lone = advised(out_alone)["q0"]
    assert lone is not None and lone >= 8  # with no verdicts yet, acceptance is taken as 0.5

    busy, out_busy = engine(level=1, max_lead=16)
    start(busy, 16)
    assert busy.step()
    leads = advised(out_busy)
    assert len(leads) == 16 and all(
        lead is not None and 0 < lead <= 4 < lone for lead in leads.values()
    )


def test_no_advice_from_a_verifier_that_checks_every_draft_or_runs_in_lockstep():
    for config in ({"draft_policy": "all"}, {"schedule": "sync", "sync_wait_s": 0.0}):
        e, out = engine(level=1, **config)
        start(e, 1)
        assert e.step()
        assert advised(out) == {"q0": None}


def notice(tokens: list[int], lead: int | None, epoch: int = 0) -> Notice:
    return Notice(
        request_id="q0",
        level=1,
        replica="L1",
        start=0,
        tokens=tokens,
        epoch=epoch,
        drafter_lead=lead,
    )


def drafted_ahead(e: StageEngine) -> int:
    """Run the drafter until it stops wanting passes; how far past the target it got."""
    for _ in range(100):
        if not e.step():
            break
    r = e.requests["q0"]
    return len(r.tokens) - r.target_len


def test_a_drafter_stops_at_the_advised_lead_and_resumes_when_it_grows():
    e, _ = engine(level=0, max_lead=16)
    start(e, 1)
    assert drafted_ahead(e) == 16  # no advice yet: max_lead
    target = list(e.requests["q0"].tokens[:2])
    e.handle(notice(target, lead=3))  # the target committed 2 (adopted) and advises 3
    assert drafted_ahead(e) == 16 - 2  # already ahead: it waits, it does not discard drafts
    e.handle(notice(target + e.requests["q0"].tokens[2:14], lead=3))
    assert drafted_ahead(e) == 3  # 14 committed: it drafts 3 past them, and stops
    e.handle(notice(target + e.requests["q0"].tokens[2:14], lead=9, epoch=1))
    assert drafted_ahead(e) == 9  # the load fell: it runs further ahead again
    e.handle(notice(e.requests["q0"].tokens[:14], lead=0, epoch=1))
    assert drafted_ahead(e) == 9  # 0: the verifier wants no drafts, the drafter idles
    e.handle(notice(e.requests["q0"].tokens[:20], lead=0, epoch=1))
    assert drafted_ahead(e) <= 3 and not e.has_work()


def test_advice_from_another_level_is_ignored():
    e, _ = engine(level=0, max_lead=8)
    start(e, 1)
    drafted_ahead(e)
    e.handle(
        Notice(request_id="q0", level=2, replica="L2", start=0, tokens=[], epoch=0, drafter_lead=1)
    )
    assert e.requests["q0"].lead.hint is None


def test_a_costly_drafter_with_poor_drafts_is_told_to_idle_and_a_free_one_is_not():
    """drafter_cost: where the drafter shares the verifier's compute, its drafts are worth making
    only at good acceptance; at 1 of 12 accepted the verifier advises a lead of 0 (idle)."""
    leads = {}
    for cost in (0.0, 0.45):
        e, out = engine(level=1, max_lead=16, drafter_cost=cost)
        start(e, 1)
        stats = e.requests["q0"].stats
        stats.draft_tokens, stats.accepted_tokens = 12, 1
        assert e.step()
        leads[cost] = advised(out)["q0"]
    assert leads[0.45] == 0 and leads[0.0] is not None and leads[0.0] >= 4


def test_a_middle_level_told_to_idle_tells_its_own_drafter_to_idle():
    route = [RouteHop(level=i, replica=f"L{i}", inbox="-", notices="-") for i in range(3)]
    e, out = engine(level=1, max_lead=16)
    e.handle(Start(request_id="q0", prompt=[1, 2, 3], max_tokens=64, route=route, reply_to="gw"))
    assert e.step()  # drafts past the target, advising its drafter a lead
    assert advised(out)["q0"] > 0
    out.sent.clear()
    committed = e.requests["q0"].tokens + [7]  # the target accepted all and added one: adopted
    e.handle(
        Notice(
            request_id="q0",
            level=2,
            replica="L2",
            start=0,
            tokens=committed,
            epoch=0,
            drafter_lead=0,
        )
    )
    assert not e.has_work() and advised(out) == {"q0": 0}


def test_once_the_level_above_advises_a_new_request_among_others_waits_for_its_own_advice():
    """The first request ever drafts at once (max_lead: nothing says the level above advises).
    After advice has come, a new request that finds others in flight gets no pass, not even its
    prefill, until the level above advises a lead for it (under load that advice is often 0);
    one that finds the drafter holding nothing starts at once."""
    e, _ = engine(level=0, max_lead=8)
    start(e, 1)
    assert drafted_ahead(e) == 8
    e.handle(notice(e.requests["q0"].tokens[:2], lead=0))
    e.handle(Start(request_id="q1", prompt=[4, 5], max_tokens=64, route=ROUTE, reply_to="gw"))
    assert not e.step() and not e.requests["q1"].tokens  # q0 is 6 ahead of a lead of 0, q1 waits
    e.handle(
        Notice(request_id="q1", level=1, replica="L1", start=0, tokens=[], epoch=0, drafter_lead=3)
    )
    assert e.step() and len(e.requests["q1"].tokens) == 1
    for rid in ("q0", "q1"):  # both end
        e.handle(
            Notice(request_id=rid, level=2, replica="L2", start=0, tokens=[], epoch=9, final=True)
        )
    assert not e.requests
    e.handle(Start(request_id="q2", prompt=[6, 7], max_tokens=64, route=ROUTE, reply_to="gw"))
    assert e.step() and len(e.requests["q2"].tokens) == 1  # alone: it drafts at once


def test_after_advice_to_idle_a_new_request_at_an_idle_drafter_waits_for_its_own():
    """Under load the level above advises 0 (its policy checks no drafts); a request that arrives
    when we hold nothing then waits for its own advice too (at 2-16 clients on a 2-vCPU EPYC, 2026-12-04, each
    round's first request cost the middle level a prefill the target never used), and drafts as
    soon as that advice is a lead."""
    e, _ = engine(level=0, max_lead=8)
    start(e, 1)
    e.step()
    e.handle(notice(e.requests["q0"].tokens[:1], lead=0))
    e.handle(
        Notice(request_id="q0", level=2, replica="L2", start=0, tokens=[], epoch=9, final=True)
    )
    assert not e.requests
    e.handle(Start(request_id="q1", prompt=[4, 5], max_tokens=64, route=ROUTE, reply_to="gw"))
    assert not e.step() and not e.requests["q1"].tokens
    e.handle(
        Notice(request_id="q1", level=1, replica="L1", start=0, tokens=[], epoch=0, drafter_lead=3)
    )
    while e.step():
        pass
    assert len(e.requests["q1"].tokens) == 3


def test_a_prefill_pass_advises_what_the_decode_passes_after_it_will_check():
    """The advice is for the passes to come, where each request feeds one token. A prefill pass
    of 12 requests x 40 prompt tokens costs so much that any draft looks nearly free beside it;
    advising from it sent every drafter to prefill for decode passes that then checked none.
    With a drafter that shares our compute (cost 0.45), 12 requests get no lead, prefill or not,
    while a lone request still gets one."""
    busy, out = engine(level=1, max_lead=16, drafter_cost=0.45)
    for i in range(12):
        busy.handle(
            Start(
                request_id=f"q{i}",
                prompt=list(range(1, 41)),
                max_tokens=64,
                route=ROUTE,
                reply_to="gw",
            )
        )
    assert busy.step()
    assert sum(len(r.tokens) for r in busy.requests.values()) == 12  # one pass: the prefills
    assert advised(out) == {f"q{i}": 0 for i in range(12)}

    alone, out_alone = engine(level=1, max_lead=16, drafter_cost=0.45)
    start(alone, 1)
    assert alone.step()
    assert advised(out_alone)["q0"] > 0


def test_a_drafter_whose_drafts_never_arrive_in_time_is_told_to_idle_and_a_timely_one_is_not():
    """The lead advice weighs each draft by its chance of arriving before the pass that would
    check it (``on_time_estimate``). A drafter that sends nothing while advised a lead (on a
    2-vCPU EPYC, 2026-12-04: SmolLM2[25/30] at one client, drafting a full core's worth for 1-2 checked drafts
    in 23 target passes) is told to idle within a few passes; one whose drafts are always waiting
    keeps its lead. Both verifiers agree with the target, a drafter that shares their compute."""

    def verifier() -> tuple[StageEngine, Recorder]:
        outbox = Recorder()
        backend = SimulatedBackend(agreement=1.0, seed=1, vocab=50, sleep=lambda s: None)
        config = EngineConfig(level=1, max_lead=16, drafter_cost=0.45)
        return StageEngine(config, backend, outbox, replica="L1", clock=lambda: 0.0), outbox

    oracle = SimulatedBackend(agreement=1.0, seed=1, vocab=50)  # what the verifier will say
    leads: dict[str, list[int | None]] = {}
    for name, supplies in (("silent", False), ("timely", True)):
        e, out = verifier()
        start(e, 1)
        r = e.requests["q0"]
        for epoch in range(8):
            if supplies and r.tokens:  # the verifier's own next two tokens, from the oracle
                history = r.prompt + r.tokens
                tokens = [oracle.predict(history)]
                tokens.append(oracle.predict(history + tokens))
                drafts(e, tokens, epoch, request="q0")
            out.sent.clear()
            assert e.step()
        leads[name] = [n.drafter_lead for n in out.sent if isinstance(n, Notice)]
    assert leads["silent"] == [0]  # the last pass's advice
    assert leads["timely"][0] > 0 and e.requests["q0"].stats.accepted_tokens >= 8


def test_the_cores_rule_gives_the_target_every_core_while_its_drafters_idle():
    """A drafter sharing the machine costs more than its drafts save (drafter_cost 5): the policy
    wants no drafts, the drafter is told to idle, and the pass runs on every core; drafts that
    pay keep the pass on its share."""
    for cost, threads in ((5.0, 2), (0.0, 1)):
        outbox = Recorder()
        backend = SimulatedBackend(agreement=0.8, seed=1, vocab=50, sleep=lambda s: None)
        cfg = EngineConfig(level=1, drafter_cost=cost, threads=1, threads_alone=2)
        seen: list[int] = []
        e = StageEngine(cfg, backend, outbox, "L1", clock=lambda: 0.0, set_threads=seen.append)
        start(e, 2)
        assert e.step() and e.step()
        assert seen[-1] == threads, (cost, seen)
        leads = list(advised(outbox).values())
        assert all(lead == 0 for lead in leads) if threads == 2 else any(leads)


def test_under_the_cores_rule_drafting_must_pay_for_the_cores_it_takes():
    """Sharing the cores with the drafters makes every pass cost ``threads_alone / threads`` (2)
    times more. Until this level's finished requests have checked enough drafts it explores:
    sixteen requests are advised to draft, on their share of the cores. Once a request has had
    every draft accepted, the sixteen would gain less from drafts than the cores cost them: the
    drafters idle and the pass takes every core. Without the cores rule they keep drafting."""

    def sixteen(e: StageEngine, outbox: Recorder, seen: list[int]) -> tuple[list, int]:
        outbox.sent.clear()
        start(e, 16)
        assert e.step()
        return [advised(outbox).get(f"q{i}") for i in range(16)], seen[-1] if seen else 0

    def verifier(**rule) -> tuple[StageEngine, Recorder, list[int]]:
        outbox, seen = Recorder(), []
        backend = SimulatedBackend(agreement=1.0, seed=1, vocab=50, sleep=lambda s: None)
        cfg = EngineConfig(level=1, max_lead=16, **rule)
        e = StageEngine(cfg, backend, outbox, "L1", clock=lambda: 0.0, set_threads=seen.append)
        return e, outbox, seen

    e, outbox, seen = verifier(threads=1, threads_alone=2)
    leads, threads = sixteen(e, outbox, seen)
    assert all(leads) and threads == 1  # nothing known yet: explore

    e, outbox, seen = verifier(threads=1, threads_alone=2)
    oracle = SimulatedBackend(agreement=1.0, seed=1, vocab=50)
    e.handle(Start(request_id="p", prompt=[1, 2, 3], max_tokens=90, route=ROUTE, reply_to="gw"))
    for epoch in range(200):
        r = e.requests.get("p")
        if r is None:
            break
        if r.tokens:
            history, offered = r.prompt + r.tokens, []
            for _ in range(8):
                offered.append(oracle.predict(history + offered))
            drafts(e, offered, epoch, request="p")
        assert e.step()
    assert "p" not in e.requests and e.finished["p"]
    leads, threads = sixteen(e, outbox, seen)
    assert leads == [0] * 16 and threads == 2

    e, outbox, seen = verifier()
    leads, _ = sixteen(e, outbox, seen)
    assert all(leads)


def test_under_the_cores_rule_a_level_above_its_drafting_load_takes_every_core():
    """With ``max_drafting_load`` 1, a lone request drafts on the level's share of the cores; a
    second one makes the level idle its drafters and take every core. The first, having run
    above the cap, ends without drafts; a new lone request, however long the level sat idle,
    drafts again once the level's last ``LOAD_MEMORY`` passes held one request."""
    outbox, seen = Recorder(), []
    backend = SimulatedBackend(agreement=0.8, seed=1, vocab=50, sleep=lambda s: None)
    cfg = EngineConfig(level=1, max_lead=16, threads=1, threads_alone=2, max_drafting_load=1)
    e = StageEngine(cfg, backend, outbox, "L1", clock=lambda: 0.0, set_threads=seen.append)
    start(e, 1, max_tokens=20)
    assert e.step() and seen[-1] == 1 and advised(outbox)["q0"]

    e.handle(Start(request_id="q1", prompt=[1, 2], max_tokens=3, route=ROUTE, reply_to="gw"))
    outbox.sent.clear()
    assert e.step()
    assert seen[-1] == 2 and advised(outbox) == {"q0": 0, "q1": 0}
    while "q0" in e.requests:  # q1 ends first; q0 decodes alone to its end
        outbox.sent.clear()
        assert e.step()
        assert seen[-1] == 2 and set(advised(outbox).values()) <= {0}

    for _ in range(2 * LOAD_MEMORY):  # idle polls are no passes: the load is remembered
        assert not e.step()
    threads = []
    for i in range(LOAD_MEMORY + 1):  # one request after another, each decoding one token
        rid = f"n{i}"
        e.handle(Start(request_id=rid, prompt=[1, 2], max_tokens=1, route=ROUTE, reply_to="gw"))
        outbox.sent.clear()
        assert e.step()
        threads.append(seen[-1])
    assert threads[0] == 2 and threads[-1] == 1 and advised(outbox)[rid]
