"""Manifests: written last and atomically; unchanged inputs skip; changed inputs or params re-run."""

import json

from stillhouse.config import validate
from stillhouse.workspace import MANIFEST, StageRun, atomic_write_json, load_manifest


def fake_stage(cfg, src, params):
    run = StageRun(cfg, "prep", inputs=[src], params=params)
    if run.previous:
        return run.previous, True
    (run.dir / "out.txt").write_text(src.read_text().upper())
    return run.finish(metrics={"chars": len(src.read_text())}), False


def test_skip_rerun_and_manifest_fields(tmp_path):
    cfg = validate({}, tmp_path, "test")
    src = tmp_path / "in.txt"
    src.write_text("hello")
    m1, skipped = fake_stage(cfg, src, {"a": 1})
    assert not skipped
    for key in ("fingerprint", "config", "inputs", "outputs", "versions", "seconds", "metrics"):
        assert key in m1
    assert m1["inputs"] == {"in.txt": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    assert list(m1["outputs"]) == ["data/out.txt"]
    assert m1["config"]["train"]["steps"] == cfg.train.steps
    _, skipped = fake_stage(cfg, src, {"a": 1})
    assert skipped  # unchanged
    _, skipped = fake_stage(cfg, src, {"a": 2})
    assert not skipped  # params changed
    src.write_text("hello world")
    m4, skipped = fake_stage(cfg, src, {"a": 2})
    assert not skipped and m4["metrics"]["chars"] == 11  # input changed
    (tmp_path / "data" / "out.txt").write_text("tampered")
    _, skipped = fake_stage(cfg, src, {"a": 2})
    assert not skipped  # an output changed: the manifest no longer vouches for it


def test_interrupted_stage_is_not_done(tmp_path):
    cfg = validate({}, tmp_path, "test")
    src = tmp_path / "in.txt"
    src.write_text("x")
    fake_stage(cfg, src, {})
    run = StageRun(cfg, "prep", inputs=[src], params={"changed": True})  # starts, then "crashes" before finish
    assert run.previous is None
    assert load_manifest(tmp_path, "prep") is None  # the old manifest no longer claims the stage is done
    assert (tmp_path / "data" / "manifest.previous.json").exists()


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_json(tmp_path / "a" / MANIFEST, {"x": 1})
    assert json.loads((tmp_path / "a" / MANIFEST).read_text()) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == [MANIFEST]
