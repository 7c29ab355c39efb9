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
        assert set(checks) == {"input_length", "unseen_words", "answers"}
        assert not any(c["drift"] for c in checks.values())
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
    assert any("never seen in train" in r for r in manifest["reasons"]) and "stillhouse" in manifest["next_step"]

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
