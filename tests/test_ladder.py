"""Student-size ladder on a tiny workspace (4-layer random teacher, rungs of 1 and 2 layers): shared data and labels,
the same budget per rung, the results table and plot, the smallest rung that meets the requirements, resuming,
and a rung larger than the teacher refused with a message naming the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stillhouse.config import load_config
from stillhouse.errors import StillhouseError
from stillhouse.ladder import rung_name, run_ladder, validate_rungs
from stillhouse.models import evenly_spaced_layers
from test_general import tiny_workspace


@pytest.fixture(scope="module")
def laddered(tmp_path_factory, tiny_model_dir):
    ws = tiny_workspace(tmp_path_factory.mktemp("ladder"), tiny_model_dir, ladder={"rungs": [2, 1]})
    return ws, run_ladder(load_config(ws))


def test_rungs_share_data_and_labels_and_the_budget(laddered):
    ws, out = laddered
    assert [r["rung"] for r in out["rungs"]] == ["L1", "L2"]  # sorted by size
    p1, p2 = (r["parameters"] for r in out["rungs"])
    assert p1 < p2 < out["teacher"]["parameters"] and out["teacher"]["layers"] == 4
    for name, layers in (("L1", 1), ("L2", 2)):
        sub = ws / "ladder" / name
        assert (sub / "data").is_symlink() and (sub / "labels").resolve() == (ws / "labels").resolve()
        manifest = json.loads((sub / "student" / "manifest.json").read_text())
        assert manifest["student"]["kept_layers"] == evenly_spaced_layers(4, layers)
        assert manifest["config"]["train"] == json.loads((ws / "labels" / "manifest.json").read_text())["config"]["train"]
        assert manifest["labels_fingerprint"] == json.loads((ws / "labels" / "manifest.json").read_text())["fingerprint"]
        assert (sub / "eval" / "results.json").exists()
        # a rung is a plain workspace: its config loads on its own, with only the student changed
        rcfg = load_config(sub)
        assert rcfg.student.derive_layers == layers and rcfg.teacher.model == "teacher-model"
    for r in out["rungs"]:
        assert r["latency_ms_p95"] > 0 and "classification" in r["tasks"]
        assert 0 <= r["tasks"]["classification"]["score"] <= 1


def test_outputs_and_the_choice(laddered):
    ws, out = laddered
    # no requirement configured: every rung meets it, and the smallest is named
    assert all(r["meets_requirements"] for r in out["rungs"]) and out["smallest_meeting_requirements"] == "L1"
    assert json.loads((ws / "ladder" / "results.json").read_text()) == json.loads(json.dumps(out))
    assert (ws / "ladder" / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (ws / "ladder" / "summary.md").read_text()
    assert "Smallest student meeting them: L1" in summary and "| L2 |" in summary and "| teacher |" in summary


def test_a_requirement_no_rung_meets_and_resume(laddered):
    ws, out = laddered
    trained = {n: json.loads((ws / "ladder" / n / "student" / "manifest.json").read_text())["finished_at"] for n in ("L1", "L2")}
    strict = run_ladder(load_config(ws, ["eval.max_latency_ms_p95=0.001"]))
    assert strict["smallest_meeting_requirements"] is None
    assert all(not r["meets_requirements"] and "eval.max_latency_ms_p95" in r["failures"][0] for r in strict["rungs"])
    assert "Smallest student meeting them: none" in (ws / "ladder" / "summary.md").read_text()
    # the same training budget: nothing is retrained, only evaluated against the new requirement
    for n, t in trained.items():
        assert json.loads((ws / "ladder" / n / "student" / "manifest.json").read_text())["finished_at"] == t


def test_bad_rungs_name_the_key(laddered, tmp_path):
    ws, _ = laddered
    cfg = load_config(ws)
    with pytest.raises(StillhouseError, match=r"ladder.rungs: 5 layers is more than the teacher's 4"):
        validate_rungs(cfg, [2, 5])
    with pytest.raises(StillhouseError, match="ladder.rungs: 0 layers"):
        validate_rungs(cfg, [0])
    with pytest.raises(StillhouseError, match="ladder.rungs is empty"):
        validate_rungs(cfg, [])
    with pytest.raises(StillhouseError, match="share the folder name"):
        validate_rungs(cfg, [2, 2])
    assert rung_name(4) == "L4" and rung_name("models/student 6l/") == "M-student_6l"
    p = subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), "ladder", "--set", "ladder.rungs=[9]"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "ladder.rungs: 9 layers is more than the teacher's 4" in p.stderr
    assert "Traceback" not in p.stderr
