"""Air-gapped install kit and checksum manifests (`stillhouse bundle`, `make bundle`).

`write_kit(out)` runs on a machine that can reach a package index (or a mirror) and writes a folder that installs
stillhouse on a machine that cannot:

    out/wheels/*.whl          stillhouse itself + every dependency, pinned, for the target Python and platform
    out/requirements.txt      name==version of every wheel: `pip install --no-index` installs exactly these
    out/requirements-nodeps.txt  packages installed without their dependencies (the demo teacher's wheel)
    out/install.sh            verifies SHA256SUMS, creates a venv, installs with --no-index
    out/bundle.json           target, command, package list
    out/SHA256SUMS            sha256 of every file above (`sha256sum -c SHA256SUMS` format)

The requirement set is the project's own: the pinned dependencies in pyproject.toml (read from the stillhouse wheel
built for the kit, plus extras) and constraints.txt for everything they pull in. Model folders get the same SHA256SUMS
(`write_checksums`, `verify_checksums`), so a copy on an internal mirror can be verified file by file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stillhouse.errors import StillhouseError
from stillhouse.workspace import atomic_write_json, atomic_write_text, sha256_file

SUMS = "SHA256SUMS"


# ------------------------------------------------------------------------------------------------ checksums


def write_checksums(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Write FOLDER/SHA256SUMS over every file below it (relative paths, sorted); returns {path: sha256}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StillhouseError(f"{folder}: not a folder; give the model (or kit) folder to write {SUMS} for")
    sums = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != SUMS and rel not in skip and not p.name.startswith(f".{SUMS}."):
            sums[rel] = sha256_file(p)
    atomic_write_text(folder / SUMS, "".join(f"{h}  {name}\n" for name, h in sums.items()))
    return sums


def verify_checksums(folder: Path) -> list[str]:
    """Problems found comparing FOLDER with its SHA256SUMS: changed, missing and unlisted files (empty: all good)."""
    folder = Path(folder)
    path = folder / SUMS
    if not path.is_file():
        raise StillhouseError(f"{path} not found; write it with `stillhouse bundle --models {folder}` on the source machine")
    listed = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise StillhouseError(f"{path} line {n}: expected '<sha256>  <file>', got {line[:80]!r}")
        listed[name] = digest
    problems = []
    for name, digest in listed.items():
        f = folder / name
        if not f.is_file():
            problems.append(f"missing: {name}")
        elif sha256_file(f) != digest:
            problems.append(f"changed: {name} (sha256 differs from {SUMS})")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != SUMS and rel not in listed:
            problems.append(f"not listed: {rel}")
    return problems


# ----------------------------------------------------------------------------------------------------- kit


def project_root() -> Path | None:
    """The source checkout stillhouse runs from (it has pyproject.toml and constraints.txt), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def wheel_requirements(wheel: Path, extras: list[str]) -> list[str]:
    """The pinned dependencies a built wheel declares (Requires-Dist: pyproject.toml's), with these extras. Read
    from the wheel that goes into the kit, not from the installed metadata, which goes stale when pyproject.toml
    changes after an editable install."""
    import zipfile
    from email.parser import HeaderParser

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(z.read(meta).decode("utf-8"))
    out = []
    for line in headers.get_all("Requires-Dist") or []:
        r = Requirement(line)
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras):
            out.append(f"{r.name}{r.specifier}")
    return out


def _run_pip(args: list[str], what: str) -> None:
    p = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        last = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()][-3:]
        raise StillhouseError(f"bundle: pip could not {what}: {' / '.join(last)}")


def _pins(wheels: list[Path]) -> list[str]:
    """name==version of each wheel file (names canonical: python-dateutil, not python_dateutil)."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    pins = []
    for w in wheels:
        try:
            name, version, _, _ = parse_wheel_filename(w.name)
        except InvalidWheelFilename:
            raise StillhouseError(f"{w}: not a wheel file name pip understands") from None
        pins.append(f"{name}=={version}")
    return pins


def _build_project_wheel(root: Path, wheels_dir: Path) -> Path:
    """stillhouse's wheel, built from a clean copy of the checkout: setuptools reuses an in-tree build/ folder, whose
    stale files (a module deleted since) would end up in the wheel. No build isolation: building must not fetch
    setuptools from an index."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stillhouse-wheel-") as tmp:
        src = Path(tmp) / "src"
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                shutil.copy2(root / name, Path(tmp) / name)
        shutil.copytree(root / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        _run_pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp + "/dist", tmp], "build the stillhouse wheel")
        (built,) = Path(tmp, "dist").glob("*.whl")
        return Path(shutil.copy2(built, wheels_dir / built.name))


def write_kit(out: Path, requirements: list[str] | None = None, *, extras: list[str] | None = None,
              constraints: Path | None = None, no_deps: list[str] | None = None,
              python_version: str | None = None, platform: str | None = None) -> dict:
    """Download every wheel the requirement set needs into OUT/wheels and write the kit around it (module doc).

    `requirements` None: stillhouse itself, built from this checkout, and what its wheel requires (+ `extras`),
    constrained by the checkout's constraints.txt; a list: exactly these (and their dependencies). `no_deps`: more
    packages taken without their dependencies. `python_version` ("3.11") and `platform` ("manylinux2014_x86_64"):
    the target machine, default this one. Returns bundle.json's content."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "bundle.json").exists():
        raise StillhouseError(f"{out} exists and is not a stillhouse bundle; choose an empty folder (nothing was changed)")
    wheels_dir = out / "wheels"
    shutil.rmtree(wheels_dir, ignore_errors=True)  # ours (bundle.json says so): a fresh, exact set
    wheels_dir.mkdir(parents=True)
    if requirements is None:
        root = project_root()
        if root is None:
            raise StillhouseError("bundle: stillhouse's source checkout (pyproject.toml) was not found; run it from a "
                                  "checkout (`make bundle`)")
        requirements = wheel_requirements(_build_project_wheel(root, wheels_dir), extras or [])
        if constraints is None and (root / "constraints.txt").is_file():
            constraints = root / "constraints.txt"
    project = _pins(sorted(wheels_dir.glob("*.whl")))

    # the target: wheels only, so nothing needs a compiler on the offline machine; another target needs them anyway
    target = ["--only-binary=:all:"]
    if python_version:
        target += ["--python-version", python_version, "--implementation", "cp"]
    if platform:
        target += ["--platform", platform]
    req_file = out / ".requirements.in"
    atomic_write_text(req_file, "".join(r + "\n" for r in requirements))
    try:
        if requirements:
            _run_pip(["download", "-q", "-d", str(wheels_dir), "-r", str(req_file), *target,
                      *(["-c", str(constraints)] if constraints else [])], "download the requirements")
        with_deps = set(_pins(sorted(wheels_dir.glob("*.whl"))))
        for spec in no_deps or []:
            _run_pip(["download", "-q", "--no-deps", "-d", str(wheels_dir), spec, *target], f"download {spec}")
    finally:
        req_file.unlink(missing_ok=True)
    all_pins = _pins(sorted(wheels_dir.glob("*.whl")))
    nodeps_pins = sorted(set(all_pins) - with_deps)
    pins = sorted(with_deps, key=str.lower)
    atomic_write_text(out / "requirements.txt", "".join(p + "\n" for p in pins))
    atomic_write_text(out / "requirements-nodeps.txt", "".join(p + "\n" for p in nodeps_pins))
    atomic_write_text(out / "install.sh", INSTALL_SH)
    (out / "install.sh").chmod(0o755)
    info = {
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "target": {"python_version": python_version or "%d.%d" % sys.version_info[:2],
                   "platform": platform or "this machine's"},
        "project": project, "requested": requirements, "constraints": str(constraints) if constraints else None,
        "packages": pins, "packages_without_dependencies": nodeps_pins,
        "wheels": len(all_pins),
        "bytes": sum(w.stat().st_size for w in wheels_dir.glob("*.whl")),
        "install": "sh install.sh [VENV_DIR]   (or: pip install --no-index --find-links wheels -r requirements.txt)",
    }
    atomic_write_json(out / "bundle.json", info)
    write_checksums(out)
    return info


# The kit's installer: plain sh, so the offline machine needs nothing but Python 3 and coreutils.
INSTALL_SH = """#!/bin/sh
# Install stillhouse from this folder with no network: checks every file, then pip with --no-index.
# Usage: sh install.sh [VENV_DIR]   (default .venv; PYTHON=python3.11 to choose the interpreter)
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-.venv}
(cd "$KIT" && sha256sum --quiet -c SHA256SUMS)
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install --no-index --find-links "$KIT/wheels" -r "$KIT/requirements.txt"
if [ -s "$KIT/requirements-nodeps.txt" ]; then
  "$VENV/bin/python" -m pip install --no-index --no-deps --find-links "$KIT/wheels" -r "$KIT/requirements-nodeps.txt"
fi
echo "installed into $VENV"
"""
