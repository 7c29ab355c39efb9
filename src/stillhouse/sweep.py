"""`stillhouse train --sweep`: short trainings over a grid of KD temperature x alpha x learning rate, ranked by the
validation task metric (not the KD loss: it does not predict accuracy, PITFALLS.md).

Every trial is the train stage's loop (`training.fit`) on the same data, labels and initial student as `stillhouse
train`, with `train.sweep.steps` steps and the grid point's settings; everything else comes from `train`. It writes

    sweep/trial-NNN/    trial.json (settings) first, metrics.jsonl + samples.jsonl, result.json last
    sweep/labels-T<T>/  soft labels at a temperature other than labels/' (the teacher runs once per T)
    sweep/results.json  every trial, best first; results.md: the same as a markdown table

A trial with a result.json for the same settings and inputs is skipped, so an interrupted or widened sweep
continues where it stopped (an unfinished trial resumes from its own resume/ checkpoint); trials are found by
their settings, not their number. A trial's weights are deleted once it is
scored (a 6-layer student is ~200 MB a checkpoint): the sweep picks settings, and `stillhouse train` with the
printed `--set` flags trains the student for real.

alpha = 0 is cross-entropy only, where the temperature plays no part: the grid holds it once, as the baseline.
Sequence-level labels (tokenizers differ) have no soft labels: only the learning rate is swept.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import fields
from pathlib import Path

from stillhouse.config import Config
from stillhouse.errors import StillhouseError
from stillhouse.ui import console
from stillhouse.workspace import atomic_write_json, atomic_write_text, digest, read_json_or_none, read_jsonl, require_manifest


def grid(cfg: Config, label_mode: str) -> list[dict]:
    """The trials' settings, in a fixed order: [{"temperature", "alpha", "learning_rate"}], temperature None where
    it plays no part (alpha = 0, or sequence-level labels)."""
    sw = cfg.train.sweep
    if label_mode != "token":
        return [{"temperature": None, "alpha": 0.0, "learning_rate": lr} for lr in dict.fromkeys(sw.learning_rate)]
    out = []
    for alpha, lr, t in itertools.product(dict.fromkeys(sw.alpha), dict.fromkeys(sw.learning_rate),
                                          dict.fromkeys(sw.temperature)):
        point = {"temperature": float(t) if alpha > 0 else None, "alpha": float(alpha), "learning_rate": float(lr)}
        if point not in out:
            out.append(point)
    return out


def set_flags(point: dict) -> str:
    """The `--set` flags that make `stillhouse train` use these settings."""
    flags = [f"--set train.alpha={point['alpha']:g}", f"--set train.learning_rate={point['learning_rate']:g}"]
    if point["temperature"] is not None:
        flags.append(f"--set label.temperature={point['temperature']:g}")
    return " ".join(flags)


def run(cfg: Config) -> dict:
    """Run (or continue) the sweep; write and print the results table; return {"best", "trials", ...}."""
    from stillhouse.models import load_model, resolve_model
    from stillhouse.stages.train import _kd_examples, _student, check_labels
    from stillhouse.training import FitParams, fit, labeled_examples

    ws, tc, sw = cfg.workspace, cfg.train, cfg.train.sweep
    labels = require_manifest(ws, "label", "train --sweep")
    val_path = ws / "data" / "val.jsonl"
    out = ws / "sweep"
    init_dir = ws / "student" / "init"
    _, tok, _ = _student(cfg, init_dir)  # derives and saves student/init once, as `train` does
    lineage = read_json_or_none(init_dir / "stillhouse.json")  # the same on every run (what _student returns is not)
    check_labels(cfg, labels, tok)
    val = labeled_examples(tok, read_jsonl(val_path), cfg.label.max_seq_len) if val_path.exists() else []
    if not val:
        raise StillhouseError(f"train --sweep ranks trials by the validation task metric, but {val_path} has no labeled "
                              "records; set prep.val_fraction > 0 (e.g. --set prep.val_fraction=0.1) and re-run prep")
    rows = read_jsonl(ws / "labels" / "sequences.jsonl")
    if not rows:
        raise StillhouseError("labels/sequences.jsonl is empty: nothing to train on; check data/train.jsonl and re-run label")
    mode = labels.get("mode")
    points = grid(cfg, mode)
    if mode != "token":
        console.print("train --sweep: sequence-level labels (no soft labels): sweeping the learning rate only")
    if tc.lora.enabled:
        raise StillhouseError("train --sweep trains the full student; set train.lora.enabled=false for the sweep "
                              "(LoRA trials are not supported yet)")

    # what a finished trial's result depends on besides its grid point: the inputs and every other train setting
    base = {"labels": labels["fingerprint"], "student": lineage, "val": digest(read_jsonl(val_path)),
            "train": tc.model_dump(exclude={"sweep", "alpha", "learning_rate", "steps", "eval_every_steps"}),
            "steps": sw.steps, "evals": sw.evals, "max_seq_len": cfg.label.max_seq_len}
    examples: dict = {}  # temperature -> training examples (loaded once per temperature)

    def train_examples(point: dict):
        t = point["temperature"]
        if mode != "token":  # sequence-level: teacher-written responses, tokenized by the student, as `train` does
            t = "sequence"
            examples[t] = examples.get(t) or labeled_examples(tok, [{**r, "provenance": {}} for r in rows],
                                                              cfg.label.max_seq_len)
        elif t is None or t == labels["temperature"]:  # alpha = 0 ignores the soft labels; any set will do
            t = labels["temperature"]
            examples[t] = examples.get(t) or _kd_examples(ws / "labels", rows)
        elif t not in examples:
            examples[t] = _kd_examples(relabel(cfg, tok, rows, t, out / f"labels-T{t:g}"), rows)
        return examples[t]

    # a trial folder is found by its settings' key, not by its number: a grid edited or reordered later reuses
    # every trial it still holds, and new points get new numbers
    found = {(read_json_or_none(d / "trial.json") or {}).get("key"): d for d in sorted(out.glob("trial-*"))}
    numbers = [int(d.name.split("-")[1]) for d in out.glob("trial-*") if d.name.split("-")[1].isdigit()]
    next_number = max(numbers, default=-1) + 1
    results = []
    trial_keys = {f.name for f in fields(FitParams)}
    for i, point in enumerate(points):
        key = digest({**base, "point": point})
        trial = found.get(key)
        if trial is None:
            trial, next_number = out / f"trial-{next_number:03d}", next_number + 1
            shutil.rmtree(trial, ignore_errors=True)
            trial.mkdir(parents=True)
            atomic_write_json(trial / "trial.json", {"key": key, **point})
        done = read_json_or_none(trial / "result.json")
        if done and done.get("key") == key:
            results.append(done)
            continue
        console.print(f"train --sweep: trial {i + 1}/{len(points)}: {set_flags(point)}")
        params = FitParams(**{
            **{k: v for k, v in tc.model_dump().items() if k in trial_keys},
            "steps": sw.steps, "eval_every_steps": max(1, sw.steps // sw.evals), "keep_checkpoints": 1,
            "alpha": point["alpha"], "temperature": point["temperature"] or 1.0, "learning_rate": point["learning_rate"],
            "warmup_steps": min(tc.warmup_steps, sw.steps // 5), "lr_setting": "train.sweep.learning_rate",
        })
        model = load_model(resolve_model(str(init_dir)))
        result = {"trial": trial.name, **point, "val_score": None, "val_loss": None, "best_step": None,
                  "steps": None, "train_seconds": None, "error": None, "key": key}
        try:
            summary = fit(model, tok, train_examples(point), val, params, trial,
                          meta={"made_by": "stillhouse train --sweep", **point}, label=f"sweep trial {i + 1}/{len(points)}")
        except StillhouseError as e:  # a diverging trial (too high a learning rate, say) is a result too
            console.print(f"[yellow]train --sweep: trial {i + 1} failed: {e}[/]")
            result["error"] = str(e)
        else:
            evals = [r for r in map(json.loads, (trial / "metrics.jsonl").read_text().splitlines()) if "val_score" in r]
            best = next(r for r in evals if r["step"] == summary["best_step"])
            result.update(val_score=round(best["val_score"], 4), val_loss=round(best["val_loss"], 4),
                          best_step=summary["best_step"], steps=summary["steps"], train_seconds=summary["train_seconds"])
        for d in [*trial.glob("step-*"), trial / "best", trial / "final", trial / "resume"]:  # weights are not needed
            shutil.rmtree(d, ignore_errors=True)
        atomic_write_json(trial / "result.json", result)
        results.append(result)

    if all(r["error"] for r in results):
        raise StillhouseError(f"train --sweep: every trial failed; the first: {results[0]['error']}")
    # best first: the task metric, then the validation loss (lower) to break ties among equal accuracies; failed last
    results.sort(key=lambda r: (r["error"] is not None, -(r["val_score"] or 0), r["val_loss"] or 0))
    best = results[0]
    report = {"metric": "val_score (validation task metric: exact match for classification, token accuracy otherwise)",
              "steps_per_trial": sw.steps, "best": best, "set_flags": set_flags(best), "trials": results}
    atomic_write_json(out / "results.json", report)
    table = results_table(results)
    atomic_write_text(out / "results.md", f"# stillhouse train --sweep\n\n{sw.steps} steps per trial; best first.\n\n{table}\n")
    console.print(table, soft_wrap=True)  # (no wrapping: the table and the flags must stay copyable)
    relabel_note = ("" if best["temperature"] in (None, labels["temperature"]) else
                    f" (temperature {best['temperature']:g} differs from labels/: `train` asks to relabel first)")
    console.print(f"train --sweep: best val_score {best['val_score']:.3f} ({best['trial']}); train with:\n"
                  f"  stillhouse -w {ws} train {set_flags(best)}{relabel_note}", soft_wrap=True)
    return report


def results_table(results: list[dict]) -> str:
    """A markdown table of the trials, in the given order."""
    lines = ["| trial | temperature | alpha | learning rate | val score | val loss | best step | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = "-" if r["temperature"] is None else f"{r['temperature']:g}"
        scores = ("failed (see result.json) | - | - | -" if r["error"] else
                  f"{r['val_score']:.3f} | {r['val_loss']:.4f} | {r['best_step']} | {r['train_seconds']:.0f}")
        lines.append(f"| {r['trial']} | {t} | {r['alpha']:g} | {r['learning_rate']:g} | {scores} |")
    return "\n".join(lines)


def relabel(cfg: Config, tok, rows: list[dict], temperature: float, out: Path) -> Path:
    """Soft labels at another temperature for the same sequences as labels/, in `out` (one shard, written once).

    Stored top-k log-probabilities cannot be re-tempered exactly (the tail's shape is unknown), so the teacher runs
    again: log-softmax over the full vocabulary at `temperature`, then top-k, as `stillhouse label` does."""
    from stillhouse.models import load_model, teacher_source
    from stillhouse.records import Encoded
    from stillhouse.softlabels import topk_logprobs, write_shard
    from stillhouse.stages.label import response_logits
    from stillhouse.ui import progress_bar

    lc = cfg.label
    src = teacher_source(cfg)
    key = digest({"teacher": str(src.path), "rows": digest(rows), "topk": lc.topk, "temperature": temperature,
                  "precision": lc.precision})
    marker = read_json_or_none(out / "labels.done")
    if marker and marker.get("key") == key:
        return out
    model = load_model(src, "fp32", cfg.teacher.trust_remote_code)
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # length-sorted: less padding
    by_shard: dict[str, list] = {name: [] for name in sorted({r["shard"] for r in rows})}
    with progress_bar(f"sweep: relabel at T={temperature:g}", total=len(rows), unit="rec") as advance:
        for b in range(0, len(order), lc.batch_size):
            idx = order[b : b + lc.batch_size]
            logits = response_logits(model, tok.pad_token_id, [Encoded(rows[i]["input_ids"], rows[i]["prompt_len"]) for i in idx],
                                     lc.precision)
            for i, lg in zip(idx, logits):
                by_shard[rows[i]["shard"]].append((rows[i]["id"], *topk_logprobs(lg, lc.topk, temperature)))
            advance(len(idx))
    vocab = model.get_output_embeddings().weight.shape[0]
    for name, entries in by_shard.items():  # the same shard names as labels/, so `_kd_examples` reads them alike
        write_shard(out / name, entries, vocab_size=vocab, topk=lc.topk, temperature=temperature)
    atomic_write_json(out / "labels.done", {"key": key, "temperature": temperature})
    return out
