"""One pydantic-settings class per service. Constructed once in ``main`` and passed explicitly.

Every field can be overridden from the environment: ``PIPESPEC_STAGE_<FIELD>`` for a stage,
``PIPESPEC_GATEWAY_<FIELD>`` for the gateway (e.g. ``PIPESPEC_STAGE_DEVICE=cuda:1``).
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.engine_config import EngineConfig

BackendKind = Literal["quantized", "hf", "early-exit", "ngram", "simulated"]


class TransportSettings(BaseSettings):
    """The sockets, security and logging fields every service has (each service's class adds its
    own env prefix: ``PIPESPEC_STAGE_HWM``, ``PIPESPEC_GATEWAY_INSECURE``, ...)."""

    hwm: int = Field(10_000, ge=0)
    linger_ms: int = Field(500, ge=0)
    log_level: str = "info"

    insecure: bool = Field(
        False, description="plain TCP, no CURVE: anyone who reaches a port may talk (warned)"
    )
    public_keys: str | None = Field(None, description="directory of every role's <role>.key")
    secret_key: str | None = Field(None, description="this role's .key_secret file")
    max_message_bytes: int = Field(
        16 << 20, ge=1024, description="ZMQ_MAXMSGSIZE of every receiving socket"
    )
    restarts: int = Field(0, ge=0, description="set by a supervisor: times this was restarted")


class StageSettings(TransportSettings):
    model_config = SettingsConfigDict(env_prefix="PIPESPEC_STAGE_", extra="forbid")

    level: int = Field(ge=0, description="0 = smallest drafter; the target is the highest level")
    backend: BackendKind = "hf"
    model: str = Field("", description="HF model id, local directory, or a .gguf file")
    tokenizer: str | None = Field(None, description="where the tokenizer is, if not `model`")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    threads_alone: int | None = Field(
        None,
        ge=1,
        description="the cores rule (quantized backend): threads for a pass in which the draft "
        "policy wants no drafts, so the model stages below idle and free their cores (the "
        "launcher sets it to every core for a target sharing its machine); None: always `threads`",
    )
    max_drafting_load: int | None = Field(
        None,
        ge=0,
        description="the cores rule: above this many requests (the most of the last 64 passes) "
        "the level does not draft at all, and takes `threads_alone`, nor for a request that ran "
        "above it (the launcher sets 1 for a target sharing its machine); None: the draft policy "
        "alone decides",
    )
    draft_vocab: int | None = Field(
        None,
        ge=16,
        description="quantized drafter: score only token ids 0 .. draft_vocab - 1 (the first rows "
        "of its head, a multiple of 16), so each token reads a fraction of the head; drafts only "
        "(a stage with it refuses to be the target); None: the whole vocabulary",
    )
    early_exit_layers: int | None = Field(None, ge=1, description="early-exit: layers kept")
    ngram_max: int = Field(3, ge=1, description="n-gram drafter: longest suffix to match")
    ngram_min: int = Field(1, ge=1, description="n-gram drafter: shortest suffix to match")
    sim_agreement: float = Field(1.0, ge=0, le=1, description="simulated: P(token == target's)")
    sim_cost_ms: float = Field(0.0, ge=0, description="simulated: ms per forward pass")
    sim_cost_per_token_ms: float = Field(0.0, ge=0, description="simulated: ms per extra token")
    sim_seed: int = Field(0, description="simulated: the text; same seed at every level")
    sim_vocab: int = Field(32_000, ge=2, description="simulated: vocabulary size")

    bind_host: str = "127.0.0.1"
    advertise_host: str | None = Field(None, description="host peers use; default bind_host")
    inbox_port: int = Field(0, ge=0, le=65535, description="PULL port; 0 = ephemeral")
    notices_port: int = Field(0, ge=0, le=65535, description="PUB port; 0 = ephemeral")
    gateway: str = Field("tcp://127.0.0.1:5550", description="gateway's PULL endpoint")
    gateway_all_addresses: bool = Field(
        False,
        description="register with every address the gateway host resolves to "
        "(several gateway replicas behind a headless Service)",
    )
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    max_lead: int = Field(16, ge=1, description="tokens a lower level may run past the target")
    schedule: Literal["async", "sync"] = Field(
        "async", description="async: PipeSpec; sync: lockstep speculative decoding (a baseline)"
    )
    lookahead: int = Field(8, ge=1, description="sync: drafts per verification (paper's SD: 8)")
    sync_wait_s: float = Field(2.0, gt=0, description="sync: verify with fewer drafts after")
    max_verify_tokens: int = Field(32, ge=1, description="draft tokens checked per pass, at most")
    max_batch_tokens: int = Field(
        512, ge=1, description="tokens one batched pass feeds, all requests together"
    )
    draft_policy: Literal["goodput", "all"] = Field(
        "goodput",
        description="goodput: check the drafts worth their cost in the batch (shrinks under "
        "load); all: every draft on offer",
    )
    drafter_cost: float = Field(
        0.0,
        ge=0,
        description="goodput policy: what a token drafted by the level below costs this level, "
        "relative to its one-token pass, where the levels share compute (one CPU); 0 when the "
        "drafter has its own device. A costly drafter with low acceptance then gets no drafts "
        "and idles",
    )
    kv_pool_tokens: int = Field(
        4096,
        ge=16,
        description="KV positions this stage holds, all requests together; a request reserves "
        "prompt + max_tokens, and waits when the pool is full",
    )
    min_rows: int = Field(
        0,
        ge=0,
        description="rows every matrix product gets: 0 probes this machine at load for the fewest "
        "that keep logits independent of batch and window (exact: 4 or 16 on the CPUs tried); "
        "1 is faster for lone one-token steps, exact only almost always",
    )
    weight_layout: Literal["auto", "row", "column"] = Field(
        "auto",
        description="how a transformers stage stores its linear weights: auto probes row- and "
        "column-major at load and keeps column-major only where it needs fewer padded rows "
        "(row-major with an explicit min_rows)",
    )
    cuda_graph_max_tokens: int = Field(
        128,
        ge=0,
        description="on a CUDA device, passes of up to this many tokens (all requests together) "
        "replay piecewise CUDA graphs captured at load, one set per power-of-two bucket, "
        "attention eager between them; longer passes and 0 run eager",
    )
    heartbeat_interval_s: float = Field(0.5, gt=0)
    request_ttl_s: float = Field(60.0, gt=0, description="drafter drops a silent request after")
    done_retention_s: float = Field(60.0, gt=0, description="target keeps finished output for")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="HTTP /metrics and /health/{live,ready}; None = off"
    )
    drain_timeout_s: float = Field(20.0, ge=0, description="SIGTERM: finish in-flight work for")
    liveness_timeout_s: float = Field(60.0, gt=0, description="main loop silent this long = dead")

    @model_validator(mode="after")
    def _check(self) -> StageSettings:
        if self.backend in ("quantized", "hf", "early-exit") and not self.model:
            raise ValueError(f"backend {self.backend!r} needs `model`")
        if self.backend == "early-exit" and self.early_exit_layers is None:
            raise ValueError("backend 'early-exit' needs `early_exit_layers`")
        if self.ngram_min > self.ngram_max:
            raise ValueError("ngram_min must be <= ngram_max")
        if self.draft_vocab is not None and self.backend != "quantized":
            raise ValueError("draft_vocab is a setting of the quantized backend")
        return self

    def engine_config(self) -> EngineConfig:
        """The fields the stage's engine reads; the rest is the service's (backend, sockets,
        operations).

        >>> s = StageSettings(level=1, backend="ngram", schedule="sync", lookahead=4)
        >>> c = s.engine_config()
        >>> c.level, c.schedule, c.lookahead, c.draft_cap
        (1, 'sync', 4, 4)
        """
        return EngineConfig(
            level=self.level,
            schedule=self.schedule,
            max_lead=self.max_lead,
            lookahead=self.lookahead,
            sync_wait_s=self.sync_wait_s,
            max_verify_tokens=self.max_verify_tokens,
            max_batch_tokens=self.max_batch_tokens,
            draft_policy=self.draft_policy,
            drafter_cost=self.drafter_cost,
            threads=self.threads,
            threads_alone=self.threads_alone,
            max_drafting_load=self.max_drafting_load,
            request_ttl_s=self.request_ttl_s,
            done_retention_s=self.done_retention_s,
        )


class GatewaySettings(TransportSettings):
    model_config = SettingsConfigDict(env_prefix="PIPESPEC_GATEWAY_", extra="forbid")

    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None
    registry_port: int = Field(5550, ge=0, le=65535, description="PULL: heartbeats and outputs")
    client_port: int = Field(5551, ge=0, le=65535, description="ROUTER: ZMQ client API")
    tokenizer: str = Field(description="the target's tokenizer: HF id, directory or .gguf")
    served_model_name: str = "pipespec"
    num_levels: int = Field(ge=1, description="levels a route must have")
    default_max_tokens: int = Field(
        128, ge=1, description="when a request gives none (capped by the context)"
    )
    max_tokens_limit: int = Field(1 << 16, ge=1, description="larger max_tokens are refused")
    max_requests_in_flight: int = Field(128, ge=1, description="requests decoding at once")
    max_queued_requests: int = Field(
        256, ge=0, description="requests waiting for a slot; more get 429"
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="a queued request gets 429 after waiting this long"
    )
    max_request_bytes: int = Field(1 << 20, ge=1, description="larger HTTP bodies get 413")
    chat_template: str | None = Field(
        None, description="Jinja chat template, or a file holding one; overrides the tokenizer's"
    )
    heartbeat_timeout_s: float = Field(3.0, gt=0)
    route_wait_s: float = Field(
        5.0,
        ge=0,
        description="a request finding a level without a live replica waits this long for one "
        "(a late heartbeat, a restart) before 503",
    )
    resend_after_s: float = Field(5.0, gt=0, description="re-sync a request silent for this long")
    request_timeout_s: float = Field(600.0, gt=0)
    target_lost_timeout_s: float = Field(
        30.0, gt=0, description="fail a request whose target has had no live replica this long"
    )
    min_heartbeat_interval_s: float = Field(
        0.02, ge=0, description="a replica's heartbeats closer than this are refused and counted"
    )
