"""`stillhouse demo --quick` end to end through the real CLI: the file tree, the manifests, and a re-run that
skips every stage. One more run happens in a process with no network at all."""

import json
import os
import shutil
import subprocess
import sys

import pytest

STAGE_DIRS = {"check": "check", "prep": "data", "adapt": "teacher", "label": "labels", "train": "student",
              "eval": "eval", "redteam": "redteam", "export": "export", "serve": "serve", "monitor": "monitor"}


def demo(ws, *prefix):
    env = {**os.environ, "STILLHOUSE_QUIET": "1"}
    return subprocess.run([*prefix, sys.executable, "-m", "stillhouse", "-w", str(ws), "demo", "--quick"],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    ws = tmp_path_factory.mktemp("demo") / "ws"
    p = demo(ws)
    assert p.returncode == 0, p.stderr[-3000:]
    return ws, p


def manifests(ws):
    return {stage: json.loads((ws / d / "manifest.json").read_text()) for stage, d in STAGE_DIRS.items()}


def test_file_tree_and_manifests(quick_demo):
    ws, p = quick_demo
    for rel in ["stillhouse.yaml", "sources/intents.jsonl", "data/train.jsonl", "data/val.jsonl", "data/test.jsonl",
                "data/review.csv", "data/report.json", "labels/shard-00000.safetensors", "labels/shard-00000.done",
                "labels/sequences.jsonl", "teacher/best/config.json", "student/init/model.safetensors",
                "student/best/model.safetensors", "student/final/config.json", "student/metrics.jsonl",
                "eval/results.json", "eval/report.html", "redteam/report.json", "export/model/model.safetensors",
                "export/model/README.md", "export/SHA256SUMS", "export/gguf/student-f16.gguf", "export/gguf/student-q8_0.gguf", "serve/requests.jsonl", "monitor/report.json",
                "demo-summary.json"]:
        assert (ws / rel).exists(), rel
    assert list((ws / "data" / "quarantine").iterdir()), "the corrupt demo PDF should be quarantined"
    ms = manifests(ws)
    for stage, m in ms.items():
        assert m["stage"] == stage
        assert m["config"]["project"] == "stillhouse-demo-quick"  # the resolved config is saved
        assert m["outputs"], stage
        assert all(len(h) == 64 for h in m["outputs"].values())
        assert "torch" in m["versions"]
    # top-32 soft labels: ~98 bytes per token plus a per-record index (the demo's records are short), far below
    # fp16 log-probs + int32 ids (192)
    assert ms["label"]["topk"] == 32 and ms["label"]["metrics"]["bytes_per_token"] < 150
    assert ms["train"]["labels_fingerprint"] == ms["label"]["fingerprint"]
    # the summary table reached the user
    assert "teacher vs student" in p.stderr + p.stdout


def test_second_run_skips_every_stage(quick_demo):
    ws, _ = quick_demo
    before = manifests(ws)
    p = demo(ws)
    assert p.returncode == 0, p.stderr[-3000:]
    after = manifests(ws)
    for stage in STAGE_DIRS:
        assert after[stage]["finished_at"] == before[stage]["finished_at"], f"{stage} re-ran"
        assert after[stage]["fingerprint"] == before[stage]["fingerprint"]


def test_changed_config_reruns_from_that_stage(quick_demo, tmp_path):
    ws0, _ = quick_demo
    ws = tmp_path / "ws"
    shutil.copytree(ws0, ws)
    before = manifests(ws)
    env = {**os.environ, "STILLHOUSE_QUIET": "1"}
    p = subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), "run", "--set", "train.steps=4"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    after = {s: json.loads((ws / STAGE_DIRS[s] / "manifest.json").read_text()) for s in ("label", "train", "eval")}
    assert after["label"]["finished_at"] == before["label"]["finished_at"]  # upstream untouched
    assert after["train"]["fingerprint"] != before["train"]["fingerprint"]
    assert after["train"]["metrics"]["steps"] == 4
    assert after["eval"]["fingerprint"] != before["eval"]["fingerprint"]  # its input (student/best) changed


def test_train_refuses_labels_made_for_another_tokenizer(quick_demo, tmp_path, tokenizer):
    """Soft labels are token ids of the teacher's vocabulary: a student with another tokenizer must not use them."""
    from stillhouse.models import save_pretrained, tiny_random_model

    ws0, _ = quick_demo
    ws = tmp_path / "ws"
    shutil.copytree(ws0, ws)
    shutil.rmtree(ws / "student")
    other = tokenizer.__class__.from_pretrained(str(ws / "teacher" / "best"))
    other.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    save_pretrained(tiny_random_model(other, num_layers=2), other, ws / "other-student")
    env = {**os.environ, "STILLHOUSE_QUIET": "1"}
    p = subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), "train", "--set", "student.model=other-student"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "labels/ were made with another tokenizer" in p.stderr and "Traceback" not in p.stderr


def test_demo_with_no_network_at_all(tmp_path):
    if shutil.which("unshare") is None or shutil.which("ip") is None or subprocess.run(["unshare", "-rn", "true"]).returncode != 0:
        pytest.skip("unshare -n is not permitted here: cannot build a process without network")
    # the serve smoke test talks to itself over loopback, which starts down in a new namespace
    wrapper = ["unshare", "-rn", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh"]
    p = demo(tmp_path / "offline", *wrapper)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "offline" / "export" / "model" / "model.safetensors").exists()
