"""`stillhouse train --sweep` through the real CLI on a quick-demo workspace (tiny random teacher over the real
tokenizer): a 2 x 2 grid of temperature x alpha, the results table sorted by the validation metric, relabeling at
the temperature labels/ was not made at, resume that skips finished trials, and config errors that name the key;
a grid over LoRA ranks; an optuna search that resumes after being killed mid-trial, and its median pruner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stillhouse.config import load_config
from stillhouse.errors import StillhouseError

ENV = {**os.environ, "STILLHOUSE_QUIET": "1"}
GRID = ["--set", "train.sweep.temperature=[1,2]", "--set", "train.sweep.alpha=[0.3,0.7]",
        "--set", "train.sweep.learning_rate=[0.001]", "--set", "train.sweep.steps=4", "--set", "train.batch_size=4"]
# 6 steps, evaluated every 2; learning rates high enough that the tiny student's scores differ within 6 steps
OPTUNA = ["--set", "train.sweep.method=optuna", "--set", "train.sweep.temperature=[1,2]",
          "--set", "train.sweep.optuna.learning_rate=[1e-4,3e-2]", "--set", "train.sweep.steps=6",
          "--set", "train.sweep.evals=3", "--set", "train.batch_size=4"]


def _command(ws: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stillhouse", "-w", str(ws), *args]


def _cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(ws, *args), env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    """A quick-demo workspace up to labels/ (soft labels at T = 2); each sweep below runs in a copy of it."""
    from stillhouse.demo import _prepare
    from stillhouse.pipeline import run_all

    ws = tmp_path_factory.mktemp("sweep") / "ws"
    _prepare(ws, quick=True)
    run_all(load_config(ws), ["prep", "adapt", "label"])
    return ws


def _copy(labeled: Path, tmp_path_factory, name: str) -> Path:
    ws = tmp_path_factory.mktemp(name) / "ws"
    shutil.copytree(labeled, ws)
    return ws


@pytest.fixture(scope="module")
def swept(labeled, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One sweep over the 2 x 2 grid."""
    ws = _copy(labeled, tmp_path_factory, "grid")
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
    # with LoRA on, the grid also spans the ranks and alphas (train.lora's own when the lists are empty)
    lora = load_config(tmp_path, ["train.lora.enabled=true", "train.sweep.lora_r=[4,8]", "train.sweep.alpha=[0.5]"],
                       required=False)
    points = grid(lora, "token")
    assert len(points) == len(lora.train.sweep.temperature) * len(lora.train.sweep.learning_rate) * 2
    assert {(p["lora_r"], p["lora_alpha"]) for p in points} == {(4, lora.train.lora.alpha), (8, lora.train.lora.alpha)}
    # optuna's ranges: [low, high], inside each setting's bounds
    for bad, key in (("train.sweep.optuna.learning_rate=[1e-3,1e-5]", r"train\.sweep\.optuna\.learning_rate': .*low <= high"),
                     ("train.sweep.optuna.alpha=[0.2,1.5]", r"train\.sweep\.optuna\.alpha\.1"),
                     ("train.sweep.optuna.alpha=[0.2]", r"train\.sweep\.optuna\.alpha"),
                     ("train.sweep.optuna.lora_r=[16,4]", r"train\.sweep\.optuna\.lora_r': .*low <= high"),
                     ("train.sweep.optuna.n_trials=0", r"train\.sweep\.optuna\.n_trials"),
                     ("train.sweep.method=random", r"train\.sweep\.method")):
        with pytest.raises(StillhouseError, match=key):
            load_config(tmp_path, [bad], required=False)


def test_lora_settings_need_lora_and_optuna_needs_its_package(tmp_path, monkeypatch):
    """Both are refused before anything slow runs (here: before the missing labels/ would be)."""
    from stillhouse.sweep import run

    with pytest.raises(StillhouseError, match=r"train\.sweep\.optuna\.lora_r: .*train\.lora\.enabled is false"):
        run(load_config(tmp_path, ["train.sweep.optuna.lora_r=[4,16]"], required=False))
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` meets when it is not installed
    with pytest.raises(StillhouseError, match=r"train\.sweep\.method=optuna needs optuna: pip install 'stillhouse\[sweep\]'"):
        run(load_config(tmp_path, ["train.sweep.method=optuna"], required=False))


def test_the_sweep_needs_labels_first(tmp_path):
    (tmp_path / "stillhouse.yaml").write_text("project: x\n")
    r = _cli(tmp_path, "train", "--sweep")
    assert r.returncode == 2 and "stillhouse -w" in r.stderr and "label" in r.stderr and "Traceback" not in r.stderr


def test_a_grid_over_lora_ranks(labeled, tmp_path_factory):
    ws = _copy(labeled, tmp_path_factory, "lora")
    args = ["--set", "train.lora.enabled=true", "--set", "train.sweep.lora_r=[2,4]", "--set", "train.sweep.lora_alpha=[8]",
            "--set", "train.sweep.temperature=[2]", "--set", "train.sweep.alpha=[0.5]",
            "--set", "train.sweep.learning_rate=[0.003]", "--set", "train.sweep.steps=4", "--set", "train.batch_size=4"]
    r = _cli(ws, "train", "--sweep", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((ws / "sweep" / "results.json").read_text())
    by_rank = {t["lora_r"]: t for t in report["trials"]}
    assert sorted(by_rank) == [2, 4] and all(t["lora_alpha"] == 8 and t["steps"] == 4 for t in by_rank.values())
    # the adapters had the trial's rank: LoRA adds r * (in + out) parameters per adapted layer, and nothing else trains
    assert by_rank[4]["trainable_parameters"] == 2 * by_rank[2]["trainable_parameters"] > 0
    best = report["trials"][0]
    assert f"--set train.lora.r={best['lora_r']} --set train.lora.alpha=8" in r.stderr
    assert "| LoRA r | LoRA alpha |" in (ws / "sweep" / "results.md").read_text()
    # train.lora.r is not part of a trial's identity when the sweep sets the rank: nothing is retrained
    r = _cli(ws, "train", "--sweep", *args, "--set", "train.lora.r=32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trial 1/2" not in r.stderr and "trial 2/2" not in r.stderr


def _trials(ws: Path) -> list[dict]:
    """Every trial folder, in the order the trials started: trial.json + result.json (if any) + validation rows."""
    out = []
    for d in sorted((ws / "sweep").glob("trial-*")):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
        result = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else None
        out.append({"dir": d, "spec": json.loads((d / "trial.json").read_text()), "result": result,
                    "evals": [(x["step"], x["val_score"]) for x in rows if "val_score" in x]})
    return out


def test_an_optuna_sweep_resumes_after_a_kill_and_picks_the_best(labeled, tmp_path_factory):
    ws = _copy(labeled, tmp_path_factory, "optuna")
    # one temperature, labels/' own (the grid above tests relabeling)
    args = ["train", "--sweep", *OPTUNA, "--set", "train.sweep.optuna.n_trials=3", "--set", "train.sweep.temperature=[2]"]
    # kill the sweep (SIGKILL: no clean-up) once the first trial is done and the second has a checkpoint
    log = ws.parent / "killed.log"  # (a file, not a pipe: nobody reads while it runs)
    with open(log, "w") as f:
        proc = subprocess.Popen(_command(ws, *args), env=ENV, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        trials = [d for d in (ws / "sweep").glob("trial-*")]
        if (any((d / "result.json").exists() for d in trials)
                and any((d / "resume" / "state.json").exists() and not (d / "result.json").exists() for d in trials)):
            break
        time.sleep(0.02)
    proc.kill()  # SIGKILL (nothing when it has ended)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the sweep ended before it could be killed: {log.read_text()[-2000:]}"
    before = _trials(ws)
    assert len(before) == 2 and before[0]["result"] and before[1]["result"] is None
    first_result = (before[0]["dir"] / "result.json").stat().st_mtime_ns

    r = _cli(ws, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trial 1/3:" not in r.stderr  # finished: not redone
    assert "trial 2/3:" in r.stderr and "resuming at step" in r.stderr  # the killed one continued from its checkpoint
    trials = _trials(ws)
    assert len(trials) == 3 and (trials[0]["dir"] / "result.json").stat().st_mtime_ns == first_result
    for t in trials:  # optuna's settings, inside the ranges; every evaluation logged once, up to the last step
        p = t["spec"]["params"]
        assert 1e-4 <= p["learning_rate"] <= 3e-2 and 0 <= p["alpha"] <= 0.9 and p["temperature"] == 2.0
        assert [s for s, _ in t["evals"]] == [2, 4, 6] and t["result"]["steps"] == 6
        assert t["result"]["val_score"] == round(max(v for _, v in t["evals"]), 4)
    report = json.loads((ws / "sweep" / "results.json").read_text())
    assert report["method"] == "optuna" and len(report["trials"]) == 3
    keys = [(-t["val_score"], t["val_loss"]) for t in report["trials"]]
    assert keys == sorted(keys) and report["best"] == report["trials"][0]
    assert report["set_flags"] in r.stderr and f"--set train.learning_rate={report['best']['learning_rate']:g}" in report["set_flags"]


def test_the_median_pruner_stops_trials_below_the_median_of_finished_ones(labeled, tmp_path_factory):
    ws = _copy(labeled, tmp_path_factory, "pruner")
    r = _cli(ws, "train", "--sweep", *OPTUNA, "--set", "train.sweep.optuna.n_trials=5",
             "--set", "train.sweep.optuna.pruner=median", "--set", "train.sweep.steps=8", "--set", "train.sweep.evals=4")
    assert r.returncode == 0, r.stderr[-2000:]
    startup = 2  # max(2, n_trials // 4): finished trials the pruner waits for; it never stops one at its last step
    finished, pruned = [], 0
    for t in _trials(ws):  # the median rule, recomputed from the logged evaluations, trial by trial
        expected_stop = None
        for i, (step, _) in enumerate(t["evals"]):
            best_so_far = max(v for _, v in t["evals"][: i + 1])
            if step < 8 and len(finished) >= startup and best_so_far < statistics.median(dict(f)[step] for f in finished):
                expected_stop = step
                break
        assert t["result"]["pruned"] == (expected_stop is not None), t
        assert t["evals"][-1][0] == (expected_stop or 8)
        if expected_stop:
            pruned += 1
        else:
            finished.append(t["evals"])
    assert pruned, "no trial was pruned: widen train.sweep.optuna.learning_rate so scores differ"
    table = (ws / "sweep" / "results.md").read_text()
    assert table.count("(pruned)") == pruned and "median pruner" in table
    assert not json.loads((ws / "sweep" / "results.json").read_text())["best"]["pruned"]
