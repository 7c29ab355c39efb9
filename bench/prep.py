"""Benchmark: throughput of the whole prep stage (extract, clean, dedup, PII, split, review) in files and MB per
second, with 1 and 2 worker processes, and a resumed run that finds every extraction cached.

    .venv/bin/python bench/prep.py [--sites 40] [--scaling 40,400,1200]

The corpus is the demo's sample data (`demo_data.write_demo_sources(quick=True)`) written once per "site" with
a different seed: per site two PDFs, a DOCX, an HTML page, a Markdown FAQ, a tickets CSV, two intent JSONL files
and a corrupt PDF (quarantined), so 9 files per site. Each run is the real CLI (`.venv/bin/stillhouse prep`) in
its own process, from scratch (data/ deleted); the resumed one follows a run killed (SIGKILL) once every file
was extracted. Peak RSS is the stage process's (ru_maxrss from wait4; it covers the largest of itself and the
workers it waited for). Prints a table and appends it to docs/benchmarks.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "STILLHOUSE_QUIET": "1"}


def _prep(ws: Path, workers: int, resume: bool = False) -> tuple[float, dict]:
    """One `stillhouse prep` from scratch in its own process; (wall seconds, report.json). resume: first crash
    one (SIGKILL) once every file's extraction is cached, then time the run that picks up from there."""
    shutil.rmtree(ws / "data", ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "stillhouse"), "-w", str(ws), "prep", "--set", f"prep.workers={workers}"]
    if resume:
        n_files = sum(p.is_file() for p in (ws / "sources").rglob("*"))
        cache = ws / "data" / "resume" / "extract"
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (cache.exists() and sum(f.suffix == ".json" for f in cache.iterdir()) >= n_files):
            if proc.poll() is not None:
                raise SystemExit("prep finished before it could be killed; rerun")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS (KiB on Linux)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prep failed (exit {os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    wall = time.time() - t0
    rep = json.loads((ws / "data" / "report.json").read_text())
    rep["peak_rss_mb"] = usage.ru_maxrss / 1024  # the largest of the stage process and the workers it waited for
    return wall, rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=40, help="copies of the demo sources, each with its own seed")
    ap.add_argument("--scaling", default="", help="also: site counts (e.g. 40,400,1200) for a table of peak memory "
                                                  "against corpus size (1 worker each)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import yaml

    from stillhouse.demo_data import demo_table_mappings, write_demo_sources

    ws = Path(tempfile.mkdtemp(prefix="stillhouse-bench-prep-"))
    for k in range(args.sites):
        write_demo_sources(ws / "sources" / f"site-{k:03d}", quick=True, seed=k)
    (ws / "stillhouse.yaml").write_text(yaml.safe_dump({"prep": {"tables": demo_table_mappings(), "review_sample_size": 50}}))
    files = [p for p in (ws / "sources").rglob("*") if p.is_file()]
    mb = sum(p.stat().st_size for p in files) / 2**20

    rows = []
    for label, workers, resume in (("1 worker", 1, False), ("2 workers", 2, False),
                                   ("2 workers, resumed after SIGKILL (all files cached)", 2, True)):
        wall, rep = _prep(ws, workers, resume)
        rows.append((label, wall, rep["seconds"]["extract"], rep["extract"]["cached"], rep))
    rep = rows[0][4]
    lines = [
        "### prep: whole-stage throughput (extract, clean, dedup, PII, split, review)",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores "
        f"(shared with other jobs), Python {platform.python_version()}",
        f"- command: `.venv/bin/python bench/prep.py --sites {args.sites}{' --scaling ' + args.scaling if args.scaling else ''}` "
        f"(each run: `stillhouse prep` in its own process)",
        f"- corpus: the quick demo sources x {args.sites} seeds: {len(files)} files, {mb:.1f} MB "
        f"({json.dumps(rep['extract']['by_type'])}); {rep['extract']['documents']} documents, "
        f"{rep['extract']['table_rows']} table rows, {rep['extract']['quarantined']} quarantined -> "
        f"{sum(rep['split'][s] for s in ('train', 'val', 'test'))} records",
        "",
        "| run | wall s | files/s | MB/s | extract s | extract files/s | cached files | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {label} | {wall:.1f} | {len(files) / wall:.1f} | {mb / wall:.2f} | {ext:.1f} | {len(files) / max(ext, 1e-9):.1f} "
          f"| {cached} | {r['peak_rss_mb']:.0f} |" for label, wall, ext, cached, r in rows),
        "",
        f"- where the rest of the time goes (1 worker, seconds): {json.dumps(rep['seconds'])}",
        "",
    ]
    shutil.rmtree(ws)
    if args.scaling:
        lines += _scaling([int(x) for x in args.scaling.split(",")], demo_table_mappings, write_demo_sources, yaml)
    publish(lines)


def _scaling(counts: list[int], mappings, write_sources, yaml) -> list[str]:
    """Peak RSS of one 1-worker `stillhouse prep` per corpus size: the same sites, more of them."""
    ws = Path(tempfile.mkdtemp(prefix="stillhouse-bench-prep-scale-"))
    (ws / "stillhouse.yaml").write_text(yaml.safe_dump({"prep": {"tables": mappings(), "review_sample_size": 50}}))
    rows, made = [], 0
    for count in sorted(counts):
        for k in range(made, count):
            write_sources(ws / "sources" / f"site-{k:04d}", quick=True, seed=k)
        made = count
        mb = sum(p.stat().st_size for p in (ws / "sources").rglob("*") if p.is_file()) / 2**20
        wall, rep = _prep(ws, 1)
        records = sum(rep["split"][s] for s in ("train", "val", "test"))
        rows.append(f"| {count} | {mb:.1f} | {rep['dedup']['input']} | {records} | {wall:.1f} | {rep['seconds']['dedup']:.1f} "
                    f"| {rep['dedup']['exact_jaccard_checks']} | {rep['peak_rss_mb']:.0f} |")
    shutil.rmtree(ws)
    return ["Peak memory against corpus size (1 worker; records are spooled to disk between the steps, so memory "
            "holds per-record signatures and bookkeeping, plus dedup's candidate pairs):", "",
            "| sites | source MB | records made | records out | wall s | dedup s | exact Jaccard checks | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


if __name__ == "__main__":
    main()
