"""The training loop through the real CLI on a quick-demo workspace (tiny random models over the real tokenizer):
resume after a kill equals an uninterrupted run, mismatched labels are refused, a diverging loss stops cleanly,
validation samples and tokens/s are logged, and the opt-in low-memory allocator setting."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fresh_copy, safetensors_weights

from stillhouse.config import load_config
from stillhouse.errors import StillhouseError

ENV = {**os.environ, "STILLHOUSE_QUIET": "1"}
TRAIN = ["train", "--set", "train.steps=24", "--set", "train.eval_every_steps=4"]


def _cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def demo_ws(quick_demo_ws) -> Path:
    """The shared quick-demo workspace: data/, labels/ from a tiny adapted teacher, and a trained student/."""
    return quick_demo_ws


def _rows(path: Path, drop=("tokens_per_s",)) -> list[dict]:
    """Rows of a jsonl file without the wall-clock fields (those differ between any two runs)."""
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def test_resume_after_kill_equals_an_uninterrupted_run(demo_ws, tmp_path):
    whole, killed = fresh_copy(demo_ws, tmp_path / "whole"), fresh_copy(demo_ws, tmp_path / "killed")
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
        a, b = safetensors_weights(killed / "student" / folder), safetensors_weights(whole / "student" / folder)
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
    ws = fresh_copy(demo_ws, tmp_path / "ws")
    # a sane run, killed after its first checkpoint; then the same run with a learning rate that overflows the
    # weights at once (where a moderate one like 1e6 diverges depends on the optimizer kernel's rounding: the fused
    # AdamW may instead collapse the logits to uniform, which is finite)
    sane = ("train", "--set", "train.steps=40", "--set", "train.eval_every_steps=5")
    proc = subprocess.Popen([sys.executable, "-m", "stillhouse", "-w", str(ws), *sane], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, deadline = ws / "student" / "resume" / "state.json", time.time() + 240
    while not state.exists():
        assert proc.poll() is None, "train ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = _cli(ws, *sane, "--set", "train.learning_rate=1e30")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()[-1]  # one line, after the stage's own progress lines
    assert msg.startswith("stillhouse: train student: ")
    step = int(re.search(r"NaN/inf at step (\d+)", msg)[1])
    assert "lower the learning rate" in msg and "--set train.learning_rate=1e+29" in msg
    kept = json.loads((ws / "student" / "resume" / "state.json").read_text())["step"]
    assert 0 < kept < step and f"last good checkpoint (step {kept})" in msg
    assert (ws / "student" / f"step-{kept:06d}" / "config.json").exists()
    assert not (ws / "student" / "final").exists() and not (ws / "student" / "manifest.json").exists()
    # with a sane learning rate the same command continues from that checkpoint and finishes
    r = _cli(ws, "train", "--set", "train.steps=12", "--set", "train.eval_every_steps=5")
    assert r.returncode == 0, r.stderr[-2000:]
    # says what changed since that checkpoint (the sane run's; the diverged run wrote none)
    assert f"resuming at step {kept}" in r.stderr and "changed since: steps" in r.stderr
    assert (ws / "student" / "final" / "config.json").exists()


@pytest.mark.parametrize("override,named", [
    ("label.temperature=1.0", "label.temperature (labels: 2.0, config: 1.0)"),
    ("label.topk=8", "label.topk (labels: 32, config: 8)"),
    ("teacher.model=models/another-teacher", "teacher.model (labels: 'models/tiny-teacher'"),
])
def test_labels_made_for_another_setup_are_refused(demo_ws, tmp_path, override, named):
    from stillhouse.stages import train

    ws = fresh_copy(demo_ws, tmp_path / "ws")
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
    ws = fresh_copy(demo_ws, tmp_path / "ws")
    (ws / "labels" / "sequences.jsonl").write_text("")
    r = _cli(ws, "train")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_a_changed_student_config_derives_the_student_again(demo_ws, tmp_path):
    """student/init of a 2-layer student must not be trained when the config now asks for 3 layers; the old
    architecture's resume state goes with it."""
    from stillhouse.config import load_config
    from stillhouse.stages.train import _student

    ws = fresh_copy(demo_ws, tmp_path / "ws")
    init = ws / "student" / "init"
    model, _, lineage = _student(load_config(ws, ["student.derive_layers=2"]), init)
    assert model.config.num_hidden_layers == 2 and lineage["student_config"]["derive_layers"] == 2
    (ws / "student" / "resume").mkdir()
    (ws / "student" / "resume" / "state.json").write_text("{}")
    again, _, _ = _student(load_config(ws, ["student.derive_layers=2"]), init)  # unchanged: init/ is reused
    assert again.config.num_hidden_layers == 2 and (ws / "student" / "resume").exists()
    model, _, lineage = _student(load_config(ws, ["student.derive_layers=3"]), init)
    assert model.config.num_hidden_layers == 3 and lineage["student_config"]["derive_layers"] == 3
    assert json.loads((init / "config.json").read_text())["num_hidden_layers"] == 3
    assert not (ws / "student" / "resume").exists()


def test_low_memory_allocator_applies_unless_the_user_set_one():
    code = "from stillhouse.training import use_low_memory_allocator as u; print(u())"
    env = {k: v for k, v in ENV.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # glibc here: mallopt accepted
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_MMAP_THRESHOLD_": "131072"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the user's own setting wins


# ------------------------------------------------------------- online teacher, alignment, assistant chain, memory


def _tiny_batch(tokenizer):
    from stillhouse.training import Example, collate

    texts = [("Turn on the kitchen lights", " HassTurnOn"), ("What is the weather like in Oslo today?", " weather")]
    examples = []
    for i, (prompt, answer) in enumerate(texts):
        p_ids, a_ids = tokenizer.encode(prompt), tokenizer.encode(answer)
        examples.append(Example(str(i), p_ids + a_ids, len(p_ids), "classification"))
    return collate(examples, tokenizer.pad_token_id)


def test_online_teacher_loss_and_alignment_equal_a_float64_reference(tokenizer):
    """The loop's online path (teacher forward under no_grad, dense KD over all V tokens, hidden-state alignment
    through a learned projection) equals the definitions computed from both models' full float64 logits."""
    import torch
    import torch.nn.functional as F

    from stillhouse.models import tiny_random_model
    from stillhouse.training import FitParams, _alignment_projections, _student_loss_module, _teacher_signal

    teacher = tiny_random_model(tokenizer, num_layers=4, hidden_size=64, seed=1).double()
    student = tiny_random_model(tokenizer, num_layers=2, hidden_size=32, seed=2).double()
    batch = _tiny_batch(tokenizer)
    p = FitParams(steps=1, batch_size=2, learning_rate=1e-3, alpha=0.5, temperature=2.0, precision="fp32",
                  loss_chunk_tokens=5, align_layers={0: 1, 1: 3}, align_loss="mse", align_weight=0.3)
    projections = _alignment_projections(student, teacher, p).double()
    out = _student_loss_module(student, projections, p)(batch, *_teacher_signal(teacher, batch, p))

    with torch.no_grad():
        s_out = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        t_out = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        s_logits, t_logits = s_out.logits[batch.rows, batch.cols], t_out.logits[batch.rows, batch.cols]  # (N, V)
        ce = F.cross_entropy(s_logits, batch.targets)
        log_p, log_s = (x.div(2.0).log_softmax(-1) for x in (t_logits, s_logits))
        kd = (log_p.exp() * (log_p - log_s)).sum(-1).mean()  # forward KL at T = 2 over all V tokens
        real = batch.attention_mask.bool()
        align = sum(F.mse_loss(projections[str(s)](s_out.hidden_states[s + 1][real]), t_out.hidden_states[t + 1][real])
                    for s, t in ((0, 1), (1, 3))) / 2
    assert kd > 1e-3 and align > 1e-3  # two random models: nothing here is trivially 0
    torch.testing.assert_close(out["ce"].double(), ce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["kd"].double(), kd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["align"].double(), align, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].double(), 0.5 * ce + 0.5 * 4.0 * kd + 0.3 * align, rtol=1e-4, atol=1e-6)
    out["loss"].backward()  # the projection learns; the teacher gets nothing
    assert projections["0"].weight.grad.abs().sum() > 0
    assert all(q.grad is None for q in teacher.parameters())


def test_learning_rate_schedules():
    from stillhouse.training import FitParams, lr_at

    def curve(schedule):
        p = FitParams(steps=20, batch_size=1, learning_rate=1.0, warmup_steps=4, lr_schedule=schedule, final_lr_ratio=0.1)
        return [lr_at(s, p) for s in range(20)]

    cos, lin, const = curve("cosine"), curve("linear"), curve("constant")
    assert cos[:4] == lin[:4] == const[:4] == [0.25, 0.5, 0.75, 1.0]  # the same linear warm-up
    assert cos[4] == lin[4] == 1.0 and const[4:] == [1.0] * 16
    assert lin[-1] == pytest.approx(0.1 + 0.9 / 16) and cos[-1] < lin[-1]  # both head for 10% of the peak
    assert lin[12] == pytest.approx(0.55)  # halfway through the decay: halfway down, linearly
    assert all(a >= b for a, b in zip(lin[4:], lin[5:])) and all(a >= b for a, b in zip(cos[4:], cos[5:]))


def test_online_teacher_with_hidden_alignment_through_the_stage(demo_ws, tmp_path):
    from stillhouse.stages import train
    from stillhouse.workspace import load_manifest

    ws = fresh_copy(demo_ws, tmp_path / "ws")
    sets = ["train.teacher_signal=online", "train.hidden_alignment.enabled=true", "train.steps=4",
            "train.eval_every_steps=2", "train.lr_schedule=linear", "train.weight_decay=0.01"]
    train.run(load_config(ws, sets))
    m = load_manifest(ws, "train")
    assert m["teacher_signal"] == "online"
    assert m["hidden_alignment"] == {"0": 1, "1": 3}  # uniform: 2 student layers <- 4 teacher layers
    rows = [json.loads(line) for line in (ws / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["kd"] > 0 and r["align"] > 0 and r["ce"] > 0 for r in steps)
    assert sum(1 for r in rows if "val_score" in r) == 2
    assert json.loads((ws / "student" / "final" / "stillhouse.json").read_text())["teacher_signal"] == "online"
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert not (ws / "student" / "tensorboard").exists()
    else:
        assert list((ws / "student" / "tensorboard").glob("events.out.tfevents.*"))

    # alignment without the teacher's hidden states, and a layer map outside the models: clear errors
    ws2 = fresh_copy(demo_ws, tmp_path / "ws2")
    with pytest.raises(StillhouseError, match="teacher_signal=online"):
        train.run(load_config(ws2, ["train.hidden_alignment.enabled=true"]))
    with pytest.raises(StillhouseError, match=r"layer_map: 0: 7 is out of range.*teacher layers 0..3"):
        train.run(load_config(ws2, sets + ["train.hidden_alignment.layer_map={0: 7}"]))


def test_teacher_assistant_chain(demo_ws, tmp_path):
    from stillhouse.stages import train
    from stillhouse.workspace import load_manifest

    ws = fresh_copy(demo_ws, tmp_path / "ws")
    sets = ["train.assistant.derive_layers=3", "train.assistant.steps=3", "train.steps=3", "train.eval_every_steps=3"]
    train.run(load_config(ws, sets))
    m = load_manifest(ws, "train")
    chain = m["chain"]
    assert chain["teacher"] == "models/tiny-teacher" and chain["assistant_layers"] == 3
    assert chain["assistant"].endswith("student/assistant/best") and m["teacher_signal"] == "online"
    assistant = json.loads((ws / "student" / "assistant" / "best" / "config.json").read_text())
    assert assistant["num_hidden_layers"] == 3
    student = json.loads((ws / "student" / "final" / "config.json").read_text())
    assert student["num_hidden_layers"] == 2
    # phase 1 learned from the stored top-k labels, phase 2 from the assistant online: both have a KD term
    for folder in ("student/assistant", "student"):
        rows = [json.loads(line) for line in (ws / folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "kd" in r] == [1, 2, 3] and all(r["kd"] > 0 for r in rows if "kd" in r)
    assert json.loads((ws / "student" / "best" / "stillhouse.json").read_text())["chain"] == chain


def test_running_out_of_memory_is_one_line_with_the_plans_suggestions(demo_ws, tmp_path):
    """A real allocation failure: the address space is capped a little above what the process holds, and one
    micro-batch of 512 sequences with loss chunks of 8192 tokens needs far more (a (8192, 49152) fp32 block is 1.6 GB)."""
    ws = fresh_copy(demo_ws, tmp_path / "ws")
    code = (
        "import resource, sys, torch, transformers, accelerate, stillhouse.cli, stillhouse.stages.train\n"
        "from transformers import LlamaForCausalLM\n"
        "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 1_200_000_000, resource.RLIM_INFINITY))\n"
        f"sys.argv = ['stillhouse', '-w', {str(ws)!r}, 'train', '--set', 'train.batch_size=512',\n"
        "            '--set', 'train.loss_chunk_tokens=8192', '--set', 'train.steps=2']\n"
        "stillhouse.cli.main()\n")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert msg.startswith("stillhouse: train student: out of memory at step 1")
    assert "--set train.batch_size=256 --set train.grad_accum_steps=2" in msg  # the same effective batch
    assert "--set train.lora.enabled=true" in msg and "--set train.loss_chunk_tokens=2048" in msg
    assert "`stillhouse check` planned" in msg  # the demo ran check: its plan is quoted
    assert not (ws / "student" / "final").exists()
