"""train: distill the teacher into the student.

The student is `student.model`, or derived from the (adapted) teacher by keeping `student.derive_layers` of its
layers (saved as `student/init/`, the "before distillation" baseline). It trains on labels/: the teacher's top-k
soft labels at temperature T (KD term, weight alpha) plus cross-entropy on the response tokens (weight 1 - alpha);
teacher-written responses make the CE term sequence-level KD. Checkpoints: `student/step-NNNNNN/`, `best/` (by
the validation task metric, not the KD loss), `final/`, `metrics.jsonl`.

`train.teacher_signal=online` runs the teacher inside the loop instead (dense: all V tokens, on the same
sequences), which also gives its hidden states for `train.hidden_alignment`. `train.assistant` makes it a chain:
teacher -> assistant (in `student/assistant/`, with the configured teacher signal), then assistant -> student
with the assistant as online teacher; hidden-state alignment, when on, applies to that last phase.
"""

from __future__ import annotations

import json
import shutil

from stillhouse.config import Config
from stillhouse.errors import StillhouseError
from stillhouse.models import (count_parameters, derive_student, load_model, load_tokenizer, resolve_model,
                               save_pretrained, teacher_source, tokenizer_fingerprint)
from stillhouse.training import Example, FitParams, fit, labeled_examples, process_state, uniform_layer_map
from stillhouse.ui import console
from stillhouse.workspace import StageRun, atomic_write_json, load_manifest, read_jsonl, require_manifest


def _student(cfg: Config, init_dir):
    """(model, tokenizer, lineage) for the student before distillation; saved to `init_dir` once, and made again
    when `student.*` changed since (another derive_layers must not train the old architecture)."""
    wanted = cfg.student.model_dump(mode="json")
    if (init_dir / "config.json").exists():
        src = resolve_model(str(init_dir))
        lineage = json.loads((init_dir / "stillhouse.json").read_text()) if (init_dir / "stillhouse.json").exists() else {}
        if lineage.get("student_config") == wanted:
            return load_model(src), load_tokenizer(src), lineage
        console.print("train: student.* changed since student/init was made: deriving the student again")
        for stale in ("resume", ".resume.tmp"):  # optimizer and weights of the old architecture
            shutil.rmtree(init_dir.parent / stale, ignore_errors=True)
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
    lineage["student_config"] = wanted
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


def _load_teacher(src, trust_remote_code: bool, memory_hint: str, what: str = "the online teacher"):
    """A teacher model for the loop, or one clear error (a corrupt file is named by load_model)."""
    try:
        return load_model(src, "fp32", trust_remote_code)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise StillhouseError(f"{src.path}: cannot load {what} ({str(e).splitlines()[0]})") from None
        raise StillhouseError(f"{src.path}: {what} does not fit in memory next to the student; {memory_hint}") from None


def memory_hint(cfg: Config) -> str:
    """What to change when training runs out of memory: the check stage's plan (read from check/manifest.json;
    stages share artifacts, not code) and the config changes that lower training memory, gentlest first."""
    tc = cfg.train
    fixes = []
    if tc.batch_size > 1:
        fixes.append(f"--set train.batch_size={tc.batch_size // 2} --set train.grad_accum_steps={tc.grad_accum_steps * 2} "
                     f"(the same effective batch)")
    if not tc.lora.enabled:
        fixes.append("--set train.lora.enabled=true")
    if tc.loss_chunk_tokens > 128:
        fixes.append(f"--set train.loss_chunk_tokens={max(128, tc.loss_chunk_tokens // 4)}")
    if tc.teacher_signal == "online":
        fixes.append("--set train.teacher_signal=offline (the teacher then runs once, in `label`, not next to the student)")
    check = load_manifest(cfg.workspace, "check") or {}
    planned = check.get("metrics", {}).get("peak_train_gb")
    plan = [s for s in check.get("hardware", {}).get("suggestions", []) if "train" in s.lower()]
    head = (f"`stillhouse check` planned {planned} GB for training"
            + (" (without an online teacher)" if tc.teacher_signal == "online" else "")
            if planned is not None else "run `stillhouse check` for a memory plan")
    return "; ".join([head, *plan, "try " + ", or ".join(fixes) if fixes else "use a machine with more memory"])


def _layer_map(cfg: Config, student, teacher) -> dict[int, int]:
    """train.hidden_alignment.layer_map resolved and checked against both models' layer counts."""
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    wanted = cfg.train.hidden_alignment.layer_map
    if wanted == "uniform":
        return uniform_layer_map(n_s, n_t)
    for s, t in wanted.items():
        if not (0 <= s < n_s and 0 <= t < n_t):
            raise StillhouseError(f"train.hidden_alignment.layer_map: {s}: {t} is out of range; student layers are "
                                  f"0..{n_s - 1} and teacher layers 0..{n_t - 1}")
    return dict(wanted)


def with_lora(model, tc, r: int, lora_alpha: float):
    """`model` with LoRA adapters of rank r (train.lora's dropout and target modules), seeded by train.seed so
    the adapters' initial weights are the same in every run (and in every sweep trial)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(tc.seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=tc.lora.dropout,
                                            target_modules=tc.lora.target_modules, task_type="CAUSAL_LM"))


def _fit_params(cfg: Config, alpha: float, temperature: float, steps: int, align: dict | None) -> FitParams:
    tc = cfg.train
    return FitParams(
        steps=steps, batch_size=tc.batch_size, learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
        grad_accum_steps=tc.grad_accum_steps, alpha=alpha, temperature=temperature, divergence=tc.divergence,
        jsd_beta=tc.jsd_beta, skew_alpha=tc.skew_alpha, precision=tc.precision, eval_every_steps=tc.eval_every_steps,
        early_stopping_patience=tc.early_stopping_patience, keep_checkpoints=tc.keep_checkpoints,
        loss_chunk_tokens=tc.loss_chunk_tokens, seed=tc.seed, lr_schedule=tc.lr_schedule,
        final_lr_ratio=tc.final_lr_ratio, weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm,
        align_layers=align, align_loss=tc.hidden_alignment.loss, align_weight=tc.hidden_alignment.weight,
        tensorboard=tc.tensorboard, memory_hint=memory_hint(cfg),
    )


def _assistant(cfg: Config, run_dir, tok, train: list[Example], val: list[Example], alpha: float,
               temperature: float, teacher, hint: str):
    """Phase 1 of a teacher-assistant chain: distill the teacher (online, or its soft labels in `train`) into the
    assistant, in `student/assistant/`. Returns (the assistant loaded from its best/, its summary); a finished
    phase is not redone."""
    a = cfg.train.assistant
    out = run_dir / "assistant"
    done = out / "summary.json"
    if not done.exists():
        if a.model:
            model = load_model(resolve_model(a.model, cfg.workspace), "fp32", cfg.teacher.trust_remote_code)
            lineage = {"base": a.model}
        else:
            source = teacher if teacher is not None else _load_teacher(teacher_source(cfg), cfg.teacher.trust_remote_code,
                                                                      hint, "the teacher")
            model, kept = derive_student(source, a.derive_layers, cfg.student.derive_strategy)
            lineage = {"derived_from": str(teacher_source(cfg).path), "kept_layers": kept}
            del source
        console.print(f"train: phase 1 of 2, teacher -> assistant ({model.config.num_hidden_layers} layers, "
                      f"{count_parameters(model) / 1e6:.1f}M parameters)")
        summary = fit(model, tok, train, val, _fit_params(cfg, alpha, temperature, a.steps or cfg.train.steps, None),
                      out, meta={"made_by": "stillhouse train (teacher assistant)", **lineage}, label="train assistant",
                      teacher=teacher)
        if process_state().is_main_process:
            atomic_write_json(done, {**summary, **lineage, "layers": model.config.num_hidden_layers})
        process_state().wait_for_everyone()
        del model
    summary = json.loads(done.read_text())
    return load_model(resolve_model(str(out / "best"))), summary


def run(cfg: Config) -> dict:
    """Distill into student/ from data/ and labels/ (top-k soft labels, or the teacher online)."""
    tc = cfg.train
    ws = cfg.workspace
    labels = require_manifest(ws, "label", "train")
    labels_dir = ws / "labels"
    # under `accelerate launch` every process runs this; the main one writes (the others wait for its files)
    processes = process_state()
    promoted = "promoted" in (load_manifest(ws, "train") or {})
    with processes.main_process_first():
        run_ = StageRun(cfg, "train", inputs=[labels_dir, ws / "data" / "val.jsonl"],
                        params={"train": tc.model_dump(exclude={"sweep"}), "student": cfg.student.model_dump(),
                                "max_seq_len": cfg.label.max_seq_len})
    if run_.previous:
        console.print("train: up to date, skipped")
        return run_.previous
    if promoted:  # retraining from labels/ (without the re-distilled records) would replace the promoted student
        (run_.dir / "manifest.previous.json").replace(run_.dir / "manifest.json")  # StageRun set it aside: undo
        raise StillhouseError(
            f"student/ was promoted by `stillhouse monitor --redistill`; training again from labels/ (without the "
            f"re-distilled records) would replace it. Run the stages after train one by one (eval, redteam, export), "
            f"or `stillhouse -w {ws} monitor --rollback` first")
    chain = bool(tc.assistant.derive_layers or tc.assistant.model)
    if tc.assistant.derive_layers and tc.assistant.model:
        raise StillhouseError("train.assistant: set derive_layers or model, not both")
    online = tc.teacher_signal == "online"
    if (online or chain) and labels.get("mode") != "token":
        raise StillhouseError("train.teacher_signal=online and train.assistant need the teacher's and the student's "
                              "tokenizers to match (labels/ is sequence-level); use train.teacher_signal=offline "
                              "without an assistant")
    if tc.hidden_alignment.enabled and not (online or chain):
        raise StillhouseError("train.hidden_alignment needs the teacher's hidden states: set train.teacher_signal=online "
                              "(the offline soft labels in labels/ hold only log-probabilities)")
    with processes.main_process_first():  # the main process derives and saves init/, the others load it
        model, tok, lineage = _student(cfg, run_.dir / "init")
    check_labels(cfg, labels, tok)
    rows = read_jsonl(labels_dir / "sequences.jsonl")
    if labels.get("mode") == "token":
        # online: the same sequences, the teacher's signal computed in the loop instead of read from the shards
        train = ([Example(r["id"], r["input_ids"], r["prompt_len"], r["task"]) for r in rows] if online
                 else _kd_examples(labels_dir, rows))
        alpha, temperature = tc.alpha, labels["temperature"]
    else:  # sequence-level: cross-entropy on teacher-written (and true) responses, tokenized by the student
        train = labeled_examples(tok, [{**r, "provenance": {}} for r in rows], cfg.label.max_seq_len)
        alpha, temperature = 0.0, 1.0
    val = labeled_examples(tok, read_jsonl(ws / "data" / "val.jsonl"), cfg.label.max_seq_len)
    if not train:
        raise StillhouseError("labels/sequences.jsonl is empty: nothing to train on; check data/train.jsonl and re-run label")
    if alpha >= 1.0 and not tc.hidden_alignment.enabled:
        console.print("[yellow]train.alpha=1 (pure KD): students trained without any CE term tend to collapse into repetition[/]")

    hint = memory_hint(cfg)
    teacher = _load_teacher(teacher_source(cfg), cfg.teacher.trust_remote_code, hint) if online else None
    chain_info = None
    if chain:
        assistant, a_summary = _assistant(cfg, run_.dir, tok, train, val, alpha, temperature, teacher, hint)
        chain_info = {"teacher": cfg.teacher.model, "assistant": str(run_.dir / "assistant" / "best"),
                      "assistant_layers": a_summary["layers"], "assistant_best_val_score": a_summary["best_val_score"],
                      "student": str(run_.dir / "best")}
        teacher = assistant  # phase 2: the assistant is the student's online teacher, over all V tokens
        train = [Example(e.record_id, e.input_ids, e.prompt_len, e.task) for e in train]
        console.print("train: phase 2 of 2, assistant -> student (online)")
    align = _layer_map(cfg, model, teacher) if tc.hidden_alignment.enabled else None

    if tc.lora.enabled:
        model = with_lora(model, tc, tc.lora.r, tc.lora.alpha)
    params = _fit_params(cfg, alpha, temperature, tc.steps, align)
    signal = "online" if teacher is not None else "offline"
    meta = {"made_by": "stillhouse train", **lineage, "labels_fingerprint": labels["fingerprint"],
            "alpha": alpha, "temperature": temperature, "divergence": tc.divergence, "teacher_signal": signal,
            **({"chain": chain_info} if chain_info else {})}
    n_params = count_parameters(model)
    console.print(f"train: student {n_params / 1e6:.1f}M parameters, {len(train)} examples, {len(val)} val, "
                  f"alpha={alpha}, T={temperature}, teacher signal {signal}, {tc.steps} steps of {tc.batch_size}")
    summary = fit(model, tok, train, val, params, run_.dir, meta=meta, label="train student", teacher=teacher)
    console.print(f"train: best val score {summary['best_val_score']:.3f} at step {summary['best_step']}")
    if not processes.is_main_process:  # the manifest is the main process's to write
        return {"metrics": summary}
    return run_.finish(metrics={**summary, "parameters": n_params, "examples": len(train)}, student=lineage,
                       labels_fingerprint=labels["fingerprint"], teacher_signal=signal,
                       **({"chain": chain_info} if chain_info else {}),
                       **({"hidden_alignment": {str(s): t for s, t in align.items()}} if align else {}))
