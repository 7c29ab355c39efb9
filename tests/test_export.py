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
