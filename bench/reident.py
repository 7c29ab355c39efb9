"""Benchmark: the re-identification report (prep.reident) on the demo corpus, for each action.

    .venv/bin/python bench/reident.py [--quick] [--no-append]

Writes the demo's sample sources (stillhouse.demo_data, as `stillhouse demo` does), runs `stillhouse prep` on
them through the real CLI with action report, generalize and drop (k=5, every QI kind), and prints the counts
from data/report.json: records, records with quasi-identifiers, records assessed (>= 2 kinds), records below
k, their kind combinations, values generalized, records dropped, prep wall time. Appends the table to
docs/benchmarks.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "STILLHOUSE_QUIET": "1"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the quick demo's smaller corpus")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from stillhouse.demo_data import demo_table_mappings, write_demo_sources

    base = Path(tempfile.mkdtemp(prefix="stillhouse-reident-"))
    rows = []
    for action in ("report", "generalize", "drop"):
        ws = base / action
        write_demo_sources(ws / "sources", quick=args.quick)
        (ws / "stillhouse.yaml").write_text(yaml.safe_dump({"prep": {"tables": demo_table_mappings()}}))
        t = time.time()
        subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), "prep", "--set", f"prep.reident.action={action}"],
                       check=True, env=ENV, stdout=subprocess.DEVNULL)
        seconds = time.time() - t
        report = json.loads((ws / "data" / "report.json").read_text())
        r = report["reident"]
        rows.append((action, sum(report["split"][s] for s in ("train", "val", "test")), r["records_with_qis"],
                     r["records_assessed"], r["records_below_k"], ", ".join(f"{k} {n}" for k, n in r["by_kinds"].items()) or "-",
                     r.get("values_generalized", "-"), r.get("dropped", "-"), seconds))
    qis = ", ".join(f"{k} {n}" for k, n in r["qis_by_kind"].items())
    lines = [
        "### prep: re-identification risk on the demo corpus (k=5, every quasi-identifier kind)",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, no GPU",
        f"- command: `.venv/bin/python bench/reident.py{' --quick' if args.quick else ''}` (demo sources from "
        f"stillhouse.demo_data{', quick' if args.quick else ''}; `stillhouse prep --set prep.reident.action=...`)",
        f"- quasi-identifiers found (after PII masking): {qis}",
        "",
        "| action | records written | with QIs | assessed (>= 2 kinds) | below k | kind combinations below k | values generalized | dropped | prep s |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {a} | {n} | {w} | {s} | {b} | {c} | {g} | {d} | {sec:.1f} |" for a, n, w, s, b, c, g, d, sec in rows),
        "",
    ]
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
