"""`stillhouse train --sweep` through the real CLI on a quick-demo workspace (tiny random teacher over the real
tokenizer): a 2 x 2 grid of temperature x alpha, the results table sorted by the validation metric, relabeling at
the temperature labels/ was not made at, resume that skips finished trials, and config errors that name the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stillhouse.config import load_config
from stillhouse.errors import StillhouseError

ENV = {**os.environ, "STILLHOUSE_QUIET": "1"}
GRID = ["--set", "train.sweep.temperature=[1,2]", "--set", "train.sweep.alpha=[0.3,0.7]",
        "--set", "train.sweep.learning_rate=[0.001]", "--set", "train.sweep.steps=4", "--set", "train.batch_size=4"]


def _cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A quick-demo workspace up to labels/ (soft labels at T = 2), then one sweep over the 2 x 2 grid."""
    from stillhouse.demo import _prepare
    from stillhouse.pipeline import run_all

    ws = tmp_path_factory.mktemp("sweep") / "ws"
    _prepare(ws, quick=True)
    run_all(load_config(ws), ["prep", "adapt", "label"])
    return ws, _cli(ws, "train", "--sweep", *GRID)


def test_the_grid_runs_and_the_table_is_sorted_by_the_validation_metric(swept):
    ws, r = swept
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((ws / "sweep" / "results.json").read_text())
    trials = report["trials"]
    assert sorted((t["temperature"], t["alpha"]) for t in trials) == [(1.0, 0.3), (1.0, 0.7), (2.0, 0.3), (2.0, 0.7)]
    keys = [(-t["val_score"], t["val_loss"]) for t in trials]
    assert keys == sorted(keys) and report["best"] == trials[0]
    # the printed advice is the best trial's settings
    best = trials[0]
    said = r.stdout + r.stderr  # (the console prints to stderr)
    assert f"--set train.alpha={best['alpha']:g}" in said and f"--set label.temperature={best['temperature']:g}" in said
    table = (ws / "sweep" / "results.md").read_text()
    assert all(f"| {t['trial']} |" in table for t in trials)
    for t in trials:  # each trial trained its steps and logged its curve; its weights are gone once scored
        d = ws / "sweep" / t["trial"]
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert max(row["step"] for row in rows) == 4 == t["steps"]
        assert not list(d.glob("step-*")) and not (d / "best").exists() and not (d / "final").exists()


def test_temperature_reaches_the_labels_and_the_loss(swept):
    """T = 1 is not labels/' temperature (2): the teacher relabeled at T = 1. Both label sets come from the same
    logits z, so per position log p_1 = 2 * log p_2 + const over the same top-k ids (up to the 8-bit quantization)."""
    import torch

    from stillhouse.softlabels import ShardReader
    from stillhouse.workspace import read_jsonl

    ws, _ = swept
    row = next(r for r in read_jsonl(ws / "labels" / "sequences.jsonl") if len(r["input_ids"]) - r["prompt_len"] > 2)
    ids2, lp2 = ShardReader(ws / "labels" / row["shard"]).get(row["id"])
    reader1 = ShardReader(ws / "sweep" / "labels-T1" / row["shard"])
    assert reader1.meta["temperature"] == 1.0
    ids1, lp1 = reader1.get(row["id"])
    head = slice(0, 8)  # the most probable ids: the same at both temperatures (ties aside)
    assert torch.equal(ids1[:, head], ids2[:, head])
    offset = lp1[:, head] - 2 * lp2[:, head]  # (n, 8): constant along each row
    assert float((offset - offset.mean(-1, keepdim=True)).abs().max()) < 0.1
    # and the loss saw it: the same alpha and learning rate at T = 1 and T = 2 trained differently
    by_point = {(t["temperature"], t["alpha"]): t for t in json.loads((ws / "sweep" / "results.json").read_text())["trials"]}
    curves = [[json.loads(x).get("kd") for x in (ws / "sweep" / by_point[(t, 0.7)]["trial"] / "metrics.jsonl")
               .read_text().splitlines()] for t in (1.0, 2.0)]
    assert curves[0] != curves[1]


def test_a_rerun_skips_finished_trials_also_when_the_grid_changed(swept):
    ws, _ = swept
    before = (ws / "sweep" / "results.json").read_text()
    r = _cli(ws, "train", "--sweep", *GRID)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trial 1/4" not in r.stdout + r.stderr and "trial-000" in r.stderr  # nothing trained; the table again
    assert (ws / "sweep" / "results.json").read_text() == before
    # a smaller grid, in another order: its points are found by their settings, not their trial numbers
    r = _cli(ws, "train", "--sweep", *GRID, "--set", "train.sweep.temperature=[2]", "--set", "train.sweep.alpha=[0.7,0.3]")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trial 1/2" not in r.stdout + r.stderr
    trials = json.loads((ws / "sweep" / "results.json").read_text())["trials"]
    old = {t["trial"]: t for t in json.loads(before)["trials"]}
    assert len(trials) == 2 and all(t == old[t["trial"]] for t in trials)


def test_sweep_settings_are_validated_with_the_key_named(tmp_path):
    with pytest.raises(StillhouseError, match=r"train\.sweep\.alpha"):
        load_config(tmp_path, ["train.sweep.alpha=[0.5,1.5]"], required=False)
    with pytest.raises(StillhouseError, match=r"train\.sweep\.learning_rate"):
        load_config(tmp_path, ["train.sweep.learning_rate=[]"], required=False)
    cfg = load_config(tmp_path, ["train.sweep.temperature=[1,2]", "train.sweep.alpha=[0,0.5]"], required=False)
    from stillhouse.sweep import grid

    # alpha = 0 (cross-entropy only) does not depend on the temperature: one baseline trial per learning rate
    points = grid(cfg, "token")
    assert len(points) == len(cfg.train.sweep.learning_rate) * (1 + 2)
    assert sum(p["alpha"] == 0 for p in points) == len(cfg.train.sweep.learning_rate)
    assert {p["temperature"] for p in grid(cfg, "sequence")} == {None}


def test_the_sweep_needs_labels_first(tmp_path):
    (tmp_path / "stillhouse.yaml").write_text("project: x\n")
    r = _cli(tmp_path, "train", "--sweep")
    assert r.returncode == 2 and "stillhouse -w" in r.stderr and "label" in r.stderr and "Traceback" not in r.stderr
