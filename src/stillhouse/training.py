"""The training loop shared by `adapt` (teacher, cross-entropy only) and `train` (student, KD + CE).

We own this loop on purpose (STYLE.md): forward, teacher signal, loss, backward, step, log, eval, checkpoint, in
one readable function. transformers gives the model, peft the adapters.

An example is a tokenized sequence plus, for KD, the teacher's top-k at each response position:

    Example(record_id, input_ids, prompt_len, task, teacher_ids (n, k) | None, teacher_logprobs (n, k) | None)

where n = len(input_ids) - prompt_len: position p in [prompt_len - 1, len - 2] predicts token p + 1.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillhouse.ui import console, progress_bar


@dataclass
class Example:
    record_id: str
    input_ids: list[int]
    prompt_len: int
    task: str
    teacher_ids: Any = None  # (n, k) int64 tensor or None
    teacher_logprobs: Any = None  # (n, k) float32 tensor or None


@dataclass
class Batch:
    input_ids: Any  # (B, L) long, right-padded
    attention_mask: Any  # (B, L)
    rows: Any  # (N,) batch row of each supervised position
    cols: Any  # (N,) position whose hidden state predicts the next token
    targets: Any  # (N,) the true next token
    teacher_ids: Any  # (N, k) or None
    teacher_logprobs: Any  # (N, k) or None
    example_of_position: Any  # (N,) index into the batch's examples


def labeled_examples(tokenizer, records: list[dict], max_seq_len: int) -> list[Example]:
    """Records with a ground-truth response (not teacher-written), tokenized exactly as everywhere else."""
    from stillhouse.records import encode, response_text

    out = []
    for r in records:
        if response_text(r) is None or r.get("provenance", {}).get("generated_by"):
            continue
        e = encode(tokenizer, r, max_seq_len)
        out.append(Example(r["id"], e.input_ids, e.prompt_len, r["task"]))
    return out


def collate(examples: list[Example], pad_id: int) -> Batch:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, cols, t_ids, t_lps, owner = [], [], [], [], []
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        pos = torch.arange(e.prompt_len - 1, n - 1)
        rows.append(torch.full_like(pos, b))
        cols.append(pos)
        owner.append(torch.full_like(pos, b))
        if e.teacher_ids is not None:
            t_ids.append(e.teacher_ids)
            t_lps.append(e.teacher_logprobs)
    rows, cols = torch.cat(rows), torch.cat(cols)
    has_teacher = len(t_ids) == len(examples)
    return Batch(
        ids, mask, rows, cols, ids[rows, cols + 1],
        torch.cat(t_ids) if has_teacher else None,
        torch.cat(t_lps) if has_teacher else None,
        torch.cat(owner),
    )


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_hidden(model, batch: Batch):
    """Final hidden states at the supervised positions, (N, H), and the LM head weight (V, H).
    We stop before the LM head so the (B, L, V) logits are never built: the loss applies the head chunk by chunk."""
    base = _base(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (B, L, H)
    return hidden[batch.rows, batch.cols], base.get_output_embeddings().weight


@dataclass
class FitParams:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 10
    grad_accum_steps: int = 1
    alpha: float = 0.0  # weight of KD; 0 = cross-entropy only
    temperature: float = 1.0
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    precision: str = "bf16"
    eval_every_steps: int = 25
    early_stopping_patience: int = 0
    keep_checkpoints: int = 2
    loss_chunk_tokens: int = 1024
    seed: int = 0


def lr_at(step: int, p: FitParams) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < p.warmup_steps:
        return p.learning_rate * (step + 1) / p.warmup_steps
    progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    return p.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(model, examples: list[Example], pad_id: int, batch_size: int = 32) -> dict:
    """Cheap validation: teacher-forced loss, and the task metric greedy decoding would get.

    A greedy decode reproduces the reference exactly iff the argmax at every response position equals the reference
    token, so "exact match" of classification answers needs one forward pass, not generation. Other tasks report the
    token accuracy of the response. val_score = mean over tasks."""
    import torch
    import torch.nn.functional as F

    model.eval()
    per_task: dict[str, list[float]] = {}
    losses, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden, head = response_hidden(model, batch)
            logits = (hidden.float() @ head.float().T)  # (N, V): fine at validation batch sizes
            losses += F.cross_entropy(logits, batch.targets, reduction="sum").item()
            tokens += len(batch.targets)
            correct = (logits.argmax(-1) == batch.targets).float()
            for i, e in enumerate(chunk):
                c = correct[batch.example_of_position == i]
                score = float(c.min()) if e.task == "classification" else float(c.mean())
                per_task.setdefault(e.task, []).append(score)
    model.train()
    scores = {t: sum(v) / len(v) for t, v in per_task.items()}
    return {
        "val_loss": losses / max(1, tokens),
        "val_score": sum(scores.values()) / max(1, len(scores)),
        "val_score_by_task": scores,
    }


def fit(model, tokenizer, train: list[Example], val: list[Example], p: FitParams, out_dir: Path,
        meta: dict, label: str = "train") -> dict:
    """Train `model` in place; write `step-NNNNNN/`, `best/` (by val_score), `final/`, `metrics.jsonl` in `out_dir`.

    Resumes from `out_dir/resume/` (model, optimizer, step, RNG) after a crash or Ctrl-C.
    Returns a summary: best step and score, final metrics, tokens/s."""
    import torch

    from stillhouse.losses import distill_loss
    from stillhouse.models import save_pretrained

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(p.seed)
    rng = random.Random(p.seed)
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    metrics_path = out_dir / "metrics.jsonl"
    state = {"step": 0, "best_score": -1.0, "best_step": None, "bad_evals": 0, "order": [], "cursor": 0}

    resume = out_dir / "resume"
    if (resume / "state.json").exists():
        state = json.loads((resume / "state.json").read_text())
        model.load_state_dict(torch.load(resume / "model.pt", weights_only=True), strict=False)
        opt.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
        rng.setstate(_tuplify(state.pop("rng")))
        console.print(f"[yellow]{label}: resuming at step {state['step']} from {resume}[/]")
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run: old curves would mislead

    def next_batch() -> list[Example]:
        out = []
        while len(out) < p.batch_size:
            if state["cursor"] >= len(state["order"]):
                state["order"] = rng.sample(range(len(train)), len(train))
                state["cursor"] = 0
            out.append(train[state["order"][state["cursor"]]])
            state["cursor"] += 1
        return out

    def log(row: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint(step: int, score: float) -> None:
        name = f"step-{step:06d}"
        save_pretrained(_mergeable(model), tokenizer, out_dir / name, {**meta, "step": step, "val_score": score})
        if score > state["best_score"]:
            state["best_score"], state["best_step"], state["bad_evals"] = score, step, 0
            save_pretrained(_mergeable(model), tokenizer, out_dir / "best", {**meta, "step": step, "val_score": score})
        else:
            state["bad_evals"] += 1
        steps = sorted(d for d in out_dir.glob("step-*") if d.is_dir())
        for old in steps[: -p.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        # resume state last: a crash before this line re-does at most one eval interval
        tmp = out_dir / ".resume.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save({k: v for k, v in model.state_dict().items()}, tmp / "model.pt")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "rng": rng.getstate()}))
        shutil.rmtree(resume, ignore_errors=True)
        tmp.rename(resume)

    use_bf16 = p.precision == "bf16"
    model.train()
    t0, tokens_seen, stopped_early = time.time(), 0, False
    with progress_bar(label, total=p.steps, unit="step") as advance:
        advance(state["step"])
        while state["step"] < p.steps:
            step = state["step"]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, p)
            totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
            for _ in range(p.grad_accum_steps):
                batch = collate(next_batch(), pad_id)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    hidden, head = response_hidden(model, batch)
                out = distill_loss(
                    hidden, head, batch.targets, batch.teacher_ids if p.alpha > 0 else None,
                    batch.teacher_logprobs if p.alpha > 0 else None, temperature=p.temperature, alpha=p.alpha,
                    divergence=p.divergence, beta=p.jsd_beta, chunk_tokens=p.loss_chunk_tokens,
                )
                (out["loss"] / p.grad_accum_steps).backward()
                tokens_seen += int(batch.attention_mask.sum())
                for k in totals:
                    totals[k] += float(out[k].detach()) / p.grad_accum_steps
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            log({"step": step, **{k: round(v, 5) for k, v in totals.items()}, "lr": lr_at(step - 1, p)})
            advance(1, info=f"loss {totals['loss']:.3f}")
            if step % p.eval_every_steps == 0 or step == p.steps:
                ev = evaluate(model, val, pad_id) if val else {"val_score": -totals["loss"], "val_loss": totals["loss"]}
                log({"step": step, **ev})
                checkpoint(step, ev["val_score"])
                if p.early_stopping_patience and state["bad_evals"] >= p.early_stopping_patience:
                    stopped_early = True
                    console.print(f"{label}: early stop at step {step} (no improvement in {state['bad_evals']} evals)")
                    break
    save_pretrained(_mergeable(model), tokenizer, out_dir / "final", {**meta, "step": state["step"]})
    shutil.rmtree(resume, ignore_errors=True)
    seconds = time.time() - t0
    return {
        "steps": state["step"], "best_step": state["best_step"], "best_val_score": state["best_score"],
        "stopped_early": stopped_early, "train_seconds": round(seconds, 1),
        "train_tokens_per_second": round(tokens_seen / max(seconds, 1e-9), 1),
    }


def _mergeable(model):
    """What a checkpoint folder holds: for LoRA, the base model with adapters merged (a copy; training goes on)."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, list) else x
