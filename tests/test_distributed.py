"""`stillhouse train` on several processes as users launch it: `accelerate launch --config_file
examples/accelerate/{ddp,fsdp}.yaml -m stillhouse train`, here 2 CPU processes over gloo. Each equals 1 process with
twice the gradient accumulation; FSDP really shards the parameters, writes plain transformers folders, and a
killed FSDP run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import fresh_copy, safetensors_weights

ROOT = Path(__file__).resolve().parents[1]
# One thread per process everywhere. accelerate gives each of the 2 launched processes 1 thread on this machine, and
# CPU kernels (the embedding backward, reductions) sum in an order that depends on the thread count; Adam then turns
# a last-bit difference in a gradient that is ~0 into a step of +-lr. With equal thread counts DDP is bit-identical
# to one process (with 2 threads against 1, ~1,000 of 3.2M weights differed by up to 2 lr).
ENV = {**os.environ, "STILLHOUSE_QUIET": "1", "OMP_NUM_THREADS": "1"}
# 6 steps of 2 micro-batches of 2 sequences, a checkpoint every 2 steps (the resume test kills after the first)
COMMON = ["train", "--set", "train.steps=6", "--set", "train.eval_every_steps=2", "--set", "train.batch_size=2"]


def _cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


def _launch(kind: str, ws: Path, *args: str) -> list[str]:
    """The command a user runs with our example config, on 2 processes and a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
            str(ROOT / "examples" / "accelerate" / f"{kind}.yaml"), "--num_processes", "2", "--main_process_port",
            str(port), "-m", "stillhouse", "-w", str(ws), *args]


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, quick_demo_ws) -> tuple[Path, Path]:
    """The shared quick-demo workspace (data, labels, teacher) and, in a copy, 1 process with grad_accum_steps=2."""
    root = tmp_path_factory.mktemp("distributed")
    demo = quick_demo_ws
    one = fresh_copy(demo, root / "one")
    r = _cli(one, *COMMON, "--set", "train.grad_accum_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    return demo, one


def _assert_same_run(got: Path, want: Path, weight_tol: float) -> None:
    """Same logged rows (rel 1e-4), same validation samples, same checkpoints within weight_tol."""
    g_rows, w_rows = _rows(got / "metrics.jsonl"), _rows(want / "metrics.jsonl")
    assert [r["step"] for r in g_rows] == [r["step"] for r in w_rows]  # written once, by the main process
    for g, w in zip(g_rows, w_rows):
        for k in ("loss", "ce", "kd", "val_loss", "val_score"):
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (k, g, w)
    assert _rows(got / "samples.jsonl") == _rows(want / "samples.jsonl")
    init = safetensors_weights(want / "init")
    for folder in ("step-000004", "step-000006", "best", "final"):
        a, b = safetensors_weights(got / folder), safetensors_weights(want / folder)
        assert a.keys() == b.keys() == init.keys(), folder
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= weight_tol, folder
    trained = safetensors_weights(want / "final")
    assert max(float((trained[k] - init[k]).abs().max()) for k in init) > 1e-4  # it trained: the match is not trivial


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_twice_the_accumulation(reference, tmp_path, kind):
    """Each process takes every other micro-batch of the same order, and the gradients are averaged (DDP) or
    reduce-scattered (FSDP): the run equals 1 process with grad_accum_steps=2."""
    demo, one = reference
    ws = fresh_copy(demo, tmp_path / kind)
    r = subprocess.run(_launch(kind, ws, *COMMON), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lr = max(row["lr"] for row in _rows(one / "student" / "metrics.jsonl") if "lr" in row)
    # DDP: bit-identical (see ENV). FSDP: bit-identical too with train.max_grad_norm=0 (measured), but the clipping
    # norm is summed over shards in another order, so the clip factor differs in its last bits; the trajectories
    # then part only where a gradient is ~0 and Adam's step is +-lr on rounding noise (measured after 6 steps: 815
    # of 3.2M weights off by > 1e-6, the largest by 1.4e-4 = 0.45 lr). So: no weight off by more than 2 lr, and
    # under 0.1% of them by more than 1e-6
    _assert_same_run(ws / "student", one / "student", 1e-6 if kind == "ddp" else 2 * lr)
    if kind == "fsdp":
        a, b = safetensors_weights(ws / "student" / "final"), safetensors_weights(one / "student" / "final")
        off = sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) for k in a)
        assert off < 1e-3 * sum(v.numel() for v in a.values()), off

    metrics = json.loads((ws / "student" / "manifest.json").read_text())["metrics"]
    single = json.loads((one / "student" / "manifest.json").read_text())["metrics"]
    assert (metrics["processes"], metrics["distributed"]) == (2, "FSDP" if kind == "fsdp" else "MULTI_CPU")
    full = single["parameter_bytes_main_process"]
    assert full == 4 * single["parameters"]  # fp32, all of them in one process
    if kind == "ddp":
        assert metrics["parameter_bytes_main_process"] == full
        return
    # each process holds half of every sharded parameter (+ padding of odd first dimensions)
    assert 0.5 * full <= metrics["parameter_bytes_main_process"] < 0.51 * full
    # what FSDP gathered onto the main process is an ordinary folder: it loads without stillhouse or accelerate,
    # ties the embeddings as its config says, and computes what the 1-process model computes
    import torch
    from transformers import AutoModelForCausalLM

    got, want = (AutoModelForCausalLM.from_pretrained(d / "student" / "final") for d in (ws, one))
    assert got.config.tie_word_embeddings == (got.get_input_embeddings().weight is got.get_output_embeddings().weight)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, want(ids).logits, atol=1e-3)


@pytest.mark.parametrize("env, named", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "accelerate's DeepSpeed is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1 is not supported"),
])
def test_deepspeed_and_fsdp1_are_refused_in_one_line(reference, tmp_path, env, named):
    """What `accelerate launch` with those configs sets; refused before accelerate would run them as DDP on a
    machine without GPUs (or fail in its own words)."""
    ws = fresh_copy(reference[0], tmp_path / "ws")
    r = subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), "train", "--set", "train.steps=2"],
                       env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert msg.startswith("stillhouse: train student: ") and named in msg and "examples/accelerate/fsdp.yaml" in msg
    assert not (ws / "student" / "final").exists()


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_to_the_same_result(reference, tmp_path):
    """Kill the whole FSDP launch right after its first checkpoint (step 2 of 6), launch again: it continues from
    student/resume/ (full model and optimizer state, gathered by parameter name) and ends where 1 process does."""
    demo, one = reference
    ws = fresh_copy(demo, tmp_path / "fsdp")
    proc = subprocess.Popen(_launch("fsdp", ws, *COMMON), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state, deadline = ws / "student" / "resume" / "state.json", time.time() + 240
    while not state.exists():
        assert proc.poll() is None, "train ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    # the launcher and both workers (torchrun starts them in sessions of their own), as after a power cut
    for victim in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        victim.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ws / "student" / "final").exists()
    r = subprocess.run(_launch("fsdp", ws, *COMMON), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step" in r.stdout + r.stderr
    lr = max(row["lr"] for row in _rows(one / "student" / "metrics.jsonl") if "lr" in row)
    _assert_same_run(ws / "student", one / "student", 2 * lr)
