"""Benchmark: wall time of every stage of `stillhouse demo` on this machine.

    .venv/bin/python bench/demo_stages.py [--quick] [--workspace DIR]

Runs the demo in a fresh workspace (the real CLI, in a subprocess), prints a table and appends it to
docs/benchmarks.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workspace", type=Path)
    args = ap.parse_args()
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="stillhouse-bench-")) / "demo"
    if ws.exists():
        shutil.rmtree(ws)
    cmd = [sys.executable, "-m", "stillhouse", "-w", str(ws), "demo"] + (["--quick"] if args.quick else [])
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "STILLHOUSE_QUIET": "1"})
    wall = time.time() - t0
    summary = json.loads((ws / "demo-summary.json").read_text())
    seconds = summary["seconds"]
    ev = summary.get("eval", {})
    lines = [
        f"### `stillhouse demo{' --quick' if args.quick else ''}`: wall time per stage",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, no GPU",
        f"- command: `.venv/bin/python bench/demo_stages.py{' --quick' if args.quick else ''}` (fresh workspace)",
        f"- process wall time: {wall:.0f} s",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in seconds.items()],
        "",
    ]
    cost = ev.get("models", {})
    if cost:
        names = list(cost)
        lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key in ("parameters", "size_mb", "latency_ms_p50", "latency_ms_p95", "tokens_per_s_batch1", "tokens_per_s_batched", "peak_rss_mb"):
            lines.append(f"| {key} | " + " | ".join(str(cost[n].get(key, "-")) for n in names) + " |")
        for task, t in ev.get("tasks", {}).items():
            lines.append(f"| {task} {t['metric']} (n={t['n']}) | " + " | ".join(str(t.get(n, "-")) for n in names) + " |")
        lines += ["", "retention (student / teacher, bootstrap 95% CI): " + ", ".join(
            f"{task} {t.get('retention')} {t.get('retention_ci95')}" for task, t in ev.get("tasks", {}).items()), ""]
    publish(lines)


if __name__ == "__main__":
    main()
