"""adapt: fine-tune the teacher on the task first, so it is a good teacher (cross-entropy on labeled train records).

A general instruction model rarely knows an organization's label set; distilling it as-is teaches the student its
mistakes. This is train with alpha = 0 on the teacher, writing `teacher/` (best/ by validation score).
"""

from __future__ import annotations

from stillhouse.config import Config
from stillhouse.models import load_model, load_tokenizer, resolve_model, tokenizer_fingerprint
from stillhouse.training import FitParams, fit, labeled_examples
from stillhouse.ui import console
from stillhouse.workspace import StageRun, read_jsonl, require_manifest


def run(cfg: Config) -> dict | None:
    """Fine-tune `teacher.model` on data/train.jsonl; skip (return None) when `teacher.adapt.enabled` is off."""
    a = cfg.teacher.adapt
    if not a.enabled:
        console.print("adapt: teacher.adapt.enabled is off; the teacher is used as configured")
        return None
    require_manifest(cfg.workspace, "prep", "adapt")
    src = resolve_model(cfg.teacher.model, cfg.workspace, cfg.teacher.sha256)
    data = cfg.workspace / "data"
    run_ = StageRun(cfg, "adapt", inputs=[data / "train.jsonl", data / "val.jsonl", src.path],
                    params={"adapt": a.model_dump(), "max_seq_len": cfg.label.max_seq_len, "teacher": cfg.teacher.model})
    if run_.previous:
        console.print("adapt: up to date, skipped")
        return run_.previous
    tok = load_tokenizer(src, cfg.teacher.trust_remote_code)
    model = load_model(src, "fp32", cfg.teacher.trust_remote_code)
    def task_records(path):
        return [r for r in read_jsonl(path) if a.tasks is None or r["task"] in a.tasks]

    train = labeled_examples(tok, task_records(data / "train.jsonl"), cfg.label.max_seq_len)
    val = labeled_examples(tok, task_records(data / "val.jsonl"), cfg.label.max_seq_len)
    if not train:
        from stillhouse.errors import StillhouseError

        raise StillhouseError("adapt: data/train.jsonl has no labeled records; add labeled data, widen teacher.adapt.tasks, or set teacher.adapt.enabled=false")
    params = FitParams(steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate, alpha=0.0,
                       eval_every_steps=max(1, a.steps // 3), keep_checkpoints=1, seed=cfg.train.seed,
                       warmup_steps=min(10, a.steps // 5), lr_setting="teacher.adapt.learning_rate")
    summary = fit(model, tok, train, val, params, run_.dir,
                  meta={"made_by": "stillhouse adapt", "base": cfg.teacher.model}, label="adapt teacher")
    console.print(f"adapt: best val score {summary['best_val_score']:.3f} at step {summary['best_step']}")
    return run_.finish(metrics=summary, teacher={"base": cfg.teacher.model, "tokenizer": tokenizer_fingerprint(tok)})
