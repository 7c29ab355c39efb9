"""Benchmark: `train --sweep` on the demo workspace: grid vs optuna at the same number of trials, and what a trial costs.

    .venv/bin/python bench/sweep.py --workspace WS --method grid     # then
    .venv/bin/python bench/sweep.py --workspace WS --method optuna   # prints the table, appends it to docs/benchmarks.md

WS is a full demo workspace (`stillhouse demo`, or its stages up to label), read and never written: its
stillhouse.yaml, data/, labels/ and student/init/ are copied to OUT/ws once, and the sweeps run there at the
labels' own temperature (no relabeling). The grid is alpha {0, 0.5} x learning rate {3e-4, 1e-3} (4 trials); optuna
draws as many within alpha [0, 0.9] x learning rate [1e-4, 3e-3] (TPE, seed 0; the first 2 at random). Every trial
is `--steps` steps of the workspace's train settings, scored by its best of 2 validation evaluations. One method per
call keeps each call within a few minutes; a call killed on the way continues when run again (the sweep resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "grid": ["train.sweep.method=grid", "train.sweep.alpha=[0,0.5]", "train.sweep.learning_rate=[3.0e-4,1.0e-3]"],
    "optuna": ["train.sweep.method=optuna", "train.sweep.optuna.n_trials=4", "train.sweep.optuna.alpha=[0,0.9]",
               "train.sweep.optuna.learning_rate=[1.0e-4,3.0e-3]"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path, default=ROOT / "stillhouse-demo")
    ap.add_argument("--method", choices=sorted(SETTINGS), required=True)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per trial")
    ap.add_argument("--out", type=Path, default=Path("/tmp/stillhouse-bench-sweep"))
    args = ap.parse_args()

    from stillhouse.config import load_config
    from stillhouse.sweep import run
    from stillhouse.workspace import atomic_write_json, read_jsonl, require_manifest

    src, ws = args.workspace.resolve(), args.out / "ws"
    if not ws.exists():  # only what the sweep reads; the copy keeps WS untouched
        tmp = args.out / "ws.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("data", "labels", "student/init"):
            shutil.copytree(src / part, tmp / part)
        shutil.copy(src / "stillhouse.yaml", tmp / "stillhouse.yaml")
        tmp.rename(ws)
    labels = require_manifest(ws, "label", "bench/sweep.py")
    common = [f"train.sweep.temperature=[{labels['temperature']}]", f"train.sweep.steps={args.steps}",
              "train.sweep.evals=2", "train.seed=0"]
    cfg = load_config(ws, common + SETTINGS[args.method])
    report = run(cfg)
    saved = args.out / f"report-{args.method}.json"
    first_time = not saved.exists()
    atomic_write_json(saved, report)
    reports = {m: json.loads((args.out / f"report-{m}.json").read_text())
               for m in SETTINGS if (args.out / f"report-{m}.json").exists()}
    if len(reports) < len(SETTINGS):
        print(f"saved {saved}; run the other method to get the table", flush=True)
        return
    tc = cfg.train
    lines = ["### train --sweep: grid vs optuna at 4 trials each on the demo workspace", "",
             f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared; "
             f"runs serialized with flock), Python {platform.python_version()}, no GPU",
             "- command: `.venv/bin/python bench/sweep.py --workspace WS --method grid`, then `--method optuna` "
             "(WS: a full `stillhouse demo` workspace)",
             f"- student: the demo's 6-layer derived student (student/init); {args.steps} steps of batch "
             f"{tc.batch_size} per trial, 2 evaluations; {len(read_jsonl(ws / 'labels' / 'sequences.jsonl'))} "
             f"training sequences, top-{labels['topk']} soft labels at T = {labels['temperature']:g}; val score: mean "
             f"over tasks of the validation metric on {len(read_jsonl(ws / 'data' / 'val.jsonl'))} val records "
             "(one seed: differences of a few points are noise)",
             "- grid: alpha {0, 0.5} x lr {3e-4, 1e-3}; optuna: TPE (seed 0, first 2 trials random) within alpha "
             "[0, 0.9] x lr [1e-4, 3e-3] (log)", "",
             "| method | trials | best val score | best settings | val scores (best first) | s per trial (mean) |",
             "|---|---|---|---|---|---|"]
    for method, rep in reports.items():
        trials = rep["trials"]
        scores = ", ".join(f"{t['val_score']:.3f}" for t in trials)
        seconds = statistics.mean(t["train_seconds"] for t in trials)
        lines.append(f"| {method} | {len(trials)} | {rep['best']['val_score']:.3f} | `{rep['set_flags']}` | {scores} | "
                     f"{seconds:.0f} |")
    publish(lines + [""], append=first_time)  # the call that completed the pair appends; later calls only print


if __name__ == "__main__":
    main()
