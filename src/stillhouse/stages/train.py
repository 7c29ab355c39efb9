"""train: distill the teacher into the student.

The student is `student.model`, or derived from the (adapted) teacher by keeping `student.derive_layers` of its
layers (saved as `student/init/`, the "before distillation" baseline). It trains on labels/: the teacher's top-k
soft labels at temperature T (KD term, weight alpha) plus cross-entropy on the response tokens (weight 1 - alpha);
teacher-written responses make the CE term sequence-level KD. Checkpoints: `student/step-NNNNNN/`, `best/` (by
the validation task metric, not the KD loss), `final/`, `metrics.jsonl`.
"""

from __future__ import annotations

import json

from stillhouse.config import Config
from stillhouse.errors import StillhouseError
from stillhouse.models import (count_parameters, derive_student, load_model, load_tokenizer, resolve_model,
                               save_pretrained, teacher_source, tokenizer_fingerprint)
from stillhouse.training import Example, FitParams, fit, labeled_examples
from stillhouse.ui import console
from stillhouse.workspace import StageRun, read_jsonl, require_manifest


def _student(cfg: Config, init_dir):
    """(model, tokenizer, lineage) for the student before distillation; saved to `init_dir` once."""
    if (init_dir / "config.json").exists():
        src = resolve_model(str(init_dir))
        lineage = json.loads((init_dir / "stillhouse.json").read_text()) if (init_dir / "stillhouse.json").exists() else {}
        return load_model(src), load_tokenizer(src), lineage
    if cfg.student.model:
        src = resolve_model(cfg.student.model, cfg.workspace)
        model, tok = load_model(src, "fp32", cfg.student.trust_remote_code), load_tokenizer(src, cfg.student.trust_remote_code)
        lineage = {"base": cfg.student.model}
    else:
        if cfg.student.derive_layers is None:
            raise StillhouseError("set student.model (a model folder) or student.derive_layers (e.g. 6)")
        tsrc = teacher_source(cfg)
        teacher = load_model(tsrc)
        model, kept = derive_student(teacher, cfg.student.derive_layers, cfg.student.derive_strategy)
        tok = load_tokenizer(tsrc)
        lineage = {"derived_from": str(tsrc.path), "kept_layers": kept,
                   "teacher_layers": teacher.config.num_hidden_layers}
        del teacher
    save_pretrained(model, tok, init_dir, {"made_by": "stillhouse train (student before distillation)", **lineage})
    return model, tok, lineage


def check_labels(cfg: Config, labels: dict, tok) -> None:
    """Refuse labels/ made for another teacher, tokenizer, chat template, temperature or top-k than this config
    and student ask for, naming each difference and what to run (DESIGN.md: a stage refuses mismatched inputs)."""
    made = labels.get("config", {}).get("teacher", {})
    diffs = []  # (what differs, the --set that would accept the labels as they are, or None)
    for key, ours in (("model", cfg.teacher.model), ("sha256", cfg.teacher.sha256)):
        if key in made and made[key] != ours:
            diffs.append((f"teacher.{key} (labels: {made[key]!r}, config: {ours!r})", f"teacher.{key}={made[key]}"))
    theirs = made.get("adapt", {}).get("enabled")
    if theirs is not None and theirs != cfg.teacher.adapt.enabled:
        diffs.append((f"teacher.adapt.enabled (labels: {theirs}, config: {cfg.teacher.adapt.enabled})",
                      f"teacher.adapt.enabled={str(theirs).lower()}"))
    if labels.get("mode") == "token":
        teacher = labels.get("teacher", {})
        if teacher.get("tokenizer") != tokenizer_fingerprint(tok):
            diffs.append(("tokenizer (the labels' teacher tokenizer is not the student's; token-level soft labels "
                          "need the same vocabulary, or set label.mode=sequence)", None))
        elif teacher.get("chat_template") != tok.chat_template:
            diffs.append(("chat template (the labels' prompts were rendered with another template than the student's)", None))
        for key in ("temperature", "topk"):
            theirs, ours = labels.get(key), getattr(cfg.label, key)
            if theirs != ours:
                diffs.append((f"label.{key} (labels: {theirs}, config: {ours})", f"label.{key}={theirs}"))
    if diffs:
        fixes = [fix for _, fix in diffs]
        raise StillhouseError(
            f"labels/ were made with another {'; another '.join(d for d, _ in diffs)}; re-run "
            f"`stillhouse -w {cfg.workspace} label` to relabel for this config"
            + (f", or use the labels as they are with {' '.join('--set ' + f for f in fixes)}" if all(fixes) else ""))


def _kd_examples(labels_dir, rows: list[dict]) -> list[Example]:
    from stillhouse.softlabels import ShardReader

    readers: dict = {}
    out = []
    for r in rows:
        reader = readers.get(r["shard"]) or readers.setdefault(r["shard"], ShardReader(labels_dir / r["shard"]))
        t_ids, t_lps = reader.get(r["id"])
        n = len(r["input_ids"]) - r["prompt_len"]
        if t_ids.shape[0] != n:
            raise StillhouseError(f"{labels_dir / r['shard']}: record {r['id']} has {t_ids.shape[0]} labeled positions, "
                                  f"expected {n}; the labels are corrupt: delete labels/ and run `stillhouse label`")
        out.append(Example(r["id"], r["input_ids"], r["prompt_len"], r["task"], t_ids, t_lps))
    return out


def run(cfg: Config) -> dict:
    """Distill into student/ from data/ and labels/."""
    tc = cfg.train
    ws = cfg.workspace
    labels = require_manifest(ws, "label", "train")
    labels_dir = ws / "labels"
    run_ = StageRun(cfg, "train", inputs=[labels_dir, ws / "data" / "val.jsonl"],
                    params={"train": tc.model_dump(), "student": cfg.student.model_dump(),
                            "max_seq_len": cfg.label.max_seq_len})
    if run_.previous:
        console.print("train: up to date, skipped")
        return run_.previous
    model, tok, lineage = _student(cfg, run_.dir / "init")
    check_labels(cfg, labels, tok)
    rows = read_jsonl(labels_dir / "sequences.jsonl")
    if labels.get("mode") == "token":
        train = _kd_examples(labels_dir, rows)
        alpha, temperature = tc.alpha, labels["temperature"]
    else:  # sequence-level: cross-entropy on teacher-written (and true) responses, tokenized by the student
        train = labeled_examples(tok, [{**r, "provenance": {}} for r in rows], cfg.label.max_seq_len)
        alpha, temperature = 0.0, 1.0
    val = labeled_examples(tok, read_jsonl(ws / "data" / "val.jsonl"), cfg.label.max_seq_len)
    if not train:
        raise StillhouseError("labels/sequences.jsonl is empty: nothing to train on; check data/train.jsonl and re-run label")
    if alpha >= 1.0:
        console.print("[yellow]train.alpha=1 (pure KD): students trained without any CE term tend to collapse into repetition[/]")

    if tc.lora.enabled:
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(tc.seed)  # the adapters' initial weights
        model = get_peft_model(model, LoraConfig(r=tc.lora.r, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    params = FitParams(
        steps=tc.steps, batch_size=tc.batch_size, learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
        grad_accum_steps=tc.grad_accum_steps, alpha=alpha, temperature=temperature, divergence=tc.divergence,
        jsd_beta=tc.jsd_beta, skew_alpha=tc.skew_alpha, precision=tc.precision, eval_every_steps=tc.eval_every_steps,
        early_stopping_patience=tc.early_stopping_patience, keep_checkpoints=tc.keep_checkpoints,
        loss_chunk_tokens=tc.loss_chunk_tokens, seed=tc.seed,
    )
    meta = {"made_by": "stillhouse train", **lineage, "labels_fingerprint": labels["fingerprint"],
            "alpha": alpha, "temperature": temperature, "divergence": tc.divergence}
    n_params = count_parameters(model)
    console.print(f"train: student {n_params / 1e6:.1f}M parameters, {len(train)} examples, {len(val)} val, "
                  f"alpha={alpha}, T={temperature}, {tc.steps} steps of {tc.batch_size}")
    summary = fit(model, tok, train, val, params, run_.dir, meta=meta, label="train student")
    console.print(f"train: best val score {summary['best_val_score']:.3f} at step {summary['best_step']}")
    return run_.finish(metrics={**summary, "parameters": n_params, "examples": len(train)}, student=lineage,
                       labels_fingerprint=labels["fingerprint"])
