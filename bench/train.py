"""Benchmark: the training loop's speed and the loss's memory, side by side in one run.

    .venv/bin/python bench/train.py memory            # peak RSS of the loss, chunked vs naive, allocator on/off
    PYTHONPATH=DIR .venv/bin/python bench/train.py speed [--rounds 3] [--steps 6] [--workspace WS] [--low-memory]
    .venv/bin/python bench/train.py optimizer         # one AdamW step: for-loop vs foreach vs fused (training.make_optimizer)

memory: LM head + loss forward and backward at V = 49,152, H = 576, batch 4 x seq 1,024 (N = 4,096 positions,
top-32 teacher labels), each variant in its own process; peak RSS above the inputs (/proc VmHWM after a reset).
"allocator low" is what STILLHOUSE_LOW_MEMORY=1 sets (`use_low_memory_allocator`: glibc M_MMAP_THRESHOLD =
64 KiB); "glibc default" is a plain Python process, and the CLI's default.

speed: SmolLM2-135M-Instruct teacher, a 6-layer student derived from it, batch 8 x <= 64 tokens of the quick demo's
labeled records, bf16 autocast, AdamW; tokens/s of plain cross-entropy, offline top-32 KD (labels computed once,
before timing, as `stillhouse label` does; the loss chunk `fit` uses), AdamW built as `fit` builds it (fused), naive online KD (the teacher runs inside
the loop; full (B, L, V) logits for both, full-vocabulary KL) and TRL's GKDTrainer with lmbda = 0 (the teacher in
the loop, its own Trainer loop) on the same token ids and batches. The machine is shared, so the losses run
interleaved: `--rounds` rounds, each running every loss (in rotated order) for 2 warm-up + `--steps` timed steps
on a fresh student; the table gives the median over rounds and the median of the per-round ratios to CE.
The GKD row needs trl (1.16, `pip install --no-deps`) and `datasets` importable, e.g. installed with
`pip install --target DIR` and passed with PYTHONPATH=DIR; without them the row is skipped with a note.
optimizer: the 6-layer student's parameters with random gradients, AdamW.step() timed (best of 5 after one warm-up
step) with torch's CPU default (the per-tensor for-loop), foreach, and fused (what `fit` uses).
Each appends a table to docs/benchmarks.md with the date, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, BATCH, SEQ, TOPK, T = 49_152, 576, 4, 1_024, 32, 2.0


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def memory_child(variant: str, chunk_tokens: int, low_allocator: bool) -> dict:
    """One measurement, in this (fresh) process: peak RSS of forward + backward above the inputs, MiB."""
    import torch

    from stillhouse.losses import distill_loss, kd_divergence
    from stillhouse.training import use_low_memory_allocator

    applied = use_low_memory_allocator() if low_allocator else False
    torch.manual_seed(0)
    n = BATCH * SEQ
    hidden = (torch.randn(n, HIDDEN) * 0.5).requires_grad_()  # (N, H)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.05).requires_grad_()  # (V, H)
    targets = torch.randint(0, VOCAB, (n,))
    ids = torch.stack([torch.randperm(VOCAB)[:TOPK] for _ in range(64)]).repeat(n // 64, 1)  # (N, k) distinct per row
    lps = torch.log(torch.softmax(torch.randn(n, TOPK), -1) * 0.9)  # (N, k), 10% tail mass
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: only what follows counts
    base = _rss_mib("VmRSS")
    t0 = time.time()
    if variant == "naive":  # the (N, V) logits at once, then the loss: what the chunking avoids
        logits = hidden @ weight.T
        ce = torch.nn.functional.cross_entropy(logits, targets)
        kd = kd_divergence(logits, ids, lps, temperature=T).mean()
        loss = 0.5 * ce + 0.5 * T**2 * kd
    else:
        loss = distill_loss(hidden, weight, targets, ids, lps, temperature=T, alpha=0.5, chunk_tokens=chunk_tokens)["loss"]
    loss.backward()
    return {"peak_mib": round(_rss_mib("VmHWM") - base, 0), "seconds": round(time.time() - t0, 2),
            "loss": float(loss), "allocator_applied": applied}


def memory() -> list[str]:
    variants = [("naive", 0), ("chunked", 1024), ("chunked", 512), ("chunked", 256)]
    results = {}
    for low in (False, True):
        for variant, chunk in variants:
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            out = subprocess.run([sys.executable, __file__, "_memory_child", variant, str(chunk), str(int(low))],
                                 env=env, capture_output=True, text=True, check=True)
            results[(variant, chunk, low)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(variant, chunk, low, results[(variant, chunk, low)], flush=True)
    lines = [f"### train: peak memory of the loss (LM head + KD/CE loss, forward + backward)", "",
             *_header("memory"),
             f"- V = {VOCAB:,}, H = {HIDDEN}, batch {BATCH} x seq {SEQ:,} = {BATCH * SEQ:,} positions, top-{TOPK} labels, "
             f"fp32, T = {T}, alpha = 0.5; peak RSS above the inputs (VmHWM), one process per cell; "
             "the (V, H) head gradient (108 MiB) counts in every row", "",
             "| variant | chunk tokens | glibc default, the CLI's default (MiB) | allocator low, STILLHOUSE_LOW_MEMORY=1 (MiB) | vs naive (low) | seconds |",
             "|---|---|---|---|---|---|"]
    naive = results[("naive", 0, True)]["peak_mib"]
    for variant, chunk in variants:
        off, on = results[(variant, chunk, False)], results[(variant, chunk, True)]
        lines.append(f"| {variant} | {chunk or '-'} | {off['peak_mib']:.0f} | {on['peak_mib']:.0f} | "
                     f"{on['peak_mib'] / naive:.2f}x | {on['seconds']} |")
    same = abs(results[("chunked", 1024, True)]["loss"] - results[("naive", 0, True)]["loss"])
    lines += ["", f"chunked vs naive loss: |difference| = {same:.2e} (gradients: tests/test_losses.py); "
              f"goal <= 0.15x of naive", ""]
    return lines


def _header(part: str) -> list[str]:
    return [f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores "
            f"(shared; runs serialized with flock), Python {platform.python_version()}, no GPU",
            f"- command: `.venv/bin/python bench/train.py {part}`"]


def speed(rounds: int, steps: int, workspace: Path | None, low_memory: bool) -> list[str]:
    """tokens/s of one training step per loss, the modes interleaved round by round (see the module docstring)."""
    import statistics

    import torch

    from stillhouse.models import derive_student, load_model, load_tokenizer, resolve_model
    from stillhouse.softlabels import topk_logprobs
    from stillhouse.training import Example, collate, labeled_examples, response_hidden, use_low_memory_allocator
    from stillhouse.workspace import read_jsonl

    if low_memory:
        use_low_memory_allocator()  # what STILLHOUSE_LOW_MEMORY=1 sets; the CLI's default is glibc's own
    if workspace is None:  # the quick demo's records (data only; its models are not used)
        workspace = Path(tempfile.mkdtemp(prefix="stillhouse-bench-")) / "demo"
        subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(workspace), "demo", "--quick"], check=True,
                       env={**os.environ, "STILLHOUSE_QUIET": "1"}, capture_output=True)
    src = resolve_model("asset:smollm2-135m-instruct")
    tok, teacher = load_tokenizer(src), load_model(src)
    teacher.eval()
    examples = labeled_examples(tok, read_jsonl(workspace / "data" / "train.jsonl"), max_seq_len=64)[:64]
    # offline labels, as `stillhouse label` stores them: teacher top-k at T over the full vocabulary
    labeled = []
    with torch.no_grad():
        for e in examples:
            b = collate([e], tok.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden, head = response_hidden(teacher, b)
            ids, lps = topk_logprobs(hidden.float() @ head.float().T, TOPK, T)
            labeled.append(Example(e.record_id, e.input_ids, e.prompt_len, e.task, ids, lps))
    batches = [labeled[i * 8 % len(labeled):][:8] for i in range(steps + 2)]  # 2 warm-up steps, then `steps` timed

    modes = {
        "ce": "plain cross-entropy (chunked head + CE)",
        "kd": f"offline top-{TOPK} KD (stored labels, chunked head + loss), alpha 0.5",
        "online": "naive online KD (teacher forward in the loop, full logits, full-vocabulary KL)",
    }
    try:
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
        modes["gkd"] = "TRL GKDTrainer, lmbda 0 (teacher forward in the loop), beta 0 (forward KL)"
        gkd_note = ""
    except ImportError as e:
        gkd_note = (f"TRL GKDTrainer row skipped: {e} (install trl==1.16.* with --no-deps, plus datasets and its "
                    "dependencies, e.g. with `pip install --target DIR` and PYTHONPATH=DIR)")
        print(gkd_note, flush=True)

    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        order = list(modes)[r % len(modes):] + list(modes)[: r % len(modes)]  # rotate: no mode always runs first
        for mode in order:
            student, _ = derive_student(teacher, 6)
            tokens, seconds = (_gkd_steps if mode == "gkd" else _own_steps)(mode, student, teacher, tok, batches)
            rates[mode].append(tokens / seconds)
            print(f"round {r}: {mode} {tokens / seconds:.1f} tokens/s", flush=True)
            del student
    med = {m: statistics.median(v) for m, v in rates.items()}
    # the ratio per round, then its median: both sides of a ratio ran minutes apart at most
    ratio = {m: statistics.median(a / c for a, c in zip(v, rates["ce"])) for m, v in rates.items()}
    mean_len = sum(len(e.input_ids) for e in labeled) / len(labeled)
    positions = sum(len(e.input_ids) - e.prompt_len for e in labeled) / len(labeled) * 8
    lines = ["### train: tokens/s of the training step, offline top-k KD vs cross-entropy vs online KD vs TRL GKD", "",
             *_header(f"speed --rounds {rounds} --steps {steps}" + (" --low-memory" if low_memory else "")),
             f"- teacher SmolLM2-135M-Instruct (GGUF, dequantized, fp32 weights), student: 6 of its 30 layers "
             f"(derived), batch 8 x {mean_len:.0f} tokens on average (quick-demo records, <= 64; {positions:.0f} "
             f"supervised positions per batch), bf16 autocast, AdamW (fused, as `fit` and transformers' Trainer use it), grad clipping; per round and loss a fresh "
             f"student, 2 warm-up steps, then {steps} timed steps; {rounds} rounds with the losses in rotated order; "
             f"tokens/s = median over rounds, ratio = median of the per-round ratios to CE; allocator: "
             + ("low (M_MMAP_THRESHOLD 64 KiB, STILLHOUSE_LOW_MEMORY=1)" if low_memory else "glibc default (the CLI's default)"),
             "", "| loss | tokens/s (median) | per round | vs plain CE |", "|---|---|---|---|"]
    for mode, label in modes.items():
        lines.append(f"| {label} | {med[mode]:.1f} | {', '.join(f'{x:.0f}' for x in rates[mode])} | {ratio[mode]:.2f}x |")
    lines += ["", f"offline KD / CE = {ratio['kd']:.2f}x (goal >= 0.9x); offline KD / naive online KD = "
              f"{med['kd'] / med['online']:.2f}x"
              + (f"; offline KD / TRL GKDTrainer = {med['kd'] / med['gkd']:.2f}x (goal >= 1.8x)" if "gkd" in med else ""),
              *([gkd_note] if gkd_note else []), ""]
    return lines


def optimizer() -> list[str]:
    """Seconds of one AdamW step over the derived 6-layer student, by implementation (see the module docstring)."""
    import torch

    from stillhouse.models import derive_student, load_model, resolve_model

    student, _ = derive_student(load_model(resolve_model("asset:smollm2-135m-instruct")), 6)
    params = [q for q in student.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q)
    rows = []
    for label, kw in (("for-loop (torch's CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                      ("fused (`training.make_optimizer`)", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), **kw)
        opt.step()  # allocates the moments
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            opt.step()
            best = min(best, time.perf_counter() - t0)
        rows.append((label, best))
    n = sum(q.numel() for q in params)
    return ["### train: one AdamW step by implementation", "", *_header("optimizer"),
            f"- the derived 6-layer SmolLM2 student, {n / 1e6:.1f}M fp32 parameters, random gradients; best of 5 steps",
            "", "| AdamW | ms per step | vs fused |", "|---|---|---|",
            *(f"| {label} | {t * 1000:.0f} | {t / rows[-1][1]:.1f}x |" for label, t in rows), ""]


def _own_steps(mode: str, student, teacher, tok, batches) -> tuple[int, float]:
    """Our training step (as `training.fit` takes it) for `mode`; (tokens, seconds) over the timed steps."""
    import torch
    import torch.nn.functional as F

    from stillhouse.losses import distill_loss
    from stillhouse.training import FitParams, collate, make_optimizer, response_hidden

    student.train()
    opt = make_optimizer([q for q in student.parameters() if q.requires_grad], 1e-4)  # as `fit` builds it
    tokens, t0 = 0, 0.0
    for i, exs in enumerate(batches):
        if i == 2:  # after warm-up
            tokens, t0 = 0, time.perf_counter()
        b = collate(exs, tok.pad_token_id)
        if mode == "online":  # naive: full logits of both models, full-vocabulary KL at T
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    t_logits = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.rows, b.cols]
                s_logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.rows, b.cols]
            s_logits, t_logits = s_logits.float(), t_logits.float()
            kd = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                          reduction="batchmean")
            loss = 0.5 * F.cross_entropy(s_logits, b.targets) + 0.5 * T**2 * kd
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden, head = response_hidden(student, b)
            kd_on = mode != "ce"
            loss = distill_loss(hidden, head, b.targets, b.teacher_ids if kd_on else None,
                                b.teacher_logprobs if kd_on else None, temperature=T, alpha=0.5 if kd_on else 0.0,
                                chunk_tokens=FitParams.loss_chunk_tokens)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b.attention_mask.sum())
    return tokens, time.perf_counter() - t0


def _gkd_steps(mode: str, student, teacher, tok, batches) -> tuple[int, float]:
    """TRL's GKDTrainer on the same token ids and batches (lmbda = 0: no student generation, the teacher runs
    inside every step); (tokens, seconds) over the timed steps, from step-begin / step-end callbacks."""
    import pyarrow as pa
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{"input_ids": e.input_ids, "prompt": "",
             "completion_mask": [0] * e.prompt_len + [1] * (len(e.input_ids) - e.prompt_len)}
            for exs in batches for e in exs]
    clock = {"tokens": 0, "t0": 0.0, "t1": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:  # after warm-up
                clock["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock["t1"] = time.perf_counter()

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if self.state.global_step >= 2:
                clock["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **kw)

    # a fixed fingerprint: hashing the table itself fails here (dill cannot pickle pyarrow's MonthDayNano type)
    dataset = Dataset(pa.Table.from_pylist(rows), fingerprint="stillhouse-bench-train")
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(output_dir=out, per_device_train_batch_size=8, max_steps=len(batches), learning_rate=1e-4,
                         lmbda=0.0, beta=0.0, temperature=T, bf16=True, use_cpu=True, save_strategy="no",
                         report_to=[], logging_steps=10_000, disable_tqdm=True, train_sampling_strategy="sequential",
                         max_length=64, dataloader_num_workers=0, seed=0)
        trainer = Counting(model=student, teacher_model=teacher, args=args, processing_class=tok,
                           train_dataset=dataset, callbacks=[Clock()])
        trainer.train()
    return clock["tokens"], clock["t1"] - clock["t0"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["memory", "speed", "optimizer"])
    ap.add_argument("--steps", type=int, default=6, help="speed: timed steps per loss and round")
    ap.add_argument("--rounds", type=int, default=3, help="speed: rounds over all the losses")
    ap.add_argument("--low-memory", action="store_true", help="speed: with the low-memory allocator (STILLHOUSE_LOW_MEMORY=1)")
    ap.add_argument("--workspace", type=Path, help="a quick-demo workspace whose data/ to use (default: make one)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = ap.parse_args()
    lines = (memory() if args.part == "memory" else optimizer() if args.part == "optimizer"
             else speed(args.rounds, args.steps, args.workspace, args.low_memory))
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
