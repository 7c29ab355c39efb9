"""Test fixtures. Every test runs with non-loopback sockets blocked: a test that reaches the network fails loudly."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

import stillhouse  # noqa: F401  (forces the offline environment variables first)

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


class NetworkBlocked(RuntimeError):
    pass


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self, address):
    if not _is_loopback(address):
        raise NetworkBlocked(f"test tried to reach the network: {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_loopback(address):
        raise NetworkBlocked(f"test tried to reach the network: {address!r}")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost") and not _is_loopback((host if isinstance(host, str) else host.decode(), 0)):
        raise NetworkBlocked(f"test tried to resolve a network host: {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def block_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (49,152 tokens, chat template), read from the GGUF asset (~3 s, once)."""
    from stillhouse.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("asset:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny random Llama (4 layers, hidden 64) over the real tokenizer: loads like any HF folder."""
    from stillhouse.models import save_pretrained, tiny_random_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    save_pretrained(tiny_random_model(tokenizer, num_layers=4, hidden_size=64, seed=0), tokenizer, out)
    return out


@pytest.fixture(scope="session")
def quick_demo_ws(tmp_path_factory) -> Path:
    """One `demo --quick` workspace (~20-40 s) for every test file that needs data/, labels/ and a teacher:
    read it, or copy it first (`fresh_copy`) -- never change it in place."""
    import os
    import subprocess
    import sys

    ws = tmp_path_factory.mktemp("quick-demo") / "demo"
    r = subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), "demo", "--quick"],
                       env={**os.environ, "STILLHOUSE_QUIET": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return ws


def fresh_copy(demo_ws: Path, dest: Path) -> Path:
    """A copy of a demo workspace without student/, ready for `train`."""
    import shutil

    shutil.copytree(demo_ws, dest, ignore=shutil.ignore_patterns("student"))
    return dest


def safetensors_weights(folder: Path) -> dict:
    """Every tensor of a model folder's *.safetensors files, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
