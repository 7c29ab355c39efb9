"""Benchmark: wall time of `eval` and `redteam` on a quick demo workspace, the cost of canary scoring on the
demo student, and the exposure figures of the canary test (tests/test_redteam.py).

    .venv/bin/python bench/redteam.py [--workspace DIR]

Builds the quick demo (the real CLI, in a subprocess), re-runs eval and redteam from scratch (timed, each in
its own process, as a user would), then again with canaries planted as controls (never trained on: the
student's training is untouched, only the 10,000-candidate ranking is timed). Prints a table and appends it
to docs/benchmarks.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "STILLHOUSE_QUIET": "1"}


def _stage(ws: Path, stage: str, *sets: str) -> float:
    """Run one stage from scratch in a subprocess; wall seconds."""
    shutil.rmtree(ws / stage, ignore_errors=True)
    cmd = [sys.executable, "-m", "stillhouse", "-w", str(ws), stage, *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path)
    args = ap.parse_args()
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="stillhouse-bench-")) / "demo"
    if ws.exists():
        shutil.rmtree(ws)
    subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), "demo", "--quick"], check=True, env=ENV,
                   stdout=subprocess.DEVNULL)

    rows = [("eval", _stage(ws, "eval")), ("redteam", _stage(ws, "redteam"))]
    red = json.loads((ws / "redteam" / "report.json").read_text())
    sys.path.insert(0, str(ROOT / "src"))
    from stillhouse.config import CanaryConfig
    from stillhouse.stages.prep import canary_records
    from stillhouse.workspace import atomic_write_json

    _, controls = canary_records(CanaryConfig(enabled=True, repetitions=[0, 0, 0]))
    atomic_write_json(ws / "data" / "canaries_private.json", controls)
    rows.append(("redteam + 3 control canaries x 10,000 candidates", _stage(ws, "redteam")))
    red_c = json.loads((ws / "redteam" / "report.json").read_text())

    # the canary test: a tiny model trained on canaries inserted 50x, 1x and never (prints its exposures)
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", str(ROOT / "tests" / "test_redteam.py"),
                           "-k", "memorized_canary"], capture_output=True, text=True, cwd=ROOT, env=ENV)
    found = re.search(r"exposure by repetitions: (\{[^}]*\}) MIA AUC: ([\d.]+)", test.stdout)
    exposures = found.group(1) if found else f"(test did not print them; exit {test.returncode})"
    mia = found.group(2) if found else "-"

    lines = [
        "### eval and redteam: wall time on the quick demo (tiny random models); canary exposure",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, no GPU",
        "- command: `.venv/bin/python bench/redteam.py` (fresh `stillhouse demo --quick` workspace; each stage re-run "
        "from scratch in its own process)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {sec:.1f} |" for name, sec in rows),
        "",
        f"- quick demo redteam: verdict {red['verdict']}, membership-inference AUC {red['membership_inference']['auc']} "
        f"({red['membership_inference']['records']} records), PII leaks {red['pii']['leaked_values']}",
        f"- control canaries on the demo student (never trained on): exposure "
        f"{[c['exposure'] for c in red_c['canaries']['canaries']]} bits (chance: ~1.4 on average)",
        f"- canary test (tests/test_redteam.py, tiny 2-layer model, 80 steps of batch 8 on 12 records + canaries): "
        f"exposure by times in train {exposures} bits of at most 13.29 (10,000 candidates); membership-inference "
        f"AUC {mia}",
        "",
    ]
    publish(lines)


if __name__ == "__main__":
    main()
