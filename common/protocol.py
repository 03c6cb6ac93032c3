"""Every wire message between the gateway and the stages, in one place.

Glossary
--------
level      Index of a model in the hierarchy: 0 is the smallest drafter (M0), K = levels-1 is the
           target (MK). Level i drafts for level i+1 and verifies level i-1.
position   Index into the *generated* tokens of a request (the prompt is not counted): position 0 is
           the first token after the prompt.
sequence   A level's own list of generated tokens. The target's sequence is *committed*: it never
           changes and is what the user sees. A lower level's sequence is speculative.
span       A run of a level's sequence, ``tokens[start:]``, pushed up to the next level as drafts.
           Spans are latest-state: each one repeats everything from ``start`` so a lost span is
           repaired by the next one.
epoch      A per-request counter owned by each level, bumped whenever that level invalidates the
           drafts it was sent: when it rejects a draft, or when its own sequence is rewritten by a
           level above. A span carries the receiver's epoch it was built on (``base_epoch``); a span
           whose base_epoch is older than the receiver's epoch is *stale* and dropped.
accepted   Draft tokens that equal the verifier's own greedy prediction at their position.
correction The verifier's own token at the first rejected position.
bonus      The verifier's own token after the last draft when every draft was accepted.
notice     A level's state broadcast down (PUB/SUB) to all lower levels after it changes: its
           sequence from ``start``. Lower levels reconcile to it (roll back where they diverge,
           adopt what they lack). A notice that follows a rejection is a *rollback*; otherwise a
           *commit*. Notices are idempotent: applying one twice changes nothing.

Transport
---------
Start, Cancel           gateway  -> every stage of the route   (PUSH -> stage inbox PULL)
Span                    level i  -> level i+1                  (PUSH -> stage inbox PULL)
Notice                  level j  -> all lower levels           (PUB  -> SUB, topic = request id)
Output, RequestError    target   -> gateway                    (PUSH -> gateway PULL)
Heartbeat               stage    -> gateway                    (PUSH -> gateway PULL)

Every message is one msgpack map with ``v`` (protocol version) and ``t`` (type tag); see
``common.codec``. Fields are checked strictly on decode.

Versioning: a new *optional* field (one with a default) keeps the version, as Heartbeat's
``restarts`` and ``kv_*`` and Notice's ``drafter_lead`` did: a new receiver reads an old sender's
message (the field takes its default), but an old receiver refuses the new field (unknown fields
are rejected), so upgrade the receiver first (the gateway before the stages, the lower levels
before the higher). Anything else (a new required field, a changed meaning or unit) bumps
``PROTOCOL_VERSION``.

Units
-----
KV memory is counted in token positions (one position = one token's keys and values at every
layer), as a stage's pool is sized: ``kv_used_tokens`` and ``kv_capacity_tokens`` in Heartbeat.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 2  # 2: sampling fields in Start, logprobs in Output
MAX_TOP_K = 2**31 - 1  # past any vocabulary (the same as off); bounded so msgpack can carry it


class Message(BaseModel):
    """Base of all wire messages: strict types, unknown fields rejected, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    TYPE: ClassVar[str] = ""  # overridden per class; the ``t`` tag on the wire (not a field)


class RouteHop(Message):
    """One replica of one level on a request's route."""

    level: int = Field(ge=0)
    replica: str  # replica id, unique per process incarnation
    inbox: str  # ZMQ endpoint of the replica's PULL socket, e.g. tcp://10.0.0.5:5601
    notices: str  # ZMQ endpoint of the replica's PUB socket


class LevelStats(BaseModel):
    """Counters one level keeps for one request (vLLM spec-decode vocabulary where it applies)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    level: int
    replica: str = ""  # the replica that served this level
    forward_passes: int = 0  # model calls (prefill excluded)
    drafts: int = 0  # verification passes that checked >= 1 draft token ("num_drafts")
    draft_tokens: int = 0  # draft tokens checked ("num_draft_tokens")
    accepted_tokens: int = 0  # draft tokens accepted ("num_accepted_tokens")
    accepted_per_pos: list[int] = []  # [j]: passes that accepted the draft at position j (first 32)
    emitted_tokens: int = (
        0  # tokens appended by this level's own passes (accepted + corrections/bonus)
    )
    rollbacks_issued: int = 0  # passes that rejected a draft (a rollback notice followed)
    rollbacks_applied: int = 0  # times this level's sequence was rewritten by a level above
    stale_spans: int = 0  # spans dropped because their base_epoch was old
    busy_s: float = 0.0  # seconds spent in forward passes (prefill included)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class TokenLogprob(BaseModel):
    """The target model's raw log-probability of one committed token, and of its ``top`` most
    likely alternatives (before temperature and masks), for OpenAI's ``logprobs``."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    token: int
    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class Start(Message):
    """Begin (or resume, or re-sync) a request at one stage. Idempotent.

    A stage that already holds the request only updates its route; the target also re-sends its
    output from ``have``. A stage that does not hold it (lost message, restart) starts from
    ``prompt + committed``.
    """

    TYPE: ClassVar[str] = "start"
    request_id: str
    prompt: list[int]  # token ids
    committed: list[int] = []  # output token ids the gateway already has (resume point)
    have: int = Field(default=0, ge=0)  # output tokens the gateway has received
    max_tokens: int = Field(ge=1)  # cap on generated tokens, counted from position 0
    eos_ids: list[int] = []
    route: list[RouteHop]  # route[i] is the replica serving level i
    reply_to: str  # gateway endpoint for Output messages
    # Sampling (common.sampling): every level applies the same; temperature 0 is greedy.
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)  # 0: off
    min_p: float = Field(default=0.0, ge=0, le=1)
    seed: int = Field(default=0, ge=-(2**63), lt=2**63)
    logprobs: int = Field(default=-1, ge=-1, le=20)  # target: -1 none, else top alternatives


class Span(Message):
    """Drafts from level ``level`` for level ``level + 1``: the sender's ``sequence[start:]``."""

    TYPE: ClassVar[str] = "span"
    request_id: str
    level: int = Field(ge=0)  # sender's level
    replica: str  # sender replica id
    start: int = Field(ge=0)  # position of tokens[0]
    tokens: list[int]
    base_epoch: int = Field(ge=0)  # receiver's epoch the sender had seen when building this span
    epoch: int = Field(ge=0)  # sender's own epoch (orders spans from one sender)
    stats: list[LevelStats] = []  # cumulative stats of the sender and every level below it


class Notice(Message):
    """State of level ``level``: its ``sequence[start:]``, broadcast to all lower levels."""

    TYPE: ClassVar[str] = "notice"
    request_id: str
    level: int = Field(ge=0)  # issuing level
    replica: str  # issuing replica id (epochs are per replica incarnation)
    start: int = Field(ge=0)  # position of tokens[0]
    tokens: list[int]  # authoritative for lower levels
    epoch: int = Field(ge=0)  # issuer's epoch after this change
    rollback: bool = False  # this notice follows a rejection of drafts
    final: bool = False  # the request is finished at the target: free its state
    drafter_lead: int | None = Field(default=None, ge=0)  # tokens past the target's committed
    #   length that the level below should draft at most: the issuer's draft-length policy
    #   (common.draft_policy.drafter_lead); None = no advice (the drafter's own max_lead)


class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    request_id: str
    reason: str = "cancelled"


class Output(Message):
    """Committed tokens from the target: ``committed[start:start+len(tokens)]``."""

    TYPE: ClassVar[str] = "output"
    request_id: str
    replica: str
    start: int = Field(ge=0)
    tokens: list[int]
    done: bool = False
    finish_reason: Literal["stop", "length", "cancelled"] | None = None  # set when done
    stats: list[LevelStats] = []  # per level, index = level; set when done
    logprobs: list[TokenLogprob] = []  # one per token when the Start asked for logprobs


class RequestError(Message):
    """A stage could not serve a request (bad input, model error). The request fails."""

    TYPE: ClassVar[str] = "error"
    request_id: str
    replica: str
    level: int
    message: str


class Heartbeat(Message):
    """Registration and liveness of one stage replica; sent every heartbeat interval.

    ``replica`` names the replica and may outlive a process (a pod's name across container
    restarts); ``incarnation`` is new on every process start. The gateway keeps the incarnation
    it registered until that one expires: another incarnation under a live replica's id is
    refused, never a takeover.

    KV pool: ``kv_used_tokens`` of ``kv_capacity_tokens`` positions are reserved (each open
    request holds its worst case, prompt + max_tokens); ``waiting_requests`` are held but wait for
    room. The gateway routes toward free KV (capacity - used) and never to a replica whose
    capacity is below a request's need. A stage without a bounded pool reports zeros.
    """

    TYPE: ClassVar[str] = "heartbeat"
    replica: str
    incarnation: str  # changes on every process start
    level: int = Field(ge=0)
    inbox: str
    notices: str
    ready: bool  # model loaded
    draining: bool = False  # takes no new requests
    active_requests: int = Field(default=0, ge=0)
    model: str = ""
    backend: str = ""
    can_verify: bool = True
    can_target: bool = True  # False: scores part of the vocabulary only (a drafter's draft_vocab)
    tokenizer_fingerprint: str | None = None  # None: works on raw ids (n-gram)
    max_context: int = 0  # positions; 0 = unknown
    restarts: int = Field(default=0, ge=0)  # times a supervisor restarted this replica
    kv_used_tokens: int = Field(default=0, ge=0)  # KV positions reserved by open requests
    kv_capacity_tokens: int = Field(default=0, ge=0)  # 0 = unbounded / not reported
    waiting_requests: int = Field(default=0, ge=0)  # requests waiting for KV room

    @property
    def kv_cache_usage_perc(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: reserved / capacity, 0..1; 0 when unbounded."""
        return self.kv_used_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 0.0


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Start, Span, Notice, Cancel, Output, RequestError, Heartbeat)
}
