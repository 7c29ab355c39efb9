"""Benchmark: teacher-written QA pairs from document sections (`prep.document_qa`): yield and time.

    .venv/bin/python bench/docqa.py [--files faq.md,expense-policy.docx] [--questions 2]

The demo's documents (quick versions) go through the real `stillhouse prep` with the SmolLM2-135M-Instruct teacher
writing `--questions` questions per section (sampled at T 0.7) and answering each from the section. Reports
sections, questions asked, pairs kept, the rejection reasons, seconds per section, and a few kept pairs to read.
A 135M teacher is a weak question writer; the point is what the grounding filter keeps and what it costs.
Prints a table and appends it to docs/benchmarks.md with the machine, the date and the command.
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
    ap.add_argument("--files", default="faq.md,expense-policy.docx", help="demo documents to use (comma-separated)")
    ap.add_argument("--questions", type=int, default=2, help="questions per section")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import yaml

    from stillhouse.demo_data import write_demo_sources
    from stillhouse.workspace import read_jsonl

    ws = Path(tempfile.mkdtemp(prefix="stillhouse-bench-docqa-"))
    everything = ws / "all"
    write_demo_sources(everything, quick=True, seed=0)
    (ws / "sources").mkdir()
    for name in args.files.split(","):
        shutil.copy(everything / name, ws / "sources" / name)
    (ws / "stillhouse.yaml").write_text(yaml.safe_dump({"prep": {"document_qa": {
        "enabled": True, "questions_per_section": args.questions}}}))
    t0 = time.time()
    subprocess.run([str(Path(sys.executable).parent / "stillhouse"), "-w", str(ws), "prep"], check=True,
                   env={**os.environ, "STILLHOUSE_QUIET": "1"}, capture_output=True)
    wall = time.time() - t0
    rep = json.loads((ws / "data" / "report.json").read_text())
    dq, secs = rep["document_qa"], rep["seconds"]["document_qa"]
    pairs = [r for s in ("train", "val", "test") for r in read_jsonl(ws / "data" / f"{s}.jsonl") if r["task"] == "qa"]
    lines = [
        "### prep: teacher-written QA pairs from document sections (`prep.document_qa`)",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, no GPU",
        f"- command: `.venv/bin/python bench/docqa.py --files {args.files} --questions {args.questions}` "
        f"(the real `stillhouse prep`; teacher SmolLM2-135M-Instruct, fp32 weights, bf16 autocast, greedy answers)",
        "",
        "| sections | questions asked | pairs kept | kept share | teacher QA s | s per section | prep wall s |",
        "|---|---|---|---|---|---|---|",
        f"| {dq['sections']} | {dq['asked']} | {dq['kept']} | {dq['kept'] / max(dq['asked'], 1):.0%} | {secs:.1f} "
        f"| {secs / max(dq['sections'], 1):.1f} | {wall:.1f} |",
        "",
        f"- rejected, by reason: {json.dumps(dq['rejected'])}",
        "- kept pairs (first 4): " + "; ".join(
            f"Q \"{p['messages'][0]['content']}\" A \"{p['messages'][1]['content'][:120]}\"" for p in pairs[:4]),
        "",
    ]
    publish(lines, append=not args.no_append)
    shutil.rmtree(ws)


if __name__ == "__main__":
    main()
