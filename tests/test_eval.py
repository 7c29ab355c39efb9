"""eval stage on a workspace built here: tiny random models as teacher, student and student-init."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stillhouse.config import Config
from stillhouse.errors import GateError
from stillhouse.models import count_parameters, load_model, resolve_model, save_pretrained, tiny_random_model
from stillhouse.stages import eval as eval_stage
from stillhouse.workspace import atomic_write_json, write_jsonl

LABELS = ["HassTurnOn", "HassTurnOff", "HassLightSet"]


def _records() -> list[dict]:
    rows = []
    for i in range(8):
        rows.append({"id": f"cls-{i}", "task": "classification", "messages": [
            {"role": "user", "content": f"turn device {i} {'on' if i % 2 else 'off'}"},
            {"role": "assistant", "content": LABELS[i % 3]}]})
    for i in range(4):
        rows.append({"id": f"doc-{i}", "task": "text", "messages": [
            {"role": "user", "content": "Continue the handbook."},
            {"role": "assistant", "content": f"Section {i}: badges are renewed every {i + 1} years at the front desk."}]})
    rows.append({"id": "unlabeled", "task": "classification", "messages": [{"role": "user", "content": "dim it"}]})
    return rows


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    out = {}
    for name, layers, seed in (("teacher", 4, 1), ("student", 2, 2)):
        out[name] = save_pretrained(tiny_random_model(tokenizer, num_layers=layers, hidden_size=64, seed=seed), tokenizer, root / name)
    return out


def _workspace(root: Path, models: dict[str, Path], **eval_settings) -> Config:
    (root / "data").mkdir(parents=True)
    write_jsonl(root / "data" / "test.jsonl", _records())
    shutil.copytree(models["student"], root / "student" / "best")
    # student-init = the teacher's weights: its retention must come out exactly 1
    shutil.copytree(models["teacher"], root / "student" / "init")
    log = [{"step": s, "loss": 5.0 / s, "ce": 4.0 / s, "kd": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3, 4)]
    log += [{"step": 2, "val_score": 0.2, "val_loss": 3.0}, {"step": 4, "val_score": 0.4, "val_loss": 2.5}]
    (root / "student" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"step": 5, "lo')
    atomic_write_json(root / "student" / "manifest.json", {"stage": "train"})
    settings = dict(max_examples=5, max_new_tokens=4, bootstrap_samples=200, latency_requests=2)
    cfg = Config.model_validate({"teacher": {"model": str(models["teacher"])}, "eval": {**settings, **eval_settings}})
    cfg.workspace = root
    return cfg


def test_eval_results_report_and_skip(tmp_path, models, tiny_model_dir):
    cfg = _workspace(tmp_path, models, baselines=[str(tiny_model_dir)])
    manifest = eval_stage.run(cfg)
    out = tmp_path / "eval"
    results = json.loads((out / "results.json").read_text())

    assert set(results["models"]) == {"student", "student-init", "baseline:tiny", "teacher"}
    assert set(results["tasks"]) == {"classification", "text"}
    cls, text = results["tasks"]["classification"], results["tasks"]["text"]
    assert cls["n"] == 5 and text["n"] == 4  # max_examples caps 8 -> 5; the unlabeled record is not evaluated
    assert cls["metric"] == "accuracy" and text["metric"] == "perplexity" and not text["higher_is_better"]
    for name in results["models"]:
        m = cls["models"][name]
        assert 0 <= m["accuracy"] <= 1
        labels, matrix = m["confusion"]["labels"], m["confusion"]["matrix"]
        assert set(labels[:-1]) <= set(LABELS) and labels[-1] == "(other)"
        assert len(matrix) == len(labels) - 1 and sum(map(sum, matrix)) == 5
        assert text["models"][name]["perplexity"] > 1
    # same weights as the teacher -> identical outputs and perplexity -> retention exactly 1, CI collapsed
    assert text["retention"]["student-init"]["value"] == 1.0
    assert text["retention"]["student-init"]["ci95"] == [1.0, 1.0]
    ret = text["retention"]["student"]
    expected = text["models"]["teacher"]["perplexity"] / text["models"]["student"]["perplexity"]
    assert ret["value"] == pytest.approx(expected, rel=1e-3)
    assert ret["ci95"][0] <= ret["value"] <= ret["ci95"][1]

    student = results["models"]["student"]
    assert student["parameters"] == count_parameters(load_model(resolve_model(str(tmp_path / "student" / "best"))))
    assert student["parameters"] < results["models"]["teacher"]["parameters"]
    assert student["size_bytes"] > 0 and student["peak_rss_mb"] > 0 and student["tokens_per_s_batched"] > 0
    assert student["tokens_per_s_batch1"] > 0
    assert 0 < student["latency_ms_p50"] <= student["latency_ms_p95"]
    assert results["gate"]["passed"] is True

    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 4  # retention, tradeoff, training curves, confusion
    assert "<table>" in page and "Scores and retention" in page and "HassTurnOn" in page
    assert "Failures to review" in page
    assert "## Retention" in (out / "summary.md").read_text()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and set(rows[0]["outputs"]) == set(results["models"])

    metrics = manifest["metrics"]
    assert set(metrics["tasks"]["text"]) >= {"teacher", "student", "student_init", "retention", "retention_ci95"}
    assert metrics["models"]["student"]["parameters"] == student["parameters"]
    assert metrics["models"]["student"]["size_mb"] == pytest.approx(student["size_bytes"] / 1e6, abs=0.1)
    assert metrics["gate"] == "pass"

    before = (out / "results.json").stat().st_mtime_ns
    again = eval_stage.run(cfg)
    assert again["finished_at"] == manifest["finished_at"]  # skipped: the manifest on disk came back
    assert (out / "results.json").stat().st_mtime_ns == before


def test_eval_gate_writes_report_then_raises(tmp_path, models):
    cfg = _workspace(tmp_path, models, min_retention=1000.0)
    with pytest.raises(GateError, match=r"task 'text' perplexity retention .* < eval.min_retention 1000"):
        eval_stage.run(cfg)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["gate"]["passed"] is False
    assert "FAIL" in (tmp_path / "eval" / "report.html").read_text()
    assert not (tmp_path / "eval" / "manifest.json").exists()  # not finished: a re-run checks again


def test_eval_needs_training_first(tmp_path, models):
    cfg = _workspace(tmp_path, models)
    (tmp_path / "student" / "manifest.json").unlink()
    with pytest.raises(Exception, match="stillhouse .* train"):
        eval_stage.run(cfg)


def test_retention_definitions():
    import numpy as np

    idx = np.arange(2)
    # same text; the student's tokenizer cuts it into twice as many tokens, each half as surprising
    teacher = {"nll": np.array([2.0, 2.0]), "tokens": np.array([1.0, 1.0]), "bytes": np.array([4.0, 4.0])}
    student = {"nll": np.array([4.0, 4.0]), "tokens": np.array([4.0, 4.0]), "bytes": np.array([4.0, 4.0])}
    # per token: teacher ppl e^2, student e^1 -> "retention" e (meaningless across vocabularies)
    assert eval_stage.retention("perplexity", student, teacher, idx) == pytest.approx(np.e)
    # per byte of the same text: teacher e^0.5, student e^1 -> the student is really worse
    assert eval_stage.retention("perplexity", student, teacher, idx, per_byte=True) == pytest.approx(np.exp(-0.5))
    cls_t, cls_s = {"correct": np.array([1.0, 0.0])}, {"correct": np.array([0.0, 0.0])}
    assert eval_stage.retention("classification", cls_s, cls_t, idx) == 0.0
    assert np.isnan(eval_stage.retention("classification", cls_t, cls_s, idx))  # teacher scored 0: undefined
    ext = {"tp": np.array([1.0, 1.0]), "fp": np.array([1.0, 0.0]), "fn": np.array([0.0, 1.0])}
    assert eval_stage.primary_score("extraction", ext, idx) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ the report in a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=5000"]
# Run in the page after load: every <img> decoded (complete, real size) and the table shapes, put in the DOM
# where --dump-dom shows them.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().height]);
  const tables = [...document.querySelectorAll('table')].map(t => [t.rows.length, t.getBoundingClientRect().height]);
  document.body.setAttribute('data-probe', JSON.stringify({imgs, tables}));
});</script></body>"""


def _chromium(tmp_path: Path, *args: str) -> str:
    import subprocess
    import tempfile

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        pytest.skip("chromium is not installed (`make setup` installs it when run as root with apt-get; "
                    "or: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(dir=tmp_path) as profile:
        proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders_in_headless_chromium(tmp_path, models):
    import re

    import numpy as np
    from matplotlib.image import imread

    eval_stage.run(_workspace(tmp_path, models))
    report = tmp_path / "eval" / "report.html"
    page = report.read_text()
    n_imgs, n_tables = page.count("<img "), page.count("<table>")

    probed = tmp_path / "probed.html"  # a copy with the probe script; the report itself stays untouched
    probed.write_text(page.replace("</body>", PROBE))
    dom = _chromium(tmp_path, "--dump-dom", probed.as_uri())
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the probe did not run: the page did not finish loading"
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(probe["imgs"]) == n_imgs == 4
    for complete, width, height, shown_height in probe["imgs"]:
        assert complete and width > 200 and height > 100 and shown_height > 50  # a decoded PNG, laid out
    assert len(probe["tables"]) == n_tables >= 3
    assert all(rows >= 2 and height > 20 for rows, height in probe["tables"])  # header + data, on screen
    assert "Scores and retention" in dom and "HassTurnOn" in dom

    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,4000", report.as_uri())
    pixels = imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    saturation = pixels.max(-1) - pixels.min(-1)
    # text and tables are black/grey on white; only the plots' bars, lines and heat maps are colored
    assert (pixels.mean(-1) < 0.9).mean() > 0.02, "the screenshot is (almost) blank"
    assert (saturation > 0.3).sum() > 5000, "no colored plot pixels in the screenshot: figures not drawn"


# ---------------------------------------------------------------------------------------------- bad input


def test_no_test_split_says_run_prep(tmp_path, models):
    from stillhouse.errors import StillhouseError

    cfg = _workspace(tmp_path, models)
    (tmp_path / "data" / "test.jsonl").unlink()
    with pytest.raises(StillhouseError, match=r"test\.jsonl not found; run `stillhouse -w .* prep` first"):
        eval_stage.run(cfg)


def test_student_that_cannot_load_is_named(tmp_path, models):
    from stillhouse.errors import StillhouseError

    cfg = _workspace(tmp_path, models)
    (tmp_path / "student" / "best" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StillhouseError, match=r"eval: the student model .*best cannot be loaded \(SafetensorError") as err:
        eval_stage.run(cfg)
    assert type(err.value) is StillhouseError  # exit 2 (bad input), not a gate and not a traceback


def test_generative_stats_exact_match_and_token_f1():
    from stillhouse.stages.eval import example_stats

    st = example_stats("generative", ["The parcel ships today.", "Reset your password."],
                       ["the parcel ships TODAY", "Please call the desk."])
    assert st["exact_match"].tolist() == [1.0, 0.0]  # case and punctuation do not count
    assert st["token_f1"][0] == 1.0 and st["token_f1"][1] == 0.0
    assert 0 < st["rouge_l"][0] <= 1.0
