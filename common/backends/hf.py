"""Transformers causal LMs run by transformers itself, one request at a time: the reference the
batched runners are tested against (``HFBackend``: each request's own ``DynamicCache``, fed in
turn by each pass, :mod:`common.backends.history`), and the loader every transformers runner uses.
Stages serve "hf" and "early-exit" models with :class:`common.backends.batched_hf.HFBatchedBackend`.

``model`` may be a prepared model name (see :mod:`common.model_catalog`), a local directory saved with
``save_pretrained``, a ``.gguf`` file, or a hub id already in the local HF cache: nothing is ever
downloaded. Tests load their tiny random models through exactly this code.

An early-exit view with ``early_exit_layers=N`` keeps only the model's first N decoder layers (its
config then says N layers, so the KV cache has N layers too), followed by the model's own final
norm and lm_head, untrained.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub when first imported

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel  # noqa: E402

from common import model_catalog  # noqa: E402
from common.backends.history import HistoryBackend  # noqa: E402
from common.sampling import Chooser  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_causal_lm(
    model: str, dtype: str = "float32", layers: int | None = None
) -> PreTrainedModel:
    """Load ``model`` (see ``model_catalog.locate``) offline on the CPU in eval mode;
    ``layers``: keep only the first N decoder layers."""
    source, gguf_file = model_catalog.locate(model)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, local_files_only=True, dtype=DTYPES[dtype]
        ).eval()
    except OSError as e:
        if Path(source).exists():
            raise
        raise FileNotFoundError(
            f"{model!r} is not a local path, a prepared model ({', '.join(model_catalog.MODELS)}) "
            f"nor in the local HF cache, and model hubs are not reachable. Prepare one with "
            f"`{model_catalog.PREPARE_COMMAND} smollm2|qwen|all` and pass its name or directory."
        ) from e
    if layers is not None:
        _keep_first_layers(lm, layers)
    return lm


def _keep_first_layers(lm: PreTrainedModel, n: int) -> None:
    """Drop every decoder layer after the first ``n``; the config (and so the KV cache) follows.

    The whole model is loaded first: asking ``from_pretrained`` for fewer layers would work too,
    but logs every later layer's weights as UNEXPECTED, and early exits keep most layers anyway.
    """
    decoder, config = lm.base_model, lm.config.get_text_config(decoder=True)
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise ValueError(
            f"early exit: {type(lm).__name__} has no `{lm.base_model_prefix}.layers` list"
        )
    if not 1 <= n <= len(decoder.layers):
        raise ValueError(f"early_exit_layers={n}: the model has {len(decoder.layers)} layers")
    decoder.layers = decoder.layers[:n]
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:n]


def _ids(value) -> tuple[int, ...]:
    """``None`` / int / list of ints -> tuple of ints."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def eos_token_ids(lm: PreTrainedModel) -> tuple[int, ...]:
    """The ids that end a generation: the generation config's, else the model config's."""
    generation = lm.generation_config
    config = lm.config.get_text_config(decoder=True)
    return _ids(generation and generation.eos_token_id) or _ids(config.eos_token_id)


def model_label(model: str, early_exit_layers: int | None) -> str:
    """What logs and /health call a loaded model."""
    return model if early_exit_layers is None else f"{model} (first {early_exit_layers} layers)"


class HFSession:
    """One request's KV cache in transformers' own model."""

    def __init__(self, model: PreTrainedModel, device: torch.device, context: list[int]):
        self._model = model
        self._device = device
        self._cache = DynamicCache(config=model.config)
        if context:
            self._run(context, logits_to_keep=1)  # prefill: no predictions needed

    @property
    def length(self) -> int:
        return self._cache.get_seq_length()

    @torch.inference_mode()
    def _run(self, tokens: list[int], logits_to_keep: int) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long, device=self._device)
        out = self._model(
            input_ids=ids, cache=self._cache, use_cache=True, logits_to_keep=logits_to_keep
        )
        return out.logits

    def forward(self, tokens: list[int], chooser: Chooser | None = None) -> list[int | None]:
        if not tokens:
            return []
        logits = self._run(tokens, logits_to_keep=0)[0]
        return logits.argmax(dim=-1).tolist() if chooser is None else chooser(logits)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions.

        transformers 5.24's ``DynamicCache.crop(k)`` takes minus the number of positions to drop
        (a positive ``k`` raises): 13 held, keep 11 -> ``crop(-2)``; ``crop(0)`` does nothing.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"crop({length}) on a session of length {self.length}")
        self._cache.crop(length - self.length)

    def close(self) -> None:
        self._cache.reset()


class HFBackend(HistoryBackend):
    """A transformers causal LM; with ``early_exit_layers`` only its first N layers (kind "early-exit").

    ``threads`` sets torch's intra-op threads for the whole process (one stage per process).
    ``tokenizer`` is only read for :attr:`tokenizer_fingerprint` (default: ``model``'s own).
    """

    can_verify = True

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = None,
        early_exit_layers: int | None = None,
        kv_pool_tokens: int | None = None,
    ):
        super().__init__(kv_pool_tokens)
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = load_causal_lm(model, dtype, early_exit_layers).to(self.device)
        self.kind = "hf" if early_exit_layers is None else "early-exit"
        self.name = model_label(model, early_exit_layers)
        config = self.model.config.get_text_config(decoder=True)
        self.max_context = getattr(config, "max_position_embeddings", None) or 0
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.eos_token_ids = eos_token_ids(self.model)
        self.tokenizer_source = tokenizer or model

    def new_session(self, context: list[int]) -> HFSession:
        """A request's cache with ``context`` prefilled, outside any pass (what tests compare)."""
        return HFSession(self.model, self.device, context)

    def new_state(self) -> HFSession:
        return self.new_session([])
