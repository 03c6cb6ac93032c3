"""Loading a tokenizer the way users name models, and the fingerprint that checks that all
levels share one vocabulary (token ids mean the same thing everywhere)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def load_tokenizer(source: str):
    """Tokenizer from an HF model id, a local directory, or a ``.gguf`` file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise OSError(
            f"cannot load tokenizer {source!r} offline ({exc}). Give a local directory or .gguf "
            "file, or prepare the embedded models: python -m common.model_store prepare"
        ) from None


def fingerprint(tokenizer) -> str:
    """sha256 over the token -> id mapping (added tokens included). Equal fingerprints mean
    token ids can be passed between models unchanged."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
