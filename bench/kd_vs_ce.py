"""Benchmark: does soft-label KD beat plain cross-entropy on the demo's intent task? Several seeds.

    .venv/bin/python bench/kd_vs_ce.py --workspace WS [--seeds 0,1,2] [--max-trainings 2] [--out DIR]

WS is a full demo workspace (`stillhouse demo`, or its stages prep, adapt and label): its adapted teacher
(teacher/best), data/ and labels/ are read, never written. For every seed, the same 6-layer student derived from
that teacher trains twice with the demo's train settings (steps, batch, learning rate) on the same sequences
(labels/sequences.jsonl: the true labels plus the teacher's responses to the unlabeled pool), in the same order:

    kd  alpha 0.5 at the labels' temperature (soft top-k labels + CE), what `stillhouse train` does in the demo
    ce  alpha 0: cross-entropy only on the same sequences (sequence-level KD on the teacher-written part)

Both are scored on the test split's classification records (intent exact match: a greedy decode reproduces the
reference iff the argmax at every response position is the reference token, so one forward pass decides it), at
the best checkpoint by the validation metric (what `train` hands on) and at the final step; the teacher is
scored the same way. Retention = student accuracy / teacher accuracy.

A training takes minutes on 2 shared cores, so the script runs at most `--max-trainings` trainings per call and
keeps every result in OUT/results.json: call it again (each call under the CPU lock) until it prints the table,
which it then appends to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"kd": "KD: alpha 0.5 (soft top-k labels + CE)", "ce": "CE only: alpha 0 (same sequences)"}


def _accuracy(model, examples, pad_id) -> float:
    from stillhouse.training import evaluate

    return evaluate(model, examples, pad_id)["val_score_by_task"]["classification"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path, default=ROOT / "stillhouse-demo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-trainings", type=int, default=2, help="trainings in this call (results are cached)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/stillhouse-kd-vs-ce"))
    ap.add_argument("--steps", type=int, help="override train.steps (a smoke run; default: the workspace's)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    from stillhouse.config import load_config
    from stillhouse.models import load_model, load_tokenizer, resolve_model, teacher_source
    from stillhouse.stages.train import _kd_examples, _student
    from stillhouse.training import FitParams, fit, labeled_examples
    from stillhouse.workspace import atomic_write_json, read_jsonl, require_manifest

    ws = args.workspace.resolve()
    cfg = load_config(ws, [f"train.steps={args.steps}"] if args.steps else None)
    labels = require_manifest(ws, "label", "bench/kd_vs_ce.py")
    if labels.get("mode") != "token":
        sys.exit(f"{ws}/labels were made in {labels.get('mode')} mode: no soft labels to compare with")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    source = {"workspace": str(ws), "labels": labels["fingerprint"], "train": cfg.train.model_dump(exclude={"sweep"})}
    if results.get("source") != source:  # another workspace or other settings: the cache does not apply
        results = {"source": source, "runs": {}}

    tsrc = teacher_source(cfg)
    tok = load_tokenizer(tsrc)
    test = [e for e in labeled_examples(tok, read_jsonl(ws / "data" / "test.jsonl"), cfg.label.max_seq_len)
            if e.task == "classification"]
    val = labeled_examples(tok, read_jsonl(ws / "data" / "val.jsonl"), cfg.label.max_seq_len)
    if "teacher" not in results:
        results["teacher"] = _accuracy(load_model(tsrc), test, tok.pad_token_id)
        atomic_write_json(results_path, results)
    train = _kd_examples(ws / "labels", read_jsonl(ws / "labels" / "sequences.jsonl"))
    _student(cfg, args.out / "init")  # the derived student, saved once; every run starts from it
    tc, done = cfg.train, 0
    for seed in seeds:
        for variant in VARIANTS:
            name = f"{variant}-seed{seed}"
            if name in results["runs"]:
                continue
            if done >= args.max_trainings:
                print(f"stopped after {done} trainings; run again to continue", flush=True)
                return
            params = FitParams(steps=tc.steps, batch_size=tc.batch_size, learning_rate=tc.learning_rate,
                               warmup_steps=tc.warmup_steps, alpha=tc.alpha if variant == "kd" else 0.0,
                               temperature=labels["temperature"], eval_every_steps=tc.eval_every_steps,
                               keep_checkpoints=1, loss_chunk_tokens=tc.loss_chunk_tokens, seed=seed)
            model = load_model(resolve_model(str(args.out / "init")))
            t0 = time.time()
            summary = fit(model, tok, train, val, params, args.out / name, meta={"made_by": "bench/kd_vs_ce.py"},
                          label=f"{name}")
            final = _accuracy(model, test, tok.pad_token_id)
            best = _accuracy(load_model(resolve_model(str(args.out / name / "best"))), test, tok.pad_token_id)
            results["runs"][name] = {"variant": variant, "seed": seed, "test_acc_best": best, "test_acc_final": final,
                                     "best_step": summary["best_step"], "val_score": summary["best_val_score"],
                                     "seconds": round(time.time() - t0, 1)}
            atomic_write_json(results_path, results)
            shutil.rmtree(args.out / name)  # scored: its checkpoints (~200 MB each) are not needed
            print(name, results["runs"][name], flush=True)
            done += 1
    lines = _table(results, seeds, len(test), len(train), cfg, labels)
    publish(lines, append=done)  # the call that finished the last training appends; later calls only print


def _table(results: dict, seeds: list[int], n_test: int, n_train: int, cfg, labels: dict) -> list[str]:
    def mean_sd(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    teacher = results["teacher"]
    tc = cfg.train
    lines = ["### KD vs cross-entropy on the demo's intent task (quality, several seeds)", "",
             f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared; "
             f"runs serialized with flock), Python {platform.python_version()}, no GPU",
             f"- command: `.venv/bin/python bench/kd_vs_ce.py --workspace WS --seeds {','.join(map(str, seeds))}` "
             "(repeated until done; WS: a full `stillhouse demo` workspace up to labels/)",
             f"- teacher: SmolLM2-135M-Instruct adapted on the task (teacher/best), test accuracy {teacher:.3f} on "
             f"{n_test} intent records; student: 6 of its 30 layers (derived), {tc.steps} steps of batch {tc.batch_size}, "
             f"lr {tc.learning_rate:g}, the same {n_train} sequences of labels/ for both, in the same order per seed; "
             f"top-{labels['topk']} soft labels at T = {labels['temperature']:g}",
             "- accuracy: exact match of the intent on the test split (teacher-forced argmax = greedy output); "
             "best = the checkpoint `train` picks by validation score, final = the last step", "",
             "| student | seeds | test accuracy, best (mean ± sd) | retention, best | test accuracy, final | retention, final | per seed (best) |",
             "|---|---|---|---|---|---|---|"]
    for variant, label in VARIANTS.items():
        runs = [results["runs"][f"{variant}-seed{s}"] for s in seeds]
        best = [r["test_acc_best"] for r in runs]
        final = [r["test_acc_final"] for r in runs]
        lines.append(f"| {label} | {len(runs)} | {mean_sd(best)} | {mean_sd([b / teacher for b in best])} | "
                     f"{mean_sd(final)} | {mean_sd([f / teacher for f in final])} | "
                     f"{', '.join(f'{b:.3f}' for b in best)} |")
    diff = [results["runs"][f"kd-seed{s}"]["test_acc_best"] - results["runs"][f"ce-seed{s}"]["test_acc_best"]
            for s in seeds]
    lines += ["", f"KD - CE per seed (best checkpoints): {', '.join(f'{d:+.3f}' for d in diff)}; "
              f"mean {statistics.mean(diff):+.3f}", ""]
    return lines


if __name__ == "__main__":
    main()
