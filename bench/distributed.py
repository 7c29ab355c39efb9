"""Benchmark: `stillhouse train` on 1 process, and on 2 processes under `accelerate launch` with DDP and FSDP2.

    .venv/bin/python bench/distributed.py [--steps 12] [--workspace WS]

The quick demo's workspace (tiny random Llama student over the real tokenizer; built first unless --workspace is
given), the same effective batch everywhere: 1 process with train.grad_accum_steps=2, 2 processes with 1 each
(examples/accelerate/ddp.yaml and fsdp.yaml). Reports the command's wall time (process start, imports, the
process group and checkpoints included), the loop's tokens/s from the manifest, and the bytes of parameters the
main process holds (FSDP: its shards), which shows that FSDP sharded. On a 2-core CPU two processes share the
cores the single one uses alone, so this measures overhead and sharding, not speed-up. Appends a table to
docs/benchmarks.md with the date, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import append_to_docs  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> float:
    t0 = time.time()
    r = subprocess.run(cmd, env={**os.environ, "STILLHOUSE_QUIET": "1"}, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workspace", type=Path, help="a quick-demo workspace (default: build one)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    demo = args.workspace or tmp / "demo"
    if args.workspace is None:
        _run([sys.executable, "-m", "stillhouse", "-w", str(demo), "demo", "--quick"])
    common = ["train", "--set", f"train.steps={args.steps}", "--set", f"train.eval_every_steps={args.steps}",
              "--set", "train.batch_size=4"]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    rows = []
    for name in ("1 process, grad_accum_steps=2", "2 processes, DDP", "2 processes, FSDP2"):
        ws = tmp / name.split(",")[-1].strip().replace("=", "")
        shutil.copytree(demo, ws, ignore=shutil.ignore_patterns("student"))
        if name.startswith("1"):
            cmd = [sys.executable, "-m", "stillhouse", "-w", str(ws), *common, "--set", "train.grad_accum_steps=2"]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            config = ROOT / "examples" / "accelerate" / ("fsdp.yaml" if "FSDP" in name else "ddp.yaml")
            cmd = [accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "--main_process_port",
                   str(port), "-m", "stillhouse", "-w", str(ws), *common]
        wall = _run(cmd)
        m = json.loads((ws / "student" / "manifest.json").read_text())["metrics"]
        rows.append((name, wall, m["train_tokens_per_second"], m["parameter_bytes_main_process"],
                     4 * m["parameters"], m["distributed"]))
    shutil.rmtree(tmp, ignore_errors=True)

    table = ["| run | distributed | wall s (whole command) | loop tokens/s | parameter bytes on the main process |",
             "|---|---|---|---|---|"]
    for name, wall, tps, held, full, kind in rows:
        table.append(f"| {name} | {kind} | {wall:.1f} | {tps:,.0f} | {held:,} ({held / full:.1%} of {full:,}) |")
    print("\n".join(table))
    import torch

    append_to_docs("\n".join([
        "### Training on several processes: 1 process vs DDP vs FSDP2 (`accelerate launch`)", "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared; "
        f"run under flock), torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `.venv/bin/python bench/distributed.py --steps {args.steps}"
        + (" --workspace WS` (WS: a `stillhouse demo --quick` workspace)" if args.workspace else "`"),
        f"- quick-demo student (tiny random Llama, fp32), {args.steps} steps of 2 micro-batches of 4 sequences, one "
        f"evaluation and checkpoint at the end; 2 processes over gloo, 1 thread each", "",
        *table, "",
        "FSDP2 holds half of the parameters in each process (what it is for: a student that does not fit one GPU); "
        "on 2 shared CPU cores neither launch is faster than one process, and the wall time is mostly process start "
        "and imports. GPU numbers were not measured here.",
    ]))


if __name__ == "__main__":
    main()
