"""export: a student that failed redteam is refused unless the config overrides it, and the override is recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stillhouse.config import Config
from stillhouse.errors import GateError
from stillhouse.models import load_model, resolve_model
from stillhouse.stages import export
from stillhouse.workspace import atomic_write_json


def _workspace(root: Path, model_dir: Path, redteam_manifest: dict | None, **export_settings) -> Config:
    shutil.copytree(model_dir, root / "student" / "best")
    atomic_write_json(root / "student" / "manifest.json", {"stage": "train"})
    if redteam_manifest is not None:
        atomic_write_json(root / "redteam" / "manifest.json", {"stage": "redteam", **redteam_manifest})
    cfg = Config.model_validate({"export": {"dtype": "fp32", **export_settings}})
    cfg.workspace = root
    return cfg


FAILED = {"verdict": "fail", "verdict_reasons": ["2 canary(ies) memorized: exposure up to 13.29 bits"],
          "metrics": {"verdict": "fail"}}


def test_failed_redteam_is_refused(tmp_path, tiny_model_dir):
    cfg = _workspace(tmp_path, tiny_model_dir, FAILED)
    with pytest.raises(GateError, match=r"failed redteam \(2 canary\(ies\) memorized.*allow_failed_redteam=true"):
        export.run(cfg)
    assert not (tmp_path / "export" / "model").exists()


def test_override_is_recorded_in_manifest_and_card(tmp_path, tiny_model_dir):
    manifest = export.run(_workspace(tmp_path, tiny_model_dir, FAILED, allow_failed_redteam=True))
    assert manifest["redteam"] == {"verdict": "fail", "reasons": FAILED["verdict_reasons"], "overridden": True}
    card = (tmp_path / "export" / "model" / "README.md").read_text()
    assert "- verdict: fail" in card and "exported despite the failed red team" in card and "13.29 bits" in card
    load_model(resolve_model(str(tmp_path / "export" / "model")))  # the export is a real model folder
    saved = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert saved["params"]["redteam"]["overridden"] is True


def test_passed_redteam_exports_and_a_new_verdict_is_not_skipped(tmp_path, tiny_model_dir):
    cfg = _workspace(tmp_path, tiny_model_dir, {"verdict": "pass", "verdict_reasons": []})
    manifest = export.run(cfg)
    assert manifest["redteam"]["verdict"] == "pass" and not manifest["redteam"]["overridden"]
    assert "exported despite" not in (tmp_path / "export" / "model" / "README.md").read_text()
    assert export.run(cfg)["finished_at"] == manifest["finished_at"]  # unchanged: skipped
    atomic_write_json(tmp_path / "redteam" / "manifest.json", {"stage": "redteam", **FAILED})
    with pytest.raises(GateError):
        export.run(cfg)  # redteam ran again and failed: the old export's "up to date" must not hide it


def test_without_redteam_the_card_says_not_run(tmp_path, tiny_model_dir):
    manifest = export.run(_workspace(tmp_path, tiny_model_dir, None))
    assert manifest["redteam"]["verdict"] == "not run"
    assert "- verdict: not run" in (tmp_path / "export" / "model" / "README.md").read_text()


def test_quantized_gguf_variants_are_reevaluated(tmp_path, tiny_model_dir, tokenizer):
    """Every GGUF variant is loaded back and answers the test records. The student's weights are made exactly
    representable in fp16, so the f16 file must answer exactly as the export does (agreement 1, retention 1); the
    4- and 8-bit files are smaller and their scores are those of their own stored answers."""
    import torch

    from stillhouse import metrics as M
    from stillhouse.models import save_pretrained

    model = load_model(resolve_model(str(tiny_model_dir)))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    student = save_pretrained(model, tokenizer, tmp_path / "fp16-exact")
    records = [{"id": f"t-{i}", "task": "classification", "messages": [
        {"role": "user", "content": f"turn on the light in room {i}"}, {"role": "assistant", "content": "HassTurnOn"}]}
        for i in range(5)] + [{"id": "q-0", "task": "qa", "messages": [
            {"role": "user", "content": "when is the office open?"}, {"role": "assistant", "content": "from 9 to 5"}]}]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = _workspace(tmp_path, student, None, formats=["safetensors", "gguf"], gguf_quants=["f16", "q4_0"])
    cfg.eval.max_new_tokens = 4
    manifest = export.run(cfg)
    q = json.loads((tmp_path / "export" / "quantization.json").read_text())
    assert q["records"] == [r["id"] for r in records] and set(q["variants"]) == {"f16", "q4_0"}
    f16 = q["variants"]["f16"]
    assert f16["outputs"] == q["export_outputs"] and f16["agreement"] == 1.0
    assert f16["retention"] in (1.0, None)  # None: the export scored 0 (a random model)
    expected = [(M.normalize_prediction(o) == "HassTurnOn") for o in q["export_outputs"][:5]]
    expected.append(M.token_f1(q["export_outputs"][5], "from 9 to 5"))
    assert q["export_score"] == round(sum(expected) / 6, 4)
    sizes = {k: v["bytes"] for k, v in q["variants"].items()}
    # 4-bit blocks, the embedding (most of a tiny model) in 8-bit; both files carry ~2.5 MB of tokenizer metadata
    assert sizes["q4_0"] < 0.7 * sizes["f16"]
    assert manifest["formats"] == ["safetensors", "gguf-f16", "gguf-q4_0"]
    assert manifest["metrics"]["quantization"]["q4_0"]["agreement"] == q["variants"]["q4_0"]["agreement"]
