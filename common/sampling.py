"""Sampling that every level of the hierarchy reproduces: Gumbel-max with counter-based noise.

Every level picks its token at generated position ``t`` as

    argmax_v ( process(logits / T)_v + g(seed, t, v) )

where ``process`` masks with top-k, top-p and min-p in transformers' processor order
(temperature first), and ``g`` is standard Gumbel noise that is a pure function of the request's
seed, the position and the token id (:func:`gumbel`): integer hashing, so the same bits come out
on every machine and device, and keyed by token id, not by vocabulary size. Gumbel-max samples
exactly from ``softmax(process(logits / T))`` (Daliri, Musco, Suresh 2024, arXiv 2408.07978), so
the target's text is its own seeded sample whatever the drafts; a draft is accepted iff it equals
the verifier's own coupled token (``common.decoding.accept_greedy`` unchanged). Greedy is T = 0.

Worked example: two tokens with logits 1 and 0 at T = 1 are picked in proportion
e/(1+e) = 0.73 to 0.27; the pick at a position depends only on (seed, position):

>>> import torch
>>> p = SamplingParams(temperature=1.0, seed=42)
>>> logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
>>> choose(logits, p, [0, 0]) == choose(logits[:1], p, [0]) * 2   # same position, same pick
True
>>> picks = [choose(logits[:1], SamplingParams(1.0, seed=s), [0])[0] for s in range(2000)]
>>> abs(picks.count(0) / 2000 - 0.731) < 0.03      # e / (1 + e) = 0.731
True

The chooser is a function of a logits row (or an ``[n, V]`` tensor) and positions only, so a
batched runner can call it on any rows it holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.protocol import TokenLogprob

if TYPE_CHECKING:  # torch is imported where it is used: an n-gram stage never loads it
    import torch

M32 = 0xFFFFFFFF
INT64 = 2**63
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
LOGPROB_FLOOR = -9999.0  # what vLLM reports for -inf (JSON has no infinity)


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling fields; ``temperature`` 0 is greedy (the other fields then do nothing).
    ``top_k`` 0 and ``top_p`` 1 and ``min_p`` 0 mean "no mask"."""

    temperature: float = 0.0
    seed: int = 0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        if not 0 <= self.temperature <= 100 or math.isnan(self.temperature):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -INT64 <= self.seed < INT64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


# -- counter-based noise ------------------------------------------------------------------------


def _mix(x):
    """A 32-bit integer hash (Wellons' "hash prospector" 0x21f0aaad / 0x735a2d97). Works on
    Python ints and on int64 tensors holding values < 2**32: both multipliers are below 2**31,
    so no product overflows int64 and every device gives the same bits.

    >>> import torch
    >>> _mix(0), _mix(1), _mix(torch.tensor([0, 1])).tolist()
    (0, 2261973619, [0, 2261973619])
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def _key(seed: int, position: int) -> int:
    """32 bits that name one (seed, position); the seed's two halves and the position each go
    through the hash, so nearby seeds and positions give unrelated keys."""
    s = seed & (2**64 - 1)
    k = _mix((s & M32) ^ 0x9E3779B9)
    k = _mix(k ^ (s >> 32))
    return _mix(k ^ (position & M32) ^ 0x85EBCA6B)


_TOKEN_HASH: dict[tuple[int, str], torch.Tensor] = {}
_TOKEN_HASH_NP: dict = {}  # vocabulary size -> numpy uint64 array


def _token_hash(vocab: int, device: torch.device) -> torch.Tensor:
    """``_mix(v + 0x5bd1e995)`` for every token id below ``vocab``, computed once per size."""
    import torch

    cached = _TOKEN_HASH.get((vocab, str(device)))
    if cached is None:
        cached = _mix(torch.arange(vocab, dtype=torch.int64, device=device) + 0x5BD1E995)
        _TOKEN_HASH[(vocab, str(device))] = cached
    return cached


def noise_bits(seed: int, position: int, token_ids: torch.Tensor) -> torch.Tensor:
    """The 32 random bits (int64 in [0, 2**32)) of each token id at (seed, position).

    >>> import torch

    >>> noise_bits(7, 3, torch.tensor([0, 5, 9])).tolist() == [
    ...     noise_bits(7, 3, torch.tensor([t])).item() for t in (0, 5, 9)]
    True
    """
    import torch

    h = _mix(token_ids.to(torch.int64) + 0x5BD1E995)
    return _mix(h ^ _key(seed, position))


def gumbel(seed: int, position: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float64) for ``token_ids`` at (seed, position): -log(-log(u)) with
    u = (bits + 0.5) / 2**32, strictly inside (0, 1).

    >>> import torch

    >>> g = gumbel(1, 0, torch.arange(4))
    >>> g.dtype, bool((gumbel(1, 0, torch.tensor([2])) == g[2]).all())
    (torch.float64, True)
    """
    import torch

    u = (noise_bits(seed, position, token_ids).to(torch.float64) + 0.5) * 2.0**-32
    return -torch.log(-torch.log(u))


# -- processors (transformers' order: temperature, top-k, top-p, min-p) --------------------------


def process(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """``logits / T`` in float32 with masked tokens at -inf, exactly as transformers'
    Temperature, TopK, TopP and MinP warpers (``min_tokens_to_keep`` 1), in that order.

    >>> import torch

    >>> process(torch.tensor([[2.0, 1.0, 0.0, -5.0]]), SamplingParams(0.5, top_k=2)).tolist()
    [[4.0, 2.0, -inf, -inf]]
    >>> process(torch.tensor([[3.0, 2.0, 0.0]]), SamplingParams(1.0, top_p=0.5)).tolist()
    [[3.0, -inf, -inf]]
    """
    import torch

    scores = logits.float() / p.temperature
    if p.top_k:
        k = min(p.top_k, scores.size(-1))
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -math.inf)
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - p.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    if p.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < p.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


def choose(logits: torch.Tensor, p: SamplingParams, positions: Sequence[int]) -> list[int]:
    """The token for each row of ``logits`` ([n, V] or [V]); row i is at generated position
    ``positions[i]``. Greedy: argmax. Otherwise Gumbel-max over the processed scores; noise is
    drawn only for tokens the masks keep, so top-p / top-k make it cheaper.

    >>> import torch
    >>> rows = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
    >>> choose(rows, GREEDY, [0, 1])
    [1, 0]
    >>> choose(rows, SamplingParams(1.0, seed=3, top_k=1), [0, 1])   # top_k 1 is greedy too
    [1, 0]
    """
    import torch

    rows = logits.reshape(-1, logits.shape[-1])
    if len(positions) != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows but {len(positions)} positions")
    if p.greedy:
        return rows.argmax(dim=-1).tolist()
    scores = process(rows, p)
    if rows.device.type == "cpu":  # numpy: the same integer bits, far less per-call overhead
        return [_pick_numpy(row, p.seed, t) for row, t in zip(scores.numpy(), positions)]
    hashes = _token_hash(rows.shape[-1], rows.device)
    out = []
    for row, position in zip(scores, positions):
        kept = torch.isfinite(row).nonzero().squeeze(-1)
        bits = _mix(hashes[kept] ^ _key(p.seed, position))
        g = -torch.log(-torch.log((bits.to(torch.float64) + 0.5) * 2.0**-32))
        out.append(int(kept[torch.argmax(row[kept].double() + g)]))
    return out


def _pick_numpy(row, seed: int, position: int) -> int:
    """Gumbel-max over one processed row (a float32 numpy array), noise only where kept."""
    import numpy as np

    kept = np.flatnonzero(np.isfinite(row))
    hashes = _TOKEN_HASH_NP.get(row.shape[0])
    if hashes is None:
        hashes = _TOKEN_HASH_NP[row.shape[0]] = _mix(
            np.arange(row.shape[0], dtype=np.uint64) + 0x5BD1E995
        )
    bits = _mix(hashes[kept] ^ np.uint64(_key(seed, position)))
    g = -np.log(-np.log((bits.astype(np.float64) + 0.5) * 2.0**-32))
    return int(kept[np.argmax(row[kept].astype(np.float64) + g)])


# -- log-probabilities ------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """The model's raw log-probability of each row's token, and of the ``top`` most likely
    tokens (before temperature and masks: what vLLM returns by default).

    >>> import torch

    >>> lp = token_logprobs(torch.log(torch.tensor([[0.5, 0.25, 0.25]])), [1], top=1)
    >>> round(lp[0].logprob, 4), lp[0].top_ids, [round(x, 4) for x in lp[0].top_logprobs]
    (-1.3863, [0], [-0.6931])
    """
    import torch

    rows = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    chosen = rows.gather(-1, torch.tensor(list(tokens), device=rows.device)[:, None])[:, 0]
    top_values, top_ids = (
        torch.topk(rows, min(top, rows.shape[-1]), dim=-1) if top else (None, None)
    )
    out = []
    for i, token in enumerate(tokens):
        out.append(
            TokenLogprob(
                token=int(token),
                logprob=max(float(chosen[i]), LOGPROB_FLOOR),
                top_ids=top_ids[i].tolist() if top else [],
                top_logprobs=[max(float(v), LOGPROB_FLOOR) for v in top_values[i]] if top else [],
            )
        )
    return out


@dataclass
class Chooser:
    """What a session's forward pass does with its logits ``[n, V]`` (one row per fed token):
    row ``j`` is at generated position ``first_position + j``. With ``top_logprobs`` set,
    ``logprobs`` holds, after the call, one entry per row."""

    params: SamplingParams
    first_position: int
    top_logprobs: int | None = None
    logprobs: list[TokenLogprob] | None = None

    def __call__(self, logits: torch.Tensor) -> list[int | None]:
        positions = range(self.first_position, self.first_position + logits.shape[0])
        tokens = choose(logits, self.params, positions)
        if self.top_logprobs is not None:
            self.logprobs = token_logprobs(logits, tokens, self.top_logprobs)
        return list(tokens)


def derive_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of an ``n > 1`` request (choice 0 keeps ``seed``), in the
    signed 64-bit range.

    >>> derive_seed(5, 0), derive_seed(5, 1) != derive_seed(5, 2), -2**63 <= derive_seed(5, 1) < 2**63
    (5, True, True)
    """
    if index == 0:
        return seed
    lo = _key(seed, index)
    hi = _key(seed ^ 0x632BE59BD9B4E019, index)
    value = (hi << 32) | lo
    return value - 2**64 if value >= INT64 else value
