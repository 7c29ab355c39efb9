"""Benchmark: `stillhouse check`'s memory estimates against measured peak memory on this machine (CPU).

    .venv/bin/python bench/check_memory.py [--only tiny|smollm2] [--no-append]

For a tiny random Llama (4 layers, hidden 64, the SmolLM2 tokenizer's 49,152 rows) and for SmolLM2-135M
(teacher, 30 layers) with a 6-layer student derived from it, each phase runs in a fresh subprocess the way the
stages run it:

- label: the teacher (fp32 weights, bf16 autocast) writes label.max_new_tokens tokens for max(label.batch_size, 32)
  prompts of label.max_seq_len tokens, encodes label.batch_size sequences of label.max_seq_len tokens,
  then each record's (n, V) logits -> top-k log-probabilities, one record at a time (stages/label.py);
- train: two steps of the real loop's pieces (training.collate, response_hidden under bf16 autocast, the chunked
  losses.distill_loss with soft labels, AdamW on fp32 weights), every position supervised (the worst case);
- serve: the student as `stillhouse serve` runs it on CPU (fp32 weights, bf16 autocast) decodes
  SERVE_CONCURRENT_REQUESTS requests of label.max_seq_len prompt + serve.max_tokens new tokens.

Measured = peak RSS of the child (VmHWM, reset after a warm-up) minus its RSS after the imports, before the model is loaded. The
child runs with MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed buffers instead of keeping them mapped
(without it a chunked loss shows several times its real size; see shared/PITFALLS.md). Estimated = the
`hardware_plan` phase without its CUDA-runtime part (no GPU here); serving is compared with the plan's
formula at the weight width the CPU server loads (fp32). Prints a table and appends it to docs/benchmarks.md.
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
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MB = 1e6

# (name, teacher layers / hidden or "smollm2", derived student layers, config overrides)
CASES = {
    "tiny": {"student_layers": 2, "settings": {"label": {"batch_size": 8, "max_seq_len": 128, "max_new_tokens": 16},
                                               "train": {"batch_size": 8, "loss_chunk_tokens": 256},
                                               "serve": {"max_tokens": 32}}},
    "smollm2": {"student_layers": 6, "settings": {"label": {"batch_size": 8, "max_seq_len": 256, "max_new_tokens": 16},
                                                  "train": {"batch_size": 8, "loss_chunk_tokens": 1024},
                                                  "serve": {"max_tokens": 32}}},
}


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak() -> None:
    # Linux: "5" resets this process's peak RSS (VmHWM) to its current RSS. Not ru_maxrss: that one survives
    # fork + exec, so a child would report the parent's peak (the parent holds SmolLM2).
    Path("/proc/self/clear_refs").write_text("5")


def _peak_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024  # kB


# ------------------------------------------------------------------------------------------------ children


def _warm_up() -> None:
    """Run every code path once on a model of a few kB, so that lazy imports (the Llama modeling code, generation
    utilities) and one-time kernel setup land in the baseline instead of in the measured phase."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().sum().backward()
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    torch.optim.AdamW(model.parameters()).step()


def _child(phase: str, model_dir: str, settings: dict) -> dict:
    """Run one phase in this (fresh) process; return the baseline and peak RSS in bytes."""
    import torch

    import stillhouse  # noqa: F401  (offline environment)
    from stillhouse.config import validate
    from stillhouse.losses import distill_loss
    from stillhouse.models import load_model, resolve_model
    from stillhouse.softlabels import topk_logprobs
    from stillhouse.stages.check import SERVE_CONCURRENT_REQUESTS
    from stillhouse.training import Example, collate, response_hidden

    torch.manual_seed(0)
    cfg = validate(settings, workspace=Path("."), source="bench")
    _warm_up()
    _reset_peak()
    baseline = _rss_bytes()
    model = load_model(resolve_model(model_dir), "fp32")
    vocab = model.get_output_embeddings().weight.shape[0]
    seq = cfg.label.max_seq_len

    if phase == "label":
        prompts = torch.randint(0, vocab, (max(cfg.label.batch_size, 32), seq))  # label.py generates in batches >= 32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=cfg.label.max_new_tokens,
                           min_new_tokens=cfg.label.max_new_tokens, do_sample=False, pad_token_id=0)
        ids = torch.randint(0, vocab, (cfg.label.batch_size, seq))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            for row in range(len(ids)):
                logits = hidden[row, : seq - 1].float() @ head.float().T  # (n, V), one record at a time
                topk_logprobs(logits, cfg.label.topk, cfg.label.temperature)
    elif phase == "train":
        k = cfg.label.topk
        examples = [Example(f"r{i}", torch.randint(0, vocab, (seq,)).tolist(), 1, "text",
                            torch.randint(0, vocab, (seq - 1, k)), torch.log_softmax(torch.randn(seq - 1, k), -1) - 1.0)
                    for i in range(cfg.train.batch_size)]
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        for _ in range(2):  # the second step runs with AdamW's moments allocated
            batch = collate(examples, 0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden, head = response_hidden(model, batch)
            out = distill_loss(hidden, head, batch.targets, batch.teacher_ids, batch.teacher_logprobs,
                               temperature=cfg.label.temperature, alpha=0.5, chunk_tokens=cfg.train.loss_chunk_tokens)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif phase == "serve":
        ids = torch.randint(0, vocab, (SERVE_CONCURRENT_REQUESTS, seq))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.serve.max_tokens,
                           min_new_tokens=cfg.serve.max_tokens, do_sample=False, pad_token_id=0)
    else:
        raise SystemExit(f"unknown phase {phase}")
    return {"baseline": baseline, "peak": _peak_bytes()}


def _run_child(phase: str, model_dir: Path, settings: dict) -> float:
    cmd = [sys.executable, __file__, "--child", phase, "--model", str(model_dir), "--settings", json.dumps(settings)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["peak"] - got["baseline"]


# -------------------------------------------------------------------------------------------------- parent


def _models(case: str, tmp: Path) -> tuple[Path, Path]:
    """Save the teacher and its derived student as safetensors folders (children load them quickly)."""
    from stillhouse.models import derive_student, load_model, load_tokenizer, resolve_model, save_pretrained, tiny_random_model

    src = resolve_model("asset:smollm2-135m-instruct")
    tok = load_tokenizer(src)
    teacher = tiny_random_model(tok, num_layers=4, hidden_size=64) if case == "tiny" else load_model(src, "fp32")
    student, _ = derive_student(teacher, CASES[case]["student_layers"])
    return save_pretrained(teacher, tok, tmp / f"{case}-teacher"), save_pretrained(student, tok, tmp / f"{case}-student")


def _estimates(teacher_dir: Path, student_dir: Path, settings: dict) -> dict[str, float]:
    """The plan's bytes per measured phase, without the CUDA runtime part."""
    from stillhouse.config import validate
    from stillhouse.models import resolve_model
    from stillhouse.stages.check import _decoder_params, _phase_bytes, model_shape, read_model_config, serve_bytes

    cfg = validate(settings, workspace=Path("."), source="bench")
    t = model_shape(read_model_config(resolve_model(str(teacher_dir))))
    s = model_shape(read_model_config(resolve_model(str(student_dir))))
    phases = _phase_bytes(t, s, cfg)

    def without_runtime(parts: dict) -> float:
        return sum(v for k, v in parts.items() if k != "runtime")

    return {"label": without_runtime(phases["label_teacher"]), "train": without_runtime(phases["train_full"]),
                        # the CPU server: fp32 weights with bf16 autocast copies of the decoder's
            "serve": without_runtime(serve_bytes(s, cfg, 4)) + _decoder_params(s) * 2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--model")
    ap.add_argument("--settings")
    ap.add_argument("--only", choices=list(CASES))
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.model, json.loads(args.settings))))
        return
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="stillhouse-mem-") as tmp:
        for case in [args.only] if args.only else list(CASES):
            teacher_dir, student_dir = _models(case, Path(tmp))
            settings = CASES[case]["settings"]
            estimate = _estimates(teacher_dir, student_dir, settings)
            for phase, model_dir in (("label", teacher_dir), ("train", student_dir), ("serve", student_dir)):
                t0 = time.time()
                measured = _run_child(phase, model_dir, settings)
                err = estimate[phase] / measured - 1
                rows.append((case, phase, measured / MB, estimate[phase] / MB, err, time.time() - t0))
                print(f"{case} {phase}: measured {measured / MB:.0f} MB, estimated {estimate[phase] / MB:.0f} MB ({err:+.0%})", flush=True)

    lines = [
        "### `stillhouse check`: estimated vs measured peak memory (CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, no GPU",
        f"- command: `.venv/bin/python bench/check_memory.py{' --only ' + args.only if args.only else ''}`; each phase in a fresh "
        "subprocess with `MALLOC_MMAP_THRESHOLD_=65536`; measured = peak RSS minus RSS after imports; estimated = "
        "`hardware_plan`'s phase without the 0.4 GB CUDA runtime part (serving: its formula at the CPU server's fp32 weights + autocast copies)",
        "- tiny: 4-layer hidden-64 Llama over the 49,152-token SmolLM2 tokenizer, 2-layer derived student; label/train "
        "batch 8 x 128 tokens, loss chunk 256; smollm2: SmolLM2-135M teacher, 6-layer derived student, batch 8 x 256, "
        "loss chunk 1024; serving 8 requests, 32 new tokens",
        "",
        "| model | phase | measured MB | estimated MB | estimate error | seconds |",
        "|---|---|---|---|---|---|",
        *[f"| {c} | {p} | {m:.0f} | {e:.0f} | {err:+.0%} | {s:.0f} |" for c, p, m, e, err, s in rows],
        "",
    ]
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
