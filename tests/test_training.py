"""The training loop through the real CLI on a quick-demo workspace (tiny random models over the real tokenizer):
resume after a kill equals an uninterrupted run, mismatched labels are refused, a diverging loss stops cleanly,
validation samples and tokens/s are logged, and the opt-in low-memory allocator setting."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stillhouse.config import load_config
from stillhouse.errors import StillhouseError

ENV = {**os.environ, "STILLHOUSE_QUIET": "1"}
TRAIN = ["train", "--set", "train.steps=24", "--set", "train.eval_every_steps=4"]


def _cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory) -> Path:
    """A quick-demo workspace (~20 s): data/, labels/ from a tiny adapted teacher, and a trained student/."""
    ws = tmp_path_factory.mktemp("training") / "demo"
    r = _cli(ws, "demo", "--quick")
    assert r.returncode == 0, r.stderr[-2000:]
    return ws


def _fresh(demo_ws: Path, dest: Path) -> Path:
    """A copy of the demo workspace without student/, ready for `train`."""
    shutil.copytree(demo_ws, dest, ignore=shutil.ignore_patterns("student"))
    return dest


def _rows(path: Path, drop=("tokens_per_s",)) -> list[dict]:
    """Rows of a jsonl file without the wall-clock fields (those differ between any two runs)."""
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_resume_after_kill_equals_an_uninterrupted_run(demo_ws, tmp_path):
    whole, killed = _fresh(demo_ws, tmp_path / "whole"), _fresh(demo_ws, tmp_path / "killed")
    r = _cli(whole, *TRAIN)
    assert r.returncode == 0, r.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "-m", "stillhouse", "-w", str(killed), *TRAIN], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "student" / "resume" / "state.json"
    deadline = time.time() + 240
    while not state.exists():
        assert proc.poll() is None, "train ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no clean-up at all, as after a power cut or the OOM killer
    proc.wait()
    assert not (killed / "student" / "final").exists(), "the kill came too late to test anything"
    rows_at_kill = (killed / "student" / "metrics.jsonl").read_text().count("\n")

    r = _cli(killed, *TRAIN)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed_at = int(re.search(r"resuming at step (\d+)", r.stderr)[1])
    assert 4 <= resumed_at < 24 and resumed_at % 4 == 0
    # the same curves (rows logged after the checkpoint were dropped, not duplicated), samples and weights
    got, want = _rows(killed / "student" / "metrics.jsonl"), _rows(whole / "student" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] and len(want) == 24 + 6
    assert got == want
    assert rows_at_kill >= resumed_at  # the killed run had logged past its checkpoint: truncation was needed
    assert _rows(killed / "student" / "samples.jsonl") == _rows(whole / "student" / "samples.jsonl")
    for folder in ("final", "best"):
        a, b = _weights(killed / "student" / folder), _weights(whole / "student" / folder)
        assert a.keys() == b.keys() and a
        assert all((a[k] == b[k]).all() for k in a), f"{folder}/ weights differ after resume"
    m1 = json.loads((killed / "student" / "manifest.json").read_text())["metrics"]
    m2 = json.loads((whole / "student" / "manifest.json").read_text())["metrics"]
    assert (m1["best_step"], m1["best_val_score"], m1["steps"]) == (m2["best_step"], m2["best_val_score"], m2["steps"])
    assert not (killed / "student" / "resume").exists() and not (killed / "student" / ".resume.tmp").exists()

    # monitoring: tokens/s on every train row, 3 readable validation samples per evaluation
    train_rows = [json.loads(line) for line in (whole / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 for r in train_rows if "loss" in r)
    samples = _rows(whole / "student" / "samples.jsonl", drop=())
    assert [s["step"] for s in samples] == [s for s in (4, 8, 12, 16, 20, 24) for _ in range(3)]
    assert all(s["prompt"] and s["reference"] and isinstance(s["output"], str) for s in samples)
    assert "assistant" in samples[0]["prompt"] and samples[0]["reference"] not in samples[0]["prompt"]


def test_a_diverging_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(demo_ws, tmp_path):
    ws = _fresh(demo_ws, tmp_path / "ws")
    r = _cli(ws, "train", "--set", "train.steps=40", "--set", "train.eval_every_steps=5",
             "--set", "train.learning_rate=1e6")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()[-1]  # one line, after the stage's own progress lines
    assert msg.startswith("stillhouse: train student: ")
    step = int(re.search(r"NaN/inf at step (\d+)", msg)[1])
    assert "lower the learning rate" in msg and "--set train.learning_rate=100000" in msg
    kept = json.loads((ws / "student" / "resume" / "state.json").read_text())["step"]
    assert 0 < kept < step and f"last good checkpoint (step {kept})" in msg
    assert (ws / "student" / f"step-{kept:06d}" / "config.json").exists()
    assert not (ws / "student" / "final").exists() and not (ws / "student" / "manifest.json").exists()
    # with a sane learning rate the same command continues from that checkpoint and finishes
    r = _cli(ws, "train", "--set", "train.steps=12", "--set", "train.eval_every_steps=5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming at step {kept}" in r.stderr and "learning_rate" in r.stderr  # says what changed
    assert (ws / "student" / "final" / "config.json").exists()


@pytest.mark.parametrize("override,named", [
    ("label.temperature=1.0", "label.temperature (labels: 2.0, config: 1.0)"),
    ("label.topk=8", "label.topk (labels: 32, config: 8)"),
    ("teacher.model=models/another-teacher", "teacher.model (labels: 'models/tiny-teacher'"),
])
def test_labels_made_for_another_setup_are_refused(demo_ws, tmp_path, override, named):
    from stillhouse.stages import train

    ws = _fresh(demo_ws, tmp_path / "ws")
    with pytest.raises(StillhouseError) as err:
        train.run(load_config(ws, [override]))
    msg = str(err.value)
    assert named in msg and "stillhouse -w" in msg and " label`" in msg
    assert f"--set {override.split('=')[0]}=" in msg  # how to accept the labels as they are
    assert not (ws / "student" / "final").exists()


def test_labels_of_another_tokenizer_or_template_are_refused(demo_ws, tokenizer):
    import copy

    from stillhouse.stages.train import check_labels
    from stillhouse.workspace import load_manifest

    cfg, labels = load_config(demo_ws), load_manifest(demo_ws, "label")
    check_labels(cfg, labels, tokenizer)  # the real manifest and the student's tokenizer: accepted
    other = copy.deepcopy(labels)
    other["teacher"]["chat_template"] = "{{ messages }}"
    with pytest.raises(StillhouseError, match="chat template"):
        check_labels(cfg, other, tokenizer)
    other["teacher"]["tokenizer"] = "0" * 64
    with pytest.raises(StillhouseError, match="tokenizer .*label.mode=sequence"):
        check_labels(cfg, other, tokenizer)
    other["mode"] = "sequence"  # teacher-written text: the student tokenizes it itself, any tokenizer will do
    check_labels(cfg, other, tokenizer)


def test_an_empty_training_split_is_a_clear_error(demo_ws, tmp_path):
    ws = _fresh(demo_ws, tmp_path / "ws")
    (ws / "labels" / "sequences.jsonl").write_text("")
    r = _cli(ws, "train")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_low_memory_allocator_applies_unless_the_user_set_one():
    code = "from stillhouse.training import use_low_memory_allocator as u; print(u())"
    env = {k: v for k, v in ENV.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # glibc here: mallopt accepted
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_MMAP_THRESHOLD_": "131072"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the user's own setting wins
