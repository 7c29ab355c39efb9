"""The workspace: one folder per stage, each with a `manifest.json` written last and atomically.

A manifest holds the resolved config, the sha256 of every input and output, package versions, timings and
metrics. A stage whose fingerprint (its own parameters + the hashes of its inputs) matches the manifest on disk,
with outputs unchanged, is skipped. Stages talk to each other only through these folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from stillhouse.errors import StillhouseError

STAGES = ["check", "prep", "adapt", "label", "train", "eval", "redteam", "export", "serve", "monitor"]
STAGE_DIRS = {"prep": "data", "adapt": "teacher", "label": "labels", "train": "student"}  # stage -> folder, where the name differs
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_HASH_CACHE = ".stillhouse/hash-cache.json"
# Never part of a stage's outputs: scratch, resume state and markers that exist only while a stage runs.
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, we want what a plain open() would give
_EPHEMERAL = {MANIFEST, "manifest.previous.json", "resume", ".tmp"}


def stage_dir(workspace: Path, stage: str) -> Path:
    return Path(workspace) / STAGE_DIRS.get(stage, stage)


# ----------------------------------------------------------------------------------------------- atomic I/O


@contextlib.contextmanager
def atomic_writer(path: Path):
    """A binary file to write `path` through: a temp file in the same folder, fsynced and renamed over `path`
    when the block ends without an error (removed if it raises): readers never see half a file, and a file too
    large to build in memory can be written piece by piece."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json_or_none(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable (a marker from an older or killed run:
    the caller redoes that work)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise StillhouseError(f"{path} line {n}: not valid JSON ({e.msg}); fix or remove that line") from None
    return out


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object a line, written atomically; `rows` may be a generator (written as it yields)."""
    with atomic_writer(path) as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


# -------------------------------------------------------------------------------------------------- hashing


class HashCache:
    """sha256 of files, cached by (size, mtime_ns) so re-hashing model weights on every command is free."""

    def __init__(self, workspace: Path):
        self.path = Path(workspace) / _HASH_CACHE
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def sha256(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        key = str(path)
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            try:
                atomic_write_json(self.path, self.entries)
            except OSError:
                pass  # a read-only cache only costs time
            self.dirty = False


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if p.is_file() and not any(part in _EPHEMERAL or part.startswith(".") for part in rel):
            files.append(p)
    return files


def hash_tree(paths: list[Path], cache: HashCache, base: Path | None = None) -> dict[str, str]:
    """{relative path: sha256} of every file in these files/folders."""
    out = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise StillhouseError(f"{root} not found; run the stage that makes it first (see `stillhouse status`)")
        for f in _files_under(root):
            try:
                key = str(f.relative_to(base)) if base else str(f)
            except ValueError:
                key = str(f)
            out[key] = cache.sha256(f)
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ manifests


def load_manifest(workspace: Path, stage: str) -> dict | None:
    path = stage_dir(workspace, stage) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a torn manifest cannot happen (atomic write); an edited one means "not done"


def require_manifest(workspace: Path, stage: str, needed_by: str) -> dict:
    m = load_manifest(workspace, stage)
    if m is None:
        raise StillhouseError(
            f"{needed_by} needs the output of `stillhouse {stage}`, which has not run in {workspace}; run `stillhouse -w {workspace} {stage}` first"
        )
    return m


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("stillhouse", "torch", "transformers", "peft", "safetensors", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


class StageRun:
    """One run of one stage: decides whether it can be skipped, then writes its manifest last.

        run = StageRun(cfg, "label", inputs=[data_dir, teacher_dir], params={...})
        if run.previous:            # unchanged inputs and params: nothing to do
            return run.previous
        ...write into run.dir...
        return run.finish(metrics={...}, teacher={...})
    """

    def __init__(self, cfg, stage: str, inputs: list[Path], params: dict):
        self.cfg = cfg
        self.stage = stage
        self.workspace = Path(cfg.workspace)
        self.dir = stage_dir(self.workspace, stage)
        self.started = time.time()
        self.cache = HashCache(self.workspace)
        self.inputs = hash_tree(inputs, self.cache, base=self.workspace)
        self.params = params
        self.fingerprint = digest({"stage": stage, "format": FORMAT_VERSION, "params": params, "inputs": self.inputs})
        self.cache.save()
        self.previous = self._up_to_date()
        if self.previous is None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                probe = self.dir / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise StillhouseError(f"cannot write to {self.dir} ({e.strerror}); choose a writable workspace with -w") from None
            # an old manifest must not vouch for outputs we are about to change
            old = self.dir / MANIFEST
            if old.exists():
                old.rename(self.dir / "manifest.previous.json")

    def _up_to_date(self) -> dict | None:
        m = load_manifest(self.workspace, self.stage)
        if not m or m.get("fingerprint") != self.fingerprint:
            return None
        try:
            now = hash_tree([self.dir], self.cache, base=self.workspace)
        except StillhouseError:
            return None
        self.cache.save()
        return m if now == m.get("outputs") else None

    def finish(self, metrics: dict | None = None, **extra: Any) -> dict:
        prev = self.dir / "manifest.previous.json"
        prev.unlink(missing_ok=True)
        outputs = hash_tree([self.dir], self.cache, base=self.workspace)
        self.cache.save()
        manifest = {
            "stage": self.stage,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - self.started, 2),
            "config": self.cfg.model_dump(mode="json"),
            "params": self.params,
            "inputs": self.inputs,
            "outputs": outputs,
            "metrics": metrics or {},
            "versions": _versions(),
            "command": " ".join(sys.argv),
            **extra,
        }
        atomic_write_json(self.dir / MANIFEST, manifest)
        return manifest
