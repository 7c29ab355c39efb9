"""Benchmark: tokens/s of the whole training loop (`training.fit`), offline soft labels vs the online teacher.

    .venv/bin/python bench/train_loop.py [--rounds 2] [--steps 6] [--workspace WS]

SmolLM2-135M-Instruct teacher, a 6-layer student derived from it, batch 8 of the quick demo's labeled records
(<= 64 tokens), bf16 autocast, loss chunks of 1,024 tokens. Rows: offline top-32 KD through `fit` as it was before
the accelerate/online-teacher change (read from git: HEAD's training.py, or --before REV), the same through
today's `fit`, today's `fit` with the teacher online (dense KD over all V tokens, chunked), and online plus
hidden-state alignment (uniform map, MSE). tokens/s is what `fit` logs per step in metrics.jsonl (evaluation
and checkpoints excluded), median over the steps after 2 warm-up steps; the variants run interleaved, `--rounds`
rounds, each on a fresh student; the table gives the median over rounds. Appends the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
TOPK, T = 32, 2.0


def _fit_before(rev: str):
    """`fit` from training.py at git revision `rev`, imported as its own module."""
    source = subprocess.run(["git", "show", f"{rev}:src/stillhouse/training.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "training_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("training_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["training_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(rounds: int, steps: int, workspace: Path | None, before: str, only: list[str] | None) -> list[str]:
    import torch

    from stillhouse import training
    from stillhouse.models import derive_student, load_model, load_tokenizer, resolve_model
    from stillhouse.softlabels import topk_logprobs
    from stillhouse.workspace import read_jsonl

    os.environ["STILLHOUSE_QUIET"] = "1"
    if workspace is None:  # the quick demo's records (data only; its models are not used)
        workspace = Path(tempfile.mkdtemp(prefix="stillhouse-bench-")) / "demo"
        subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(workspace), "demo", "--quick"], check=True,
                       env={**os.environ}, capture_output=True)
    src = resolve_model("asset:smollm2-135m-instruct")
    tok, teacher = load_tokenizer(src), load_model(src)
    examples = training.labeled_examples(tok, read_jsonl(workspace / "data" / "train.jsonl"), max_seq_len=64)[:64]
    labeled = []  # offline labels as `stillhouse label` stores them: top-k at T over the full vocabulary
    with torch.no_grad():
        for e in examples:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden, head = training.response_hidden(teacher, training.collate([e], tok.pad_token_id))
            ids, lps = topk_logprobs(hidden.float() @ head.float().T, TOPK, T)
            labeled.append(training.Example(e.record_id, e.input_ids, e.prompt_len, e.task, ids, lps))
    plain = [training.Example(e.record_id, e.input_ids, e.prompt_len, e.task) for e in labeled]
    old = _fit_before(before)
    student0, _ = derive_student(teacher, 6)

    def params(module, **kw):
        return module.FitParams(steps=steps + 2, batch_size=8, learning_rate=1e-4, warmup_steps=1, alpha=0.5,
                                temperature=T, eval_every_steps=10_000, eval_samples=0, **kw)

    variants = {
        "before": (f"offline top-{TOPK} KD, `fit` before this change ({before})",
                   lambda s, out: old.fit(s, tok, labeled, [], params(old), out, {})),
        "offline": (f"offline top-{TOPK} KD, `fit` now",
                    lambda s, out: training.fit(s, tok, labeled, [], params(training), out, {})),
        "online": ("online teacher (dense KD over all V tokens, chunked), `fit` now",
                   lambda s, out: training.fit(s, tok, plain, [], params(training), out, {}, teacher=teacher)),
        "align": ("online teacher + hidden-state alignment (6 layers, MSE), `fit` now",
                  lambda s, out: training.fit(s, tok, plain, [], params(
                      training, align_layers=training.uniform_layer_map(6, 30), align_weight=1.0), out, {},
                      teacher=teacher)),
    }
    variants = {k: v for k, v in variants.items() if not only or k in only}
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = list(variants)[r % len(variants):] + list(variants)[: r % len(variants)]
        for name in order:
            with tempfile.TemporaryDirectory() as out:
                variants[name][1](copy.deepcopy(student0), Path(out))
                rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            per_step = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row][2:]
            rates[name].append(statistics.median(per_step))
            print(f"round {r}: {name} {rates[name][-1]:.1f} tokens/s", flush=True)
    med = {v: statistics.median(x) for v, x in rates.items()}
    mean_len = sum(len(e.input_ids) for e in labeled) / len(labeled)
    lines = ["### train loop: tokens/s of `fit`, offline soft labels vs the online teacher", "",
             f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores "
             f"(shared; runs serialized with flock), Python {platform.python_version()}, no GPU",
             f"- command: `.venv/bin/python bench/train_loop.py --rounds {rounds} --steps {steps} --before {before}"
             + (f" --only {','.join(only)}`" if only else "`"),
             f"- teacher SmolLM2-135M-Instruct (30 layers), student 6 of its layers; batch 8 x {mean_len:.0f} tokens on "
             f"average; bf16 autocast; loss chunk 1,024; tokens/s per step as `fit` logs it, median of {steps} steps "
             f"after 2 warm-up steps, then the median over {rounds} interleaved rounds",
             "", "| variant | tokens/s (median) | per round | vs offline KD before |", "|---|---|---|---|"]
    for name, (label, _) in variants.items():
        lines.append(f"| {label} | {med[name]:.1f} | {', '.join(f'{x:.0f}' for x in rates[name])} | "
                     f"{med[name] / med['before']:.2f}x |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all the variants")
    ap.add_argument("--workspace", type=Path, help="a quick-demo workspace whose data/ to use (default: make one)")
    ap.add_argument("--before", default="HEAD", help="git revision whose training.py is the 'before' row")
    ap.add_argument("--only", help="comma-separated variants to run: before,offline,online,align (default: all)")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else None
    publish(run(args.rounds, args.steps, args.workspace, args.before, only))


if __name__ == "__main__":
    main()
