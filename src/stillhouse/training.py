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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stillhouse.ui import console, progress_bar


def use_low_memory_allocator(mmap_threshold_bytes: int = 65536) -> bool:
    """Make glibc return freed large buffers to the OS at once; True when it was applied.

    The chunked loss frees a (chunk, V) fp32 buffer per chunk. glibc's default threshold grows with such frees
    and then keeps them on its heap: peak RSS of a chunked loss was +2.3 GB instead of +0.4 GB (PITFALLS.md).
    `mallopt(M_MMAP_THRESHOLD, 64 KiB)` is what `MALLOC_MMAP_THRESHOLD_=65536` does, but it also works after
    the process started (the env var is read only at start). A threshold the user set in that env var wins.
    """
    import ctypes
    import os
    import platform

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # from <malloc.h>
    return libc.mallopt(m_mmap_threshold, mmap_threshold_bytes) == 1


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
    skew_alpha: float = 0.1
    precision: str = "bf16"
    eval_every_steps: int = 25
    early_stopping_patience: int = 0
    keep_checkpoints: int = 2
    loss_chunk_tokens: int = 1024
    seed: int = 0
    eval_samples: int = 3  # validation records whose greedy output goes to samples.jsonl at every evaluation
    lr_setting: str = "train.learning_rate"  # the config key that sets learning_rate, named in error messages


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
    """Train `model` in place; write `step-NNNNNN/`, `best/` (by val_score), `final/`, `metrics.jsonl` and
    `samples.jsonl` (a few greedy validation outputs per evaluation) in `out_dir`.

    Resumes from `out_dir/resume/` (model, optimizer, step, data order, Python and torch RNG) after a crash or
    Ctrl-C: rows logged after that checkpoint are dropped, so on CPU the result equals an uninterrupted run.
    A NaN/inf loss or gradient stops with a StillhouseError naming the step; the last good checkpoint is kept.
    Returns a summary: best step and score, final metrics, tokens/s."""
    import torch

    from stillhouse.errors import StillhouseError
    from stillhouse.losses import distill_loss
    from stillhouse.models import save_pretrained

    if not train:
        raise StillhouseError(f"{label}: no training examples (the training split is empty); add labeled records "
                              f"to the sources and re-run prep (and label)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(p.seed)
    rng = random.Random(p.seed)
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    metrics_path, samples_path = out_dir / "metrics.jsonl", out_dir / "samples.jsonl"
    state = {"step": 0, "best_score": -1.0, "best_step": None, "bad_evals": 0, "order": [], "cursor": 0,
             "params": asdict(p)}

    resume = out_dir / "resume"
    saved = _last_resume_state(out_dir)
    if saved is not None:
        state = json.loads((saved / "state.json").read_text())
        model.load_state_dict(torch.load(saved / "model.pt", weights_only=True), strict=False)
        opt.load_state_dict(torch.load(saved / "optimizer.pt", weights_only=True))
        rng.setstate(_tuplify(state.pop("rng")))
        torch.set_rng_state(torch.load(saved / "torch_rng.pt", weights_only=True))
        for path in (metrics_path, samples_path):  # rows logged after the checkpoint are re-done now
            _truncate_jsonl(path, state["step"])
        changed = sorted(k for k, v in asdict(p).items() if state.get("params", {}).get(k) != v)
        console.print(f"[yellow]{label}: resuming at step {state['step']} from {saved}"
                      + (f" (changed since: {', '.join(changed)})" if changed else "") + "[/]")
        state["params"] = asdict(p)
    else:
        for path in (metrics_path, samples_path):
            path.unlink(missing_ok=True)  # a fresh run: old curves would mislead

    def next_batch() -> list[Example]:
        out = []
        while len(out) < p.batch_size:
            if state["cursor"] >= len(state["order"]):
                state["order"] = rng.sample(range(len(train)), len(train))
                state["cursor"] = 0
            out.append(train[state["order"][state["cursor"]]])
            state["cursor"] += 1
        return out

    def log(path: Path, rows: list[dict]) -> None:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))

    def diverged(step: int, what: str) -> StillhouseError:
        kept = (f"the last good checkpoint (step {state['step_saved']}) is kept in {out_dir}, and a re-run "
                f"continues from it" if state.get("step_saved") else "no checkpoint had been written yet")
        return StillhouseError(
            f"{label}: {what} became NaN/inf at step {step} (learning rate {lr_at(step - 1, p):.3g}); lower the "
            f"learning rate (e.g. --set {p.lr_setting}={p.learning_rate / 10:g}) and re-run; {kept}")

    def checkpoint(step: int, ev: dict) -> None:
        if not math.isfinite(ev["val_loss"]) or not all(bool(torch.isfinite(q).all()) for q in trainable):
            raise diverged(step, "the validation loss or the weights")
        score = ev["val_score"]
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
        # resume state last (a crash before this re-does at most one eval interval), into a temp folder whose
        # state.json is written last: a kill at any moment leaves one complete copy (see _last_resume_state)
        state["step_saved"] = step
        tmp = out_dir / ".resume.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")  # dropout (LoRA) draws from it
        (tmp / "state.json").write_text(json.dumps({**state, "rng": rng.getstate()}))
        shutil.rmtree(resume, ignore_errors=True)
        tmp.rename(resume)

    def write_samples(step: int) -> None:
        """Greedy outputs for the first few validation records (the same ones every time, to compare steps)."""
        from stillhouse.records import generate

        chosen = val[: p.eval_samples]
        if not chosen:
            return
        refs = [e.input_ids[e.prompt_len:] for e in chosen]
        model.eval()
        outs = generate(model, tokenizer, [e.input_ids[: e.prompt_len] for e in chosen],
                        max_new_tokens=min(64, max(len(r) for r in refs) + 4))
        model.train()
        log(samples_path, [{"step": step, "record_id": e.record_id, "task": e.task,
                            "prompt": tokenizer.decode(e.input_ids[: e.prompt_len], skip_special_tokens=True),
                            "reference": tokenizer.decode(ref, skip_special_tokens=True).strip(), "output": out}
                           for e, ref, out in zip(chosen, refs, outs)])

    use_bf16 = p.precision == "bf16"
    model.train()
    t0, tokens_seen, stopped_early = time.time(), 0, False
    with progress_bar(label, total=p.steps, unit="step") as advance:
        advance(state["step"])
        while state["step"] < p.steps:
            step = state["step"] + 1  # the step being taken, as logged and as folders are named
            t_step = time.time()
            for group in opt.param_groups:
                group["lr"] = lr_at(step - 1, p)
            totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
            step_tokens = 0
            for _ in range(p.grad_accum_steps):
                batch = collate(next_batch(), pad_id)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    hidden, head = response_hidden(model, batch)
                out = distill_loss(
                    hidden, head, batch.targets, batch.teacher_ids if p.alpha > 0 else None,
                    batch.teacher_logprobs if p.alpha > 0 else None, temperature=p.temperature, alpha=p.alpha,
                    divergence=p.divergence, beta=p.jsd_beta, skew_alpha=p.skew_alpha,
                    chunk_tokens=p.loss_chunk_tokens,
                )
                if not torch.isfinite(out["loss"]):
                    raise diverged(step, "the training loss")
                (out["loss"] / p.grad_accum_steps).backward()
                step_tokens += int(batch.attention_mask.sum())
                for k in totals:
                    totals[k] += float(out[k].detach()) / p.grad_accum_steps
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            if not torch.isfinite(grad_norm):  # stop before the step: the weights stay the last good ones
                raise diverged(step, "the gradient")
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step
            tokens_seen += step_tokens
            log(metrics_path, [{"step": step, **{k: round(v, 5) for k, v in totals.items()}, "lr": lr_at(step - 1, p),
                                "tokens_per_s": round(step_tokens / max(time.time() - t_step, 1e-9), 1)}])
            advance(1, info=f"loss {totals['loss']:.3f}")
            if step % p.eval_every_steps == 0 or step == p.steps:
                ev = evaluate(model, val, pad_id) if val else {"val_score": -totals["loss"], "val_loss": totals["loss"]}
                log(metrics_path, [{"step": step, **ev}])
                write_samples(step)  # before the checkpoint: a resume from it never lacks this step's samples
                checkpoint(step, ev)
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


def _last_resume_state(out_dir: Path) -> Path | None:
    """The newest complete resume folder: `.resume.tmp/` when a kill hit between writing it and renaming it to
    `resume/` (its state.json is written last, so its presence means complete), else `resume/`, else None."""
    for d in (out_dir / ".resume.tmp", out_dir / "resume"):
        if (d / "state.json").exists():
            return d
    return None


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows of steps <= last_step (and drop a line torn by a kill)."""
    from stillhouse.workspace import atomic_write_text

    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(kept))


def _mergeable(model):
    """What a checkpoint folder holds: for LoRA, the base model with adapters merged (a copy; training goes on)."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, list) else x
