"""Air-gapped install kit and checksum manifests: SHA256SUMS written and verified (changed, missing, unlisted files),
the CLI's exit codes, and a real kit (a small pure-Python package) installed into a fresh venv by its own install.sh
with pip's --no-index, with no pip configuration and, where the kernel allows, no network at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from stillhouse.bundle import SUMS, verify_checksums, write_checksums, write_kit
from stillhouse.errors import StillhouseError


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillhouse", *args], capture_output=True, text=True)


def test_model_checksums_catch_changed_missing_and_extra_files(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    sums = write_checksums(model)
    assert "model.safetensors" in sums and "config.json" in sums and SUMS not in sums
    lines = (model / SUMS).read_text().splitlines()
    assert len(lines) == len(sums) and all(len(ln.split("  ")[0]) == 64 for ln in lines)
    assert verify_checksums(model) == []
    # the same format as coreutils: `sha256sum -c` agrees
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--quiet", "-c", SUMS], cwd=model).returncode == 0

    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    (model / "config.json").unlink()
    (model / "extra.bin").write_bytes(b"x")
    problems = verify_checksums(model)
    assert "changed: model.safetensors (sha256 differs from SHA256SUMS)" in problems
    assert "missing: config.json" in problems and "not listed: extra.bin" in problems and len(problems) == 3


def test_checksum_errors_are_one_line(tmp_path):
    with pytest.raises(StillhouseError, match="SHA256SUMS not found; write it with `stillhouse bundle --models"):
        verify_checksums(tmp_path)
    (tmp_path / SUMS).write_text("0" * 64 + "  a.txt\nnot a checksum line\n")
    with pytest.raises(StillhouseError, match="SHA256SUMS line 2: expected '<sha256>  <file>'"):
        verify_checksums(tmp_path)
    with pytest.raises(StillhouseError, match="not a folder"):
        write_checksums(tmp_path / "nope")


def test_cli_models_and_verify(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    p = _cli("bundle", "--models", str(model))
    assert p.returncode == 0, p.stderr
    assert _cli("bundle", "--verify", str(model)).returncode == 0
    (model / "config.json").write_text("{}")
    bad = _cli("bundle", "--verify", str(model))
    assert bad.returncode == 1 and "changed: config.json" in bad.stderr and "Traceback" not in bad.stderr
    both = _cli("bundle", str(tmp_path / "kit"), "--models", str(model))
    assert both.returncode == 2 and "exactly one of" in both.stderr


def _offline_env() -> dict:
    """No pip configuration or PIP_* variables (this machine's point at a local mirror and a wheel folder), so the
    kit's own wheels are the only place pip can find anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PYTHON"] = sys.executable
    return env


def test_the_kit_requirements_are_pyprojects(tmp_path):
    import tomllib

    from packaging.requirements import Requirement

    from stillhouse.bundle import _build_project_wheel, project_root, wheel_requirements

    root = project_root()
    wheel = _build_project_wheel(root, tmp_path)
    assert wheel.name.startswith("stillhouse-") and not (root / "build").exists()  # built from a clean copy
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    norm = lambda reqs: sorted(str(Requirement(r)).lower().replace("_", "-") for r in reqs)  # noqa: E731
    assert norm(wheel_requirements(wheel, [])) == norm(project["dependencies"])
    assert norm(wheel_requirements(wheel, ["test"])) == norm(project["dependencies"] + project["optional-dependencies"]["test"])
    assert all("==" in r for r in wheel_requirements(wheel, []))  # pinned


def test_kit_installs_offline_into_a_fresh_venv(tmp_path):
    kit = tmp_path / "kit"
    # a small pure-Python package with a dependency (six) from the package index here, and one without its deps
    info = write_kit(kit, ["python-dateutil==2.9.0.post0"], no_deps=["iniconfig==2.3.1"])
    pins = (kit / "requirements.txt").read_text().split()
    assert "python-dateutil==2.9.0.post0" in pins and any(p.startswith("six==") for p in pins)
    assert (kit / "requirements-nodeps.txt").read_text().split() == ["iniconfig==2.3.1"]
    assert info["wheels"] == len(list((kit / "wheels").glob("*.whl"))) == 3
    assert json.loads((kit / "bundle.json").read_text())["packages"] == pins
    assert verify_checksums(kit) == []

    venv = tmp_path / "fresh"
    cmd = ["sh", str(kit / "install.sh"), str(venv)]
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-n", *cmd]  # a network namespace with no interfaces up: nothing can be reached
    p = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env())
    assert p.returncode == 0, p.stdout + p.stderr
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import dateutil, six, iniconfig; print(dateutil.__version__)"], capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == "2.9.0.post0", probe.stderr

    # a tampered kit refuses to install
    (kit / "wheels" / "extra.whl").write_bytes(b"")
    wheel = next((kit / "wheels").glob("six-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10])
    p = subprocess.run(["sh", str(kit / "install.sh"), str(tmp_path / "other")], capture_output=True, text=True,
                       env=_offline_env())
    assert p.returncode != 0 and not (tmp_path / "other").exists()


def test_a_missing_package_is_one_clear_line(tmp_path):
    with pytest.raises(StillhouseError, match="bundle: pip could not download the requirements"):
        write_kit(tmp_path / "kit", ["no-such-package-stillhouse-test==0.0.1"])
