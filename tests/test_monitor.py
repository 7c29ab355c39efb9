"""monitor: drift of production requests against the training data, calibrated for small windows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from stillhouse.config import validate
from stillhouse.errors import GateError, StillhouseError
from stillhouse.stages import monitor

SYSTEM = "Classify the smart-home request. Answer with the intent name only."
ROOMS = ["kitchen", "living room", "bedroom", "office", "garage", "bathroom", "hallway", "garden", "attic", "porch"]
TEMPLATES = [
    ("turn on the {room} light", "HassTurnOn"),
    ("please switch on the lamp in the {room}", "HassTurnOn"),
    ("switch off the {room} lamp", "HassTurnOff"),
    ("what is the temperature in the {room}", "HassClimateGetTemperature"),
    ("set the {room} brightness to {n} percent", "HassLightSet"),
    ("open the {room} blinds", "HassOpenCover"),
    ("close the blinds in the {room} now", "HassCloseCover"),
    ("is the {room} door locked", "HassGetState"),
]
JAPANESE = [
    "台所の照明をつけてください。それから寝室のエアコンを二十二度に設定して、明日の朝七時に起こしてください。",
    "来週の会議資料を田中さんに送ってから、経理部の山本さんに請求書の確認をお願いしたいのですが、可能でしょうか。",
    "昨日の注文がまだ届いていません。配送状況を確認して、遅れている理由と到着予定日を教えていただけますか。",
]


def _utterance(rng: random.Random) -> tuple[str, str]:
    template, label = rng.choice(TEMPLATES)
    return template.format(room=rng.choice(ROOMS), n=rng.randint(1, 100)), label


def _record(i: int, rng: random.Random) -> dict:
    text, label = _utterance(rng)
    return {"id": f"intents-{i:05d}", "task": "classification", "sensitivity": "internal",
            "source": {"file": "sources/intents.jsonl", "location": f"line {i + 1}"},
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": label}]}


def _log_row(text: str, output: str) -> dict:
    """A line as `stillhouse serve` writes it."""
    return {"time": "2026-01-01T00:00:00+0000", "endpoint": "/v1/chat/completions", "model": "student", "status": 200,
            "stream": False, "latency_ms": 12.0, "prompt_tokens": 40, "completion_tokens": 3, "finish_reason": "stop",
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}], "output": output}


def _workspace(root: Path, **monitor_cfg):
    rng = random.Random(0)
    data = root / "data"
    data.mkdir(parents=True)
    for name, count in (("train", 300), ("val", 60)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(_record(i, rng)) + "\n" for i in range(count)))
    return validate({"monitor": monitor_cfg}, workspace=root, source="test")


def _write_log(cfg, rows: list[dict]) -> Path:
    path = cfg.workspace / "serve" / "requests.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _report(cfg) -> dict:
    return json.loads((cfg.workspace / "monitor" / "report.json").read_text())


def test_no_false_alarm_on_train_like_traffic(tmp_path):
    """Windows drawn from the training distribution, from tiny to large, all say ok."""
    cfg = _workspace(tmp_path)
    rng = random.Random(123)
    for size in (5, 8, 15, 40, 150, 600):
        _write_log(cfg, [_log_row(*_utterance(rng)) for _ in range(size)])
        manifest = monitor.run(cfg, fail_on_drift=True)
        assert manifest["verdict"] == "ok", (size, manifest["reasons"])
        checks = {c["name"]: c for c in _report(cfg)["checks"]}
        assert set(checks) == {"input_length", "unseen_words", "answers", "embeddings"}
        assert "no student" in checks["embeddings"]["skipped"]  # nothing trained in this workspace
        assert not any(c.get("drift") for c in checks.values())
        assert all(0 < c["p_value"] <= 1 for c in checks.values() if "p_value" in c)
    # a small window gets a higher bar than the configured 0.2; a large one falls back to it
    assert checks["input_length"]["threshold"] == pytest.approx(cfg.monitor.drift_threshold, abs=0.05)
    assert not (tmp_path / "monitor" / "redistill.jsonl").exists()
    assert (tmp_path / "monitor" / "report.md").read_text().startswith("# Monitor report")


def test_drift_on_long_japanese_text(tmp_path):
    cfg = _workspace(tmp_path)
    rng = random.Random(5)
    # Requests logged by something other than serve may hold raw PII: redistill.jsonl must still be masked.
    rows = [_log_row(JAPANESE[i % 3] * (1 + i % 2) + (" 連絡先: taro.yamada@example.jp" if i == 0 else ""), "HassTurnOn") for i in range(20)]
    rows += [_log_row(*_utterance(rng)) for _ in range(5)]  # some ordinary traffic in the same window
    _write_log(cfg, rows)
    manifest = monitor.run(cfg)
    assert manifest["verdict"] == "drift"
    checks = {c["name"]: c for c in _report(cfg)["checks"]}
    assert checks["input_length"]["drift"] and checks["unseen_words"]["drift"]
    assert checks["unseen_words"]["value"] > 0.9 and checks["unseen_words"]["val_rate"] < 0.05
    assert checks["unseen_words"]["p_value"] < checks["unseen_words"]["alpha"]
    assert any("never seen in train" in r for r in manifest["reasons"]) and "--redistill" in manifest["next_step"]

    redistill_path = tmp_path / "monitor" / "redistill.jsonl"
    text = redistill_path.read_text()
    assert "taro.yamada@example.jp" not in text and "[EMAIL]" in text
    records = [json.loads(line) for line in text.splitlines()]
    # the distinct Japanese inputs (3 texts x 2 lengths, and the one with an e-mail), not the ordinary traffic
    assert len(records) == 7
    for r in records:
        assert r["messages"][-1]["role"] == "user" and r["task"] == "classification"  # unlabeled, same task
        assert r["id"].startswith("redistill-") and r["source"]["file"] == "serve/requests.jsonl"
        assert any("\u3040" <= ch <= "\u9fff" for ch in r["text"])

    # the gate: exit 1 only when asked, and the report is already on disk (here: from the skipped re-run)
    with pytest.raises(GateError, match="drifted"):
        monitor.run(cfg, fail_on_drift=True)
    assert _report(cfg)["verdict"] == "drift"


def test_drift_in_answers_only(tmp_path):
    """Inputs look like train, but the model answers one intent for everything: the answer mix drifted."""
    cfg = _workspace(tmp_path)
    rng = random.Random(9)
    _write_log(cfg, [_log_row(_utterance(rng)[0], "HassTurnOn") for _ in range(40)])
    with pytest.raises(GateError):
        monitor.run(cfg, fail_on_drift=True)
    report = _report(cfg)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["verdict"] == "drift"
    assert checks["answers"]["drift"] and not checks["input_length"]["drift"] and not checks["unseen_words"]["drift"]
    assert checks["answers"]["detail"]["answers"]["HassTurnOn"] == 40
    assert report["redistill_records"] >= 1


def test_insufficient_data_below_min_requests(tmp_path):
    cfg = _workspace(tmp_path, min_requests=5)
    rows = [_log_row(JAPANESE[0], "HassTurnOn") for _ in range(4)]  # would be drift, but too few to say
    rows.append({**_log_row(JAPANESE[1], ""), "status": 429})  # refused requests do not count
    path = _write_log(cfg, rows)
    with path.open("a") as f:
        f.write('{"time": "2026-01-01T00:00:01+0000", "endpo')  # the server is mid-write: a torn last line
    manifest = monitor.run(cfg, fail_on_drift=True)
    assert manifest["verdict"] == "insufficient data"
    assert "4 answered requests" in manifest["reasons"][0] and "monitor.min_requests" in manifest["reasons"][0]
    assert _report(cfg)["checks"] == []
    assert not (tmp_path / "monitor" / "redistill.jsonl").exists()


def test_missing_inputs_are_clear_errors(tmp_path):
    cfg = _workspace(tmp_path)
    with pytest.raises(StillhouseError, match="serve"):
        monitor.run(cfg)
    empty = validate({}, workspace=tmp_path / "empty", source="test")
    with pytest.raises(StillhouseError, match="prep"):
        monitor.run(empty)


def test_corrupt_log_lines_are_skipped_and_counted(tmp_path):
    cfg = _workspace(tmp_path)
    rng = random.Random(3)
    path = _write_log(cfg, [_log_row(*_utterance(rng)) for _ in range(30)])
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(10, '{"time": "2026-01-01", "status": 200, "messa\n')  # cut mid-write by a crash, then appended to
    lines.insert(20, "[1, 2, 3]\n")  # valid JSON, but not a request
    path.write_text("".join(lines))
    manifest = monitor.run(cfg)
    report = _report(cfg)
    assert report["requests"] == 30 and report["log_lines_skipped"] == 2
    assert report["log_lines_skipped_first"] == [11, 21]
    assert manifest["metrics"]["log_lines_skipped"] == 2 and manifest["verdict"] == "ok"
    assert "2 corrupt line(s)" in (tmp_path / "monitor" / "report.md").read_text()


def _naive_mmd2(x, y, h):
    """Straight from the definition: mean k(x, x') + mean k(y, y') - 2 mean k(x, y), all pairs, loops."""
    import math

    def k(a, b):
        return math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b)) / h)

    def mean_k(a, b):
        return sum(k(p, q) for p in a for q in b) / (len(a) * len(b))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def test_mmd_matches_the_definition_and_detects_a_shift():
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3))
    mmd2, p, h = monitor.mmd_permutation_test(x, y, 200, np.random.default_rng(1))
    assert mmd2 == pytest.approx(_naive_mmd2(x.tolist(), y.tolist(), h), rel=1e-9)
    z = np.concatenate([x, y])
    assert h == pytest.approx(np.median([((a - b) ** 2).sum() for i, a in enumerate(z) for b in z[i + 1:]]))
    assert monitor.mmd_permutation_test(x, x, 50, np.random.default_rng(1))[0] == pytest.approx(0, abs=1e-12)
    # a mean shift of one standard deviation in 40 vs 40 points: far outside every permutation
    shifted = monitor.mmd_permutation_test(rng.normal(size=(40, 3)), rng.normal(1.0, 1, size=(40, 3)), 500, rng)
    assert shifted[1] == pytest.approx(1 / 501)


def test_mmd_p_value_is_calibrated():
    """Under the null the permutation p-value is uniform: about 5% of same-distribution pairs fall below 0.05."""
    import numpy as np

    rng = np.random.default_rng(7)
    p = [monitor.mmd_permutation_test(rng.normal(size=(20, 4)), rng.normal(size=(30, 4)), 200, rng)[1] for _ in range(200)]
    assert 0.01 <= np.mean(np.array(p) < 0.05) <= 0.10
    assert 0.35 <= np.median(p) <= 0.65


def test_false_alarm_rate_of_all_checks_together(tmp_path):
    """Bonferroni over the checks: 300 windows of ordinary traffic (from the generator, not from train) raise
    at most a few alarms at false_alarm_rate=0.05 (expected <= 15); shifted windows raise them every time."""
    import numpy as np

    cfg = _workspace(tmp_path, false_alarm_rate=0.05)
    train = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "data" / "val.jsonl").read_text().splitlines()]
    text = lambda r: r["messages"][1]["content"]  # noqa: E731
    ref = monitor.build_reference([text(r) for r in train], [text(r) for r in val],
                                  [r["messages"][-1]["content"] for r in train], cfg, np.random.default_rng(0))
    rng, np_rng = random.Random(11), np.random.default_rng(1)
    alarms = 0
    for i in range(300):
        window = [_utterance(rng) for _ in range(10 + i % 3 * 45)]  # 10, 55 and 100 requests
        checks = monitor.drift_checks([t for t, _ in window], [a for _, a in window], ref, cfg, np_rng)
        assert {c["name"] for c in checks if "p_value" in c} == {"input_length", "unseen_words", "answers"}
        alarms += any(c.get("drift") for c in checks)
    assert alarms <= 15
    for i in range(10):
        window = [JAPANESE[j % 3] for j in range(30)]
        checks = monitor.drift_checks(window, ["HassTurnOn"] * 30, ref, cfg, np_rng)
        assert any(c.get("drift") for c in checks)


def _with_student(tmp_path, tiny_model_dir, **monitor_cfg):
    import shutil

    cfg = _workspace(tmp_path, **monitor_cfg)
    shutil.copytree(tiny_model_dir, tmp_path / "student" / "best")
    return cfg


def test_embedding_check_with_a_real_student(tmp_path, tiny_model_dir):
    """The student's hidden states: ordinary traffic passes; a new topic in ordinary words and lengths fires."""
    cfg = _with_student(tmp_path, tiny_model_dir, embedding_sample=200)
    rng = random.Random(21)
    _write_log(cfg, [_log_row(*_utterance(rng)) for _ in range(80)])
    monitor.run(cfg, fail_on_drift=True)
    emb = {c["name"]: c for c in _report(cfg)["checks"]}["embeddings"]
    assert emb["detail"]["model"].endswith("best") and emb["detail"]["train_sampled"] == 200
    assert emb["p_value"] >= emb["alpha"] and not emb["drift"]

    # Another topic of similar length, in words the training data also uses.
    other = ["the garden door is open and the office is locked", "is the porch light on in the garage now",
             "set the bedroom to twenty percent please", "what is the kitchen temperature in the attic"]
    _write_log(cfg, [_log_row(other[i % 4] + f" {i}", "HassGetState") for i in range(80)])
    manifest = monitor.run(cfg)
    emb = {c["name"]: c for c in _report(cfg)["checks"]}["embeddings"]
    assert emb["drift"] and emb["p_value"] < emb["alpha"] and manifest["verdict"] == "drift"


def test_accuracy_drift_on_labeled_requests(tmp_path, tiny_model_dir):
    """A random student gets ~0 of the people's labels right: drift against a claimed test accuracy of 0.9,
    none against 0.0; a bad line in the labeled file is an error that names it."""
    cfg = _with_student(tmp_path, tiny_model_dir, labeled_requests="labeled.jsonl", embedding_sample=0, min_requests=3)
    rng = random.Random(4)
    _write_log(cfg, [_log_row(*_utterance(rng)) for _ in range(20)])
    labeled = [_log_row(*_utterance(rng)) for _ in range(6)]
    rows = [{**r, "label": r.pop("output")} for r in labeled[:3]]  # log rows with a label added ...
    rows += [{"messages": r["messages"] + [{"role": "assistant", "content": r["output"]}]} for r in labeled[3:]]  # ... and records
    (tmp_path / "labeled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = tmp_path / "eval" / "results.json"
    results.parent.mkdir()
    for test_accuracy, drift in ((0.9, True), (0.0, False)):
        results.write_text(json.dumps({"tasks": {"classification": {"models": {"student": {"score": test_accuracy}}}}}))
        manifest = monitor.run(cfg)
        acc = {c["name"]: c for c in _report(cfg)["checks"]}["accuracy"]
        assert acc["detail"]["labeled_requests"] == 6 and acc["value"] < 0.5
        assert acc["test_accuracy"] == test_accuracy and acc["drift"] is drift
        assert (manifest["verdict"] == "drift") is drift

    with (tmp_path / "labeled.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "no label"}]}\n')
    with pytest.raises(StillhouseError, match=r"labeled.jsonl line 7: expected `messages`"):
        monitor.run(cfg)
