"""`monitor --redistill` end to end on the quick demo (tiny random models): a refused candidate, a promoted one,
the guard that keeps `run` from retraining over it, and rollback."""

from __future__ import annotations

import json

import pytest

from stillhouse import redistill
from stillhouse.config import load_config
from stillhouse.demo_data import INTENT_SYSTEM_PROMPT
from stillhouse.errors import GateError, StillhouseError
from stillhouse.workspace import load_manifest, sha256_file

JAPANESE = ["台所の照明をつけてください。それから寝室のエアコンを二十二度に設定してください。",
            "昨日の注文がまだ届いていません。配送状況を確認して、到着予定日を教えていただけますか。",
            "来週の会議資料を田中さんに送ってから、経理部の山本さんに請求書の確認をお願いします。"]


def test_regressions_absolute_for_scores_relative_for_perplexity():
    results = {"tasks": {
        "classification": {"metric": "accuracy", "higher_is_better": True, "models": {"student": {"score": 0.80}, "student-init": {"score": 0.85}}},
        "qa": {"metric": "rouge_l_f1", "higher_is_better": True, "models": {"student": {"score": 0.30}, "student-init": {"score": 0.31}}},
        "text": {"metric": "perplexity", "higher_is_better": False, "models": {"student": {"score": 11.0}, "student-init": {"score": 10.0}}},
    }}
    found = redistill.regressions(results, 0.02)
    assert len(found) == 2 and found[0].startswith("classification: accuracy 0.8 ") and found[1].startswith("text: perplexity 11 ")
    assert redistill.regressions(results, 0.1) == []  # 0.05 below and 10% above are within 0.1


def _log_row(text: str) -> dict:
    return {"time": "2026-01-01T00:00:00+0000", "endpoint": "/v1/chat/completions", "status": 200, "output": "HassTurnOn",
            "messages": [{"role": "system", "content": INTENT_SYSTEM_PROMPT}, {"role": "user", "content": text}]}


@pytest.mark.slow  # 85-125 s on 2 shared cores: the quick demo, then label, train, 2 evals, redteam and 2 exports
def test_redistill_refuse_promote_rollback(tmp_path):
    from stillhouse.demo import run_demo
    from stillhouse.pipeline import run_all
    from stillhouse.stages import monitor

    ws = tmp_path / "demo"
    run_demo(ws, quick=True)
    weights = lambda d: sha256_file(ws / d / "best" / "model.safetensors")  # noqa: E731
    original = weights("student")
    original_eval = load_manifest(ws, "eval")["fingerprint"]
    rows = [_log_row(JAPANESE[i % 3] + ("" if i < 3 else f" {i}番")) for i in range(20)]
    rows += [_log_row(t) for t in ("turn on the kitchen light", "what's the weather like", "pause the music")]
    (ws / "serve" / "requests.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    # 1. drift, but the eval gate cannot pass: refused, nothing moves
    cfg = load_config(ws, ["eval.min_retention=1000"])
    assert monitor.run(cfg)["verdict"] == "drift"
    drifted = len((ws / "monitor" / "redistill.jsonl").read_text().splitlines())
    with pytest.raises(GateError, match="candidate refused"):
        redistill.run(cfg)
    report = json.loads((ws / "monitor" / "redistill-report.json").read_text())
    assert report["outcome"] == "refused" and "eval gate" in report["reasons"][0]
    assert report["new_records"]["production_unlabeled"] == drifted and report["new_records"]["added_to_train"] == drifted
    assert weights("student") == original and not (ws / "student-prev-1").exists()
    cand = ws / "redistill" / "candidate"
    assert sha256_file(cand / "student" / "init" / "model.safetensors") == original  # continued from the current student
    n_train = len((ws / "data" / "train.jsonl").read_text().splitlines())
    assert len((cand / "data" / "train.jsonl").read_text().splitlines()) == n_train + drifted
    assert (cand / "data" / "test.jsonl").read_bytes() == (ws / "data" / "test.jsonl").read_bytes()  # a paired comparison

    # 2. the gates pass: promoted; the previous student kept; the export now holds the new student
    cfg = load_config(ws, ["monitor.redistill_max_regression=1"])
    report = redistill.run(cfg)
    assert report["outcome"] == "promoted" and report["previous"] == "student-prev-1" and report["exported"]
    assert report["redteam_verdict"] != "fail" and set(report["before"]) == set(report["after"]) >= {"classification"}
    assert weights("student-prev-1") == original and weights("student") != original
    assert sha256_file(ws / "student" / "init" / "model.safetensors") == original
    assert load_manifest(ws, "train")["promoted"]["previous"] == "student-prev-1"
    assert load_manifest(ws, "export")["inputs"]["student/best/model.safetensors"] == weights("student")
    assert (ws / "student-prev-1" / "eval" / "manifest.json").exists()
    with pytest.raises(StillhouseError, match="--rollback"):
        run_all(cfg)  # would retrain student/ from labels/ without the new records

    # 3. rollback: the original student, eval and export are back; the promoted one is kept
    promoted = weights("student")
    restored = redistill.rollback(cfg)
    assert restored == {"restored": "student-prev-1", "kept": "student-rolledback-1", "exported": True}
    assert weights("student") == original and weights("student-rolledback-1") == promoted
    assert load_manifest(ws, "eval")["fingerprint"] == original_eval
    assert load_manifest(ws, "export")["inputs"]["student/best/model.safetensors"] == original
    with pytest.raises(StillhouseError, match="no student-prev-N"):
        redistill.rollback(cfg)


def test_cli_rollback_and_redistill_without_a_student_are_clean_errors(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "stillhouse.yaml").write_text("project: empty\n")
    env = {**os.environ, "STILLHOUSE_QUIET": "1"}
    for args, needle in ((["monitor", "--rollback"], "no student-prev-N folder"),
                         (["monitor", "--redistill"], "prep")):  # monitor runs first: no data yet
        p = subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(tmp_path), *args], capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, (p.returncode, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1
