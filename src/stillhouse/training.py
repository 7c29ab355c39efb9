"""The training loop shared by `adapt` (teacher, cross-entropy only) and `train` (student, KD + CE).

We own this loop on purpose (STYLE.md): forward, teacher signal, loss, backward, step, log, eval, checkpoint, in
one readable function. transformers gives the model, peft the adapters.

An example is a tokenized sequence plus, for KD, the teacher's top-k at each response position:

    Example(record_id, input_ids, prompt_len, task, teacher_ids (n, k) | None, teacher_logprobs (n, k) | None)

where n = len(input_ids) - prompt_len: position p in [prompt_len - 1, len - 2] predicts token p + 1.
"""

from __future__ import annotations

import contextlib
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


def decoder_states(model, batch: Batch, layers: tuple[int, ...] = ()):
    """One decoder forward: the final hidden states at the supervised positions (N, H), the LM head weight (V, H),
    and for each of `layers` (0-based) that layer's output at every real (non-padding) token, (M, H).
    We stop before the LM head so the (B, L, V) logits are never built: the loss applies the head chunk by chunk."""
    base = _base(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=bool(layers))
    hidden = out.last_hidden_state  # (B, L, H)
    real = batch.attention_mask.bool()  # (B, L)
    # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of layer i
    inner = [out.hidden_states[i + 1][real] for i in layers]
    return hidden[batch.rows, batch.cols], base.get_output_embeddings().weight, inner


def response_hidden(model, batch: Batch):
    """Final hidden states at the supervised positions, (N, H), and the LM head weight (V, H)."""
    hidden, head, _ = decoder_states(model, batch)
    return hidden, head


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer i of S <- teacher layer round((i + 1) * T / S) - 1: spread evenly, the last to the last."""
    return {i: round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)}


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
    loss_chunk_tokens: int = 256
    seed: int = 0
    eval_samples: int = 3  # validation records whose greedy output goes to samples.jsonl at every evaluation
    lr_setting: str = "train.learning_rate"  # the config key that sets learning_rate, named in error messages
    lr_schedule: str = "cosine"  # after warm-up: cosine | linear decay to final_lr_ratio * learning_rate | constant
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # AdamW, on matrices only (norm weights and biases are not decayed)
    max_grad_norm: float = 1.0  # 0: no clipping
    # hidden-state alignment with an online teacher: {student layer: teacher layer}, mse | cosine, its loss weight
    align_layers: dict[int, int] | None = None
    align_loss: str = "mse"
    align_weight: float = 0.0
    tensorboard: bool = True  # event files in out_dir/tensorboard/ when tensorboard is installed
    memory_hint: str = ""  # what to change when memory runs out (from the check stage's plan), named in that error


def lr_at(step: int, p: FitParams) -> float:
    """Linear warm-up, then cosine or linear decay to final_lr_ratio of the peak (or constant)."""
    if step < p.warmup_steps:
        return p.learning_rate * (step + 1) / p.warmup_steps
    if p.lr_schedule == "constant":
        return p.learning_rate
    progress = min(1.0, (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if p.lr_schedule == "cosine" else 1.0 - progress  # 1 -> 0
    return p.learning_rate * (p.final_lr_ratio + (1.0 - p.final_lr_ratio) * shape)


def evaluate(model, examples: list[Example], pad_id: int, batch_size: int = 32) -> dict:
    """Cheap validation: teacher-forced loss, and the task metric greedy decoding would get.

    A greedy decode reproduces the reference exactly iff the argmax at every response position equals the reference
    token, so "exact match" of classification answers needs one forward pass, not generation. Other tasks report the
    token accuracy of the response. val_score = mean over tasks."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    model.eval()
    per_task: dict[str, list[float]] = {}
    losses, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = _to(collate(chunk, pad_id), device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                hidden, head = response_hidden(model, batch)
            logits = (hidden.float() @ head.float().T)  # (N, V): fine at validation batch sizes
            losses += F.cross_entropy(logits, batch.targets, reduction="sum").item()
            tokens += len(batch.targets)
            correct = (logits.argmax(-1) == batch.targets).float().cpu()
            owner = batch.example_of_position.cpu()
            for i, e in enumerate(chunk):
                c = correct[owner == i]
                score = float(c.min()) if e.task == "classification" else float(c.mean())
                per_task.setdefault(e.task, []).append(score)
    model.train()
    scores = {t: sum(v) / len(v) for t, v in per_task.items()}
    return {
        "val_loss": losses / max(1, tokens),
        "val_score": sum(scores.values()) / max(1, len(scores)),
        "val_score_by_task": scores,
    }


def _to(batch: Batch, device) -> Batch:
    if device.type == "cpu":
        return batch
    return Batch(*(t.to(device) if t is not None else None for t in (
        batch.input_ids, batch.attention_mask, batch.rows, batch.cols, batch.targets, batch.teacher_ids,
        batch.teacher_logprobs, batch.example_of_position)))


def _student_loss_module(model, projections, p: FitParams):
    """The student's forward and the whole loss as one torch module: what accelerate wraps for DDP, so
    every use of a trained parameter happens inside forward(). Returns {"loss", "ce", "kd", "align"}."""
    import torch
    import torch.nn.functional as F

    from stillhouse.losses import distill_loss

    pairs = sorted((p.align_layers or {}).items())  # [(student layer, teacher layer)]

    class StudentLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.projections = model, projections

        def forward(self, batch: Batch, teacher_hidden=None, teacher_head=None, teacher_inner=()):
            with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=p.precision == "bf16"):
                hidden, head, inner = decoder_states(self.model, batch, tuple(s for s, _ in pairs))
            kd_on = p.alpha > 0
            out = distill_loss(
                hidden, head, batch.targets, batch.teacher_ids if kd_on else None,
                batch.teacher_logprobs if kd_on else None, temperature=p.temperature, alpha=p.alpha,
                divergence=p.divergence, beta=p.jsd_beta, skew_alpha=p.skew_alpha, chunk_tokens=p.loss_chunk_tokens,
                teacher_hidden=teacher_hidden if kd_on else None, teacher_head=teacher_head if kd_on else None,
            )
            align = out["loss"].new_zeros(())
            for (s, _), h_s, h_t in zip(pairs, inner, teacher_inner):  # (M, H_s), (M, H_t) at every real token
                proj = self.projections[str(s)] if self.projections is not None else None
                dtype = proj.weight.dtype if proj is not None else torch.float32  # fp32, not autocast's bf16
                h_s, h_t = h_s.to(dtype), h_t.to(dtype)
                if proj is not None:
                    h_s = proj(h_s)  # (M, H_s) -> (M, H_t)
                if p.align_loss == "mse":
                    align = align + F.mse_loss(h_s, h_t)
                else:
                    align = align + (1 - F.cosine_similarity(h_s, h_t, dim=-1)).mean()
            if pairs:
                align = align / len(pairs)
                out["loss"] = out["loss"] + p.align_weight * align
            out["align"] = align.detach()
            return out

    return StudentLoss()


def _teacher_signal(teacher, batch: Batch, p: FitParams):
    """The online teacher's final hidden states (N, H_t), LM head (V_t, H_t) and mapped layers' states (M, H_t),
    under no_grad: only what the chunked loss needs, never its (N, V) logits."""
    import torch

    if teacher is None or (p.alpha == 0 and not p.align_layers):  # nothing would use it
        return None, None, ()
    layers = tuple(t for _, t in sorted((p.align_layers or {}).items()))
    with torch.no_grad(), torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16,
                                         enabled=p.precision == "bf16"):
        hidden, head, inner = decoder_states(teacher, batch, layers)
    return hidden, head, inner


def _alignment_projections(model, teacher, p: FitParams):
    """A learned linear map student -> teacher hidden size per aligned layer (None when the sizes are equal)."""
    import torch

    if not p.align_layers:
        return None
    h_s, h_t = _base(model).config.hidden_size, _base(teacher).config.hidden_size
    if h_s == h_t:
        return None
    return torch.nn.ModuleDict({str(s): torch.nn.Linear(h_s, h_t, bias=False) for s in sorted(p.align_layers)})


def make_optimizer(trainable: list, learning_rate: float, weight_decay: float = 0.0):
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed).

    The fused kernel when every parameter is on a CPU or CUDA device: torch's default on CPU is the per-tensor
    for-loop, which takes 182 ms a step for a 50M-parameter student on 2 cores where the fused one takes 32 ms
    (the same update rule; transformers' Trainer uses the fused one by default too).
    """
    import torch

    fused = bool(trainable) and all(q.device.type in ("cpu", "cuda") and q.is_floating_point() for q in trainable)
    return torch.optim.AdamW([{"params": [q for q in trainable if q.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [q for q in trainable if q.dim() < 2], "weight_decay": 0.0}],
                             lr=learning_rate, betas=(0.9, 0.95), fused=fused or None)


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower()))


def _tensorboard(out_dir: Path, enabled: bool):
    """A SummaryWriter on out_dir/tensorboard/ when tensorboard is installed (an optional extra), else None."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def process_state():
    """accelerate's view of this process (rank, world size, device); under `accelerate launch` or torchrun it also
    joins the process group: gloo between CPU processes when the machine has no accelerator (accelerate does that
    only when told cpu=True). Stages use it to let the main process write their files."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def _accelerator(label: str):
    """accelerate's Accelerator for `fit`: plain, DDP or FSDP2, as `accelerate launch` was configured.

    accelerate (1.15) quietly runs an FSDP launch config as plain DDP when the machine has no GPU; torch's FSDP2
    does run on CPU processes over gloo, so there we switch accelerate's state to FSDP ourselves: the config means
    what it says everywhere, and the FSDP path is tested on CPU. DeepSpeed stays refused (see docs/distributed.md)."""
    import os

    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from stillhouse.errors import StillhouseError

    # checked before accelerate reads the launcher's settings: without a GPU it would run either config as DDP,
    # or fail in its own words
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise StillhouseError(f"{label}: accelerate's DeepSpeed is not supported (its engine owns gradient "
                              f"accumulation, clipping and the optimizer step, which this loop does itself); launch "
                              f"with FSDP instead, which shards the same state: examples/accelerate/fsdp.yaml, see "
                              f"docs/distributed.md")
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise StillhouseError(f"{label}: FSDP version 1 is not supported (validation and sampling call the model "
                              f"outside its wrapper); set fsdp_version: 2 in the accelerate config, as in "
                              f"examples/accelerate/fsdp.yaml")
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* env
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def _local(q):
    """This process's part of a parameter or gradient: its shard under FSDP2 (a DTensor), else the tensor itself."""
    return q.to_local() if hasattr(q, "to_local") else q


@contextlib.contextmanager
def _root_gathered(wrapped, fsdp: bool):
    """Under FSDP2 the parameters outside every decoder layer's unit (embeddings, final norm, LM head) belong to the
    root unit, which gathers them only inside its own forward. Validation and generation call the model directly:
    gather them for that long (each decoder layer still gathers its own in its forward). A no-op without FSDP."""
    if not fsdp:
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def _plain_copy(model, state_dict: dict):
    """A CPU copy of `model` outside FSDP (same transformers class, peft adapters included) that holds the
    model's part of `state_dict` (the loss module's full one, gathered on the main process: keys `model.*`):
    what a checkpoint folder is written from under FSDP. Built on the meta device, so the weights are the gathered
    tensors themselves, not a second copy."""
    import torch
    from transformers import AutoModelForCausalLM

    base = _base(model)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(base.config)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        plain = get_peft_model(plain, model.peft_config["default"])
    plain.load_state_dict({k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")},
                          assign=True)
    if hasattr(_base(plain), "tie_weights"):
        _base(plain).tie_weights()  # assign=True put two tensors where the model ties one
    return plain


def fit(model, tokenizer, train: list[Example], val: list[Example], p: FitParams, out_dir: Path,
        meta: dict, label: str = "train", teacher=None, on_eval=None) -> dict:
    """Train `model` in place; write `step-NNNNNN/`, `best/` (by val_score), `final/`, `metrics.jsonl` and
    `samples.jsonl` (a few greedy validation outputs per evaluation) in `out_dir`.

    `teacher`: an online teacher model run inside the loop (dense KD over all V tokens, and the hidden states that
    `p.align_layers` aligns); None: the examples' stored top-k soft labels, if any.
    Under `accelerate launch` each of W processes takes every W-th of the step's W * grad_accum_steps micro-batches
    (all draw the same order), gradients are averaged (DDP, or FSDP2 with sharded state: docs/distributed.md), and
    only the main process writes: W processes equal one process with W times the accumulation. Resumes from
    `out_dir/resume/` (model, optimizer, step, data order, Python and torch RNG) after a crash or Ctrl-C: rows
    logged after that checkpoint are dropped, so on CPU the result equals an uninterrupted run. A NaN/inf loss or gradient stops with a StillhouseError naming the step; the
    last good checkpoint is kept. Running out of memory stops with one that says what to change (p.memory_hint).
    on_eval(step, eval_metrics), when given, runs after each evaluation's checkpoint (the sweep's pruner).
    Returns a summary: best step and score, final metrics, tokens/s."""
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_state_dict)

    from stillhouse.errors import StillhouseError
    from stillhouse.models import save_pretrained

    if not train:
        raise StillhouseError(f"{label}: no training examples (the training split is empty); add labeled records "
                              f"to the sources and re-run prep (and label)")
    if p.align_layers and teacher is None:
        raise StillhouseError(f"{label}: hidden-state alignment needs the teacher's hidden states: set "
                              f"train.teacher_signal=online (the offline soft labels hold only log-probabilities)")
    # the device, and under `accelerate launch` the process group (see process_state)
    accelerator = _accelerator(label)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    fsdp = accelerator.distributed_type.name == "FSDP"
    device = accelerator.device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(p.seed)
    rng = random.Random(p.seed)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    projections = _alignment_projections(model, teacher, p) if teacher is not None else None
    loss_module = _student_loss_module(model, projections, p).to(device)  # before the optimizer sees the parameters
    trainable = [q for q in loss_module.parameters() if q.requires_grad]
    opt = make_optimizer(trainable, p.learning_rate, p.weight_decay)
    metrics_path, samples_path = out_dir / "metrics.jsonl", out_dir / "samples.jsonl"
    state = {"step": 0, "best_score": -1.0, "best_step": None, "bad_evals": 0, "order": [], "cursor": 0,
             "params": asdict(p)}

    resume = out_dir / "resume"
    saved = _last_resume_state(out_dir)
    if saved is not None:
        state = json.loads((saved / "state.json").read_text())  # weights and optimizer: after prepare, below
        rng.setstate(_tuplify(state.pop("rng")))
        torch.set_rng_state(torch.load(saved / "torch_rng.pt", weights_only=True))
        if main:
            for path in (metrics_path, samples_path):  # rows logged after the checkpoint are re-done now
                _truncate_jsonl(path, state["step"])
        changed = sorted(k for k, v in json.loads(json.dumps(asdict(p))).items()
                         if state.get("params", {}).get(k) != v and k != "memory_hint")
        console.print(f"[yellow]{label}: resuming at step {state['step']} from {saved}"
                      + (f" (changed since: {', '.join(changed)})" if changed else "") + "[/]")
        state["params"] = asdict(p)
    elif main:
        for path in (metrics_path, samples_path):
            path.unlink(missing_ok=True)  # a fresh run: old curves would mislead
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    accelerator.wait_for_everyone()  # no process may read files the main one is still truncating
    # DDP or FSDP under accelerate launch; one process needs no wrapper (and keeps the hot path free of accelerate's)
    torch_opt = opt  # FSDP swaps its parameters for their shards in place; accelerate wraps it for the step
    wrapped, opt = accelerator.prepare(loss_module, opt) if world > 1 else (loss_module, opt)
    trainable = [q for q in wrapped.parameters() if q.requires_grad]  # under FSDP: the shards (DTensors)
    # checkpoints and resume hold the full state: gathered onto the main process's CPU (each FSDP unit in turn)
    full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if saved is not None:  # every process reads the files (one file system; mmap: the page cache is shared) and
        # keeps its part: the whole model under DDP, its shards under FSDP
        set_state_dict(wrapped, torch_opt,
                       model_state_dict=torch.load(saved / "model.pt", weights_only=True, mmap=True),
                       optim_state_dict=torch.load(saved / "optimizer.pt", weights_only=True, mmap=True),
                       options=StateDictOptions(full_state_dict=True))
    if fsdp:  # transformers' generate then keeps all processes stepping together until the longest sample ends
        _base(model)._is_fsdp_managed_module = True
    board = _tensorboard(out_dir, p.tensorboard) if main else None

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
        if not main:
            return
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        if board is not None and path == metrics_path:
            for r in rows:
                for k, v in r.items():
                    if k != "step" and isinstance(v, (int, float)):
                        board.add_scalar(f"{'val' if k.startswith('val') else 'train'}/{k}", v, r["step"])
            board.flush()

    def diverged(step: int, what: str) -> StillhouseError:
        kept = (f"the last good checkpoint (step {state['step_saved']}) is kept in {out_dir}, and a re-run "
                f"continues from it" if state.get("step_saved") else "no checkpoint had been written yet")
        return StillhouseError(
            f"{label}: {what} became NaN/inf at step {step} (learning rate {lr_at(step - 1, p):.3g}); lower the "
            f"learning rate (e.g. --set {p.lr_setting}={p.learning_rate / 10:g}) and re-run; {kept}")

    def checkpoint(step: int, ev: dict) -> None:
        bad = torch.tensor([float(not bool(torch.isfinite(_local(q)).all())) for q in trainable]).sum()
        if not math.isfinite(ev["val_loss"]) or accelerator.reduce(bad.to(device), "sum").item() > 0:
            raise diverged(step, "the validation loss or the weights")
        score = ev["val_score"]
        improved = score > state["best_score"]
        if improved:
            state["best_score"], state["best_step"], state["bad_evals"] = score, step, 0
        else:
            state["bad_evals"] += 1
        state["step_saved"] = step
        model_sd, opt_sd = get_state_dict(wrapped, torch_opt, options=full_state)  # every process takes part
        if not main:  # every process keeps the same state; one writes it
            return
        saved_model = _mergeable(_plain_copy(model, model_sd) if fsdp else model)
        name = f"step-{step:06d}"
        save_pretrained(saved_model, tokenizer, out_dir / name, {**meta, "step": step, "val_score": score})
        if improved:
            save_pretrained(saved_model, tokenizer, out_dir / "best", {**meta, "step": step, "val_score": score})
        steps = sorted(d for d in out_dir.glob("step-*") if d.is_dir())
        for old in steps[: -p.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        # resume state last (a crash before this re-does at most one eval interval), into a temp folder whose
        # state.json is written last: a kill at any moment leaves one complete copy (see _last_resume_state)
        tmp = out_dir / ".resume.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(model_sd, tmp / "model.pt")  # keys of the loss module: model.*, projections.*
        torch.save(opt_sd, tmp / "optimizer.pt")  # keyed by parameter name, so any launch mode can resume it
        torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")  # dropout (LoRA) draws from it
        (tmp / "state.json").write_text(json.dumps({**state, "rng": rng.getstate()}))
        shutil.rmtree(resume, ignore_errors=True)
        tmp.rename(resume)

    def write_samples(step: int) -> None:
        """Greedy outputs for the first few validation records (the same ones every time, to compare steps)."""
        from stillhouse.records import generate

        chosen = val[: p.eval_samples]
        if not chosen or not (main or fsdp):  # under FSDP every process takes part in each forward
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

    def train_step(step: int) -> dict:
        """One optimizer step over W * grad_accum_steps micro-batches; this process takes every W-th of them."""
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, p)
        totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss, ce, kd, align, tokens
        mine = []
        for j in range(world * p.grad_accum_steps):
            examples = next_batch()  # every process draws every micro-batch: the same order everywhere
            if j % world == rank:
                mine.append(examples)
        for i, examples in enumerate(mine):
            batch = _to(collate(examples, pad_id), device)
            t_hidden, t_head, t_inner = _teacher_signal(teacher, batch, p)
            last = i == len(mine) - 1
            with accelerator.no_sync(wrapped) if not last else contextlib.nullcontext():  # sync once per step
                out = wrapped(batch, t_hidden, t_head, t_inner)
                if not torch.isfinite(out["loss"]):
                    raise diverged(step, "the training loss")
                accelerator.backward(out["loss"] / p.grad_accum_steps)
            totals += torch.stack([out[k].detach().double() / p.grad_accum_steps
                                   for k in ("loss", "ce", "kd", "align")] + [batch.attention_mask.sum().double()])
        if world > 1:  # the logged loss is the mean over all processes' micro-batches; tokens their sum
            totals = accelerator.reduce(totals, "sum") * torch.tensor([1 / world] * 4 + [1.0], dtype=totals.dtype,
                                                                         device=device)
        grad_norm = accelerator.clip_grad_norm_(trainable, p.max_grad_norm if p.max_grad_norm > 0 else float("inf"))
        if not torch.isfinite(grad_norm):  # stop before the step: the weights stay the last good ones
            raise diverged(step, "the gradient")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return dict(zip(("loss", "ce", "kd", "align", "tokens"), totals.tolist()))

    model.train()
    t0, tokens_seen, stopped_early = time.time(), 0, False
    try:
        with progress_bar(label, total=p.steps, unit="step") as advance:
            advance(state["step"])
            while state["step"] < p.steps:
                step = state["step"] + 1  # the step being taken, as logged and as folders are named
                t_step = time.time()
                totals = train_step(step)
                step_tokens = int(totals.pop("tokens"))
                if not p.align_layers:
                    totals.pop("align")
                state["step"] = step
                tokens_seen += step_tokens
                log(metrics_path, [{"step": step, **{k: float(f"{v:.6g}") for k, v in totals.items()},
                                    "lr": lr_at(step - 1, p),
                                    "tokens_per_s": round(step_tokens / max(time.time() - t_step, 1e-9), 1)}])
                advance(1, info=f"loss {totals['loss']:.3f}")
                if step % p.eval_every_steps == 0 or step == p.steps:
                    with _root_gathered(wrapped, fsdp):
                        ev = (evaluate(model, val, pad_id) if val
                              else {"val_score": -totals["loss"], "val_loss": totals["loss"]})
                        log(metrics_path, [{"step": step, **ev}])
                        write_samples(step)  # before the checkpoint: a resume from it never lacks this step's samples
                    checkpoint(step, ev)
                    accelerator.wait_for_everyone()
                    if on_eval is not None:  # e.g. the sweep's pruner; what it raises stops training here
                        on_eval(step, ev)
                    if p.early_stopping_patience and state["bad_evals"] >= p.early_stopping_patience:
                        stopped_early = True
                        console.print(f"{label}: early stop at step {step} (no improvement in {state['bad_evals']} evals)")
                        break
    except Exception as e:
        if not _is_out_of_memory(e):
            raise
        at = f"at step {state['step'] + 1}" if state["step"] < p.steps else "after the last step"
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise StillhouseError(f"{label}: out of memory {at} on {device} ({detail}); "
                              + (p.memory_hint or "lower the batch size, or enable LoRA") + "; after the change a re-run "
                              "continues from the last checkpoint, if one was written") from None
    finally:
        if board is not None:
            board.close()
    final_sd = get_model_state_dict(wrapped, options=full_state) if fsdp else None  # every process gathers
    if main:
        save_pretrained(_mergeable(_plain_copy(model, final_sd) if fsdp else model), tokenizer, out_dir / "final",
                        {**meta, "step": state["step"]})
        shutil.rmtree(resume, ignore_errors=True)
    accelerator.wait_for_everyone()
    seconds = time.time() - t0
    return {
        "steps": state["step"], "best_step": state["best_step"], "best_val_score": state["best_score"],
        "stopped_early": stopped_early, "train_seconds": round(seconds, 1),
        "train_tokens_per_second": round(tokens_seen / max(seconds, 1e-9), 1),
        "processes": world, "distributed": accelerator.distributed_type.name,
        # what the main process holds of the student's parameters: all of them, or its shards under FSDP
        "parameter_bytes_main_process": sum(_local(q).numel() * q.element_size() for q in wrapped.parameters()),
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
