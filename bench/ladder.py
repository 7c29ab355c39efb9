"""Benchmark: the student-size ladder on the demo's task (accuracy and latency per size).

    .venv/bin/python bench/ladder.py --from DEMO_WS --workspace WS --rungs 2          # one rung (a few minutes)
    .venv/bin/python bench/ladder.py --workspace WS --rungs 2 4 6 --append             # more rungs; table -> docs

`--from`: a finished full `stillhouse demo` workspace whose data/, labels/ and adapted teacher (teacher/best) are
copied into WS once, so the ladder reuses them instead of re-running prep, adapt and label (`run_ladder(...,
prepare=False)`). Every rung is trained with the demo's budget (train.steps etc. from its stillhouse.yaml) and
evaluated the same way; finished rungs are skipped, so the rungs can be run one invocation at a time on a shared
machine. Prints the ladder's table; `--append` adds it to docs/benchmarks.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def _copy_demo(src: Path, ws: Path) -> None:
    if (ws / "labels" / "manifest.json").exists():
        return
    ws.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "stillhouse.yaml", ws / "stillhouse.yaml")
    for name in ("data", "labels"):
        shutil.copytree(src / name, ws / name, symlinks=True)
    (ws / "teacher").mkdir(exist_ok=True)
    shutil.copytree(src / "teacher" / "best", ws / "teacher" / "best")
    shutil.copy2(src / "teacher" / "manifest.json", ws / "teacher" / "manifest.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", type=Path, help="a finished full demo workspace to take data and labels from")
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--rungs", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--append", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from stillhouse.config import load_config
    from stillhouse.ladder import run_ladder

    if args.src:
        _copy_demo(args.src, args.workspace)
    t0 = time.time()
    out = run_ladder(load_config(args.workspace), args.rungs, prepare=False)
    seconds = time.time() - t0
    ws = args.workspace

    def stage_seconds(rung: str, stage: str) -> float:
        return json.loads((ws / "ladder" / rung / stage / "manifest.json").read_text()).get("seconds", 0.0)

    tasks = [t for t in out["rungs"][0]["tasks"]]
    lines = [
        "### `stillhouse ladder`: accuracy and latency per student size on the demo's task",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, no GPU (shared by other jobs: times are indicative)",
        f"- command: `.venv/bin/python bench/ladder.py --workspace WS --rungs {' '.join(map(str, args.rungs))}` on the data, "
        "labels and adapted teacher (SmolLM2-135M-Instruct, 30 layers) of a full `stillhouse demo` workspace",
        f"- same budget per rung: {', '.join(f'train.{k}={v}' for k, v in out['budget'].items())}; "
        "students derived from the adapted teacher (uniform layers)",
        "",
        "| rung | parameters (M) | latency p50 (ms) | latency p95 (ms) | "
        + " | ".join(f"{t} {out['rungs'][0]['tasks'][t]['metric']} [retention]" for t in tasks)
        + " | train s | eval s |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for r in out["rungs"]:
        scores = [f"{r['tasks'][t]['score']:.3f} [{r['tasks'][t]['retention']:.2f}]" if r["tasks"][t]["retention"] is not None
                  else f"{r['tasks'][t]['score']:.3f}" for t in tasks]
        lines.append(f"| {r['rung']} | {r['parameters'] / 1e6:.1f} | {r['latency_ms_p50']:.0f} | {r['latency_ms_p95']:.0f} | "
                     + " | ".join(scores) + f" | {stage_seconds(r['rung'], 'student'):.0f} | {stage_seconds(r['rung'], 'eval'):.0f} |")
    t = out["teacher"]
    lines.append(f"| teacher | {t['parameters'] / 1e6:.1f} | {t['latency_ms_p50']:.0f} | {t['latency_ms_p95']:.0f} | "
                 + " | ".join(f"{t['scores'][task]:.3f}" for task in tasks) + " | | |")
    lines += ["", f"- smallest rung meeting the requirements (eval.min_retention={out['requirements']['min_retention']}, "
              f"eval.max_latency_ms_p95={out['requirements']['max_latency_ms_p95']}): {out['smallest_meeting_requirements']}",
              f"- this invocation: {seconds:.0f} s (finished rungs are skipped)", ""]
    publish(lines, append=args.append)


if __name__ == "__main__":
    main()
