"""Loading a tokenizer the way users name models, and the fingerprint that checks that all
levels share one vocabulary (token ids mean the same thing everywhere)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from common import model_catalog


def load_tokenizer(source: str):
    """Tokenizer from a prepared model name, a local directory, a ``.gguf`` file, or an HF id
    already in the local cache (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    where, gguf_file = model_catalog.locate_tokenizer(source)
    try:
        return AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
    except OSError as exc:
        raise OSError(
            f"cannot load tokenizer {source!r} offline ({exc}). Give a local directory or .gguf "
            f"file, or prepare the embedded models: {model_catalog.PREPARE_COMMAND} smollm2"
        ) from None


def fingerprint(tokenizer) -> str:
    """sha256 over the token -> id mapping (added tokens included). Equal fingerprints mean
    token ids can be passed between models unchanged."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def eos_token_ids(tokenizer, source: str) -> list[int]:
    """The tokenizer's EOS id plus those of ``generation_config.json`` beside it, if any."""
    ids = {tokenizer.eos_token_id} - {None}
    config = Path(source) / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else {eos} - {None}
    return sorted(ids)
