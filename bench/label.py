"""Benchmark: the label stage's cost and its soft-label format, with SmolLM2-135M-Instruct on this machine.

    .venv/bin/python bench/label.py [--records 256] [--batch-size 16]

On demo-like records (smart-home utterances with the demo's system prompt, answer = the intent name):
1. labeling tokens/s (teacher forward + log-softmax + top-k + encoding and writing the shard) against a bare
   forward pass over the same batches (decoder + LM head at the response positions: what any labeler must do),
   and the plain `model(...).logits` of transformers (LM head at every position) for reference; each batch is
   timed in all three ways one after the other, so a busy machine slows all three alike;
2. bytes per token and reconstruction KL (teacher's full distribution at T=2 against what is stored) for k in
   {8, 32, 50, 64}: our format, plain fp16 log-probs + int32 ids, and a DistillKit-like "budget" layout (ids packed,
   top-1 in bf16, the other k - 1 log-probs as a fitted curve a + b*rank + c*sqrt(rank) in 3 float32, the layout
   of DistillKit's `k: 50, exact_k: 1, polynomial_terms: [0, 1, sqrt]`; re-implemented here, not DistillKit itself);
3. padding waste of the batches with and without length sorting.
Prints a table and appends it to docs/benchmarks.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 2.0
KS = (8, 32, 50, 64)  # 50: the k of DistillKit's budget pick


def _records(n: int) -> list[dict]:
    from stillhouse.demo_data import INTENT_SYSTEM_PROMPT, _intent_rows

    labeled, _ = _intent_rows(n, 0, seed=0)
    return [{"id": f"intents-{i:05d}", "task": "classification",
             "messages": [{"role": "system", "content": INTENT_SYSTEM_PROMPT}, {"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": r["label"]}]} for i, r in enumerate(labeled)]


def _padding_waste(lengths: list[int], batch_size: int) -> float:
    """Share of the (B, width) token slots of all batches that are padding."""
    slots = sum(len(b) * max(b) for b in (lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)))
    return 1 - sum(lengths) / slots


def _distillkit_budget(lps: torch.Tensor) -> torch.Tensor:
    """(N, k) sorted log-probs -> the log-probs a DistillKit-like budget layout gives back: top-1 in bf16, ranks
    1..k-1 from a least-squares fit of a + b*rank + c*sqrt(rank), coefficients in float32."""
    n, k = lps.shape
    out = torch.empty_like(lps, dtype=torch.float64)
    out[:, 0] = lps[:, 0].to(torch.bfloat16).double()
    if k > 1:
        rank = torch.arange(1, k, dtype=torch.float64)
        basis = torch.stack([torch.ones_like(rank), rank, rank.sqrt()], -1)  # (k - 1, 3)
        coef = torch.linalg.lstsq(basis, lps[:, 1:].double().T).solution.T.float().double()  # (N, 3) as float32
        out[:, 1:] = coef @ basis.T
    return out.clamp_max(0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-append", action="store_true", help="print only (trial runs)")
    ap.add_argument("--sample-records", type=int, default=64, help="records whose full distribution is kept for the KL")
    args = ap.parse_args()

    from stillhouse.models import load_model, load_tokenizer, resolve_model
    from stillhouse.records import encode
    from stillhouse.softlabels import ShardReader, reconstruction_kl, topk_logprobs, write_shard
    from stillhouse.stages.label import response_logits

    src = resolve_model("asset:smollm2-135m-instruct")
    tok = load_tokenizer(src)
    model = load_model(src, "fp32")
    records = _records(args.records)
    encoded = [encode(tok, r, 256) for r in records]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # as the stage does
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    response_tokens = sum(e.response_len for e in encoded)

    response_logits(model, tok.pad_token_id, [encoded[i] for i in batches[0]])  # warm-up
    seconds = {"bare": 0.0, "label": 0.0, "hf": 0.0}
    entries: dict[int, tuple] = {}
    top64: dict[int, tuple] = {}
    full_sample: dict[int, torch.Tensor] = {}
    sample = set(order[:: max(1, len(order) // args.sample_records)][: args.sample_records])
    for batch in batches:
        chunk = [encoded[i] for i in batch]
        t0 = time.perf_counter()
        response_logits(model, tok.pad_token_id, chunk)
        t1 = time.perf_counter()
        batch_logits = response_logits(model, tok.pad_token_id, chunk)
        for i, logits in zip(batch, batch_logits):
            entries[i] = (records[i]["id"], *topk_logprobs(logits, 32, TEMPERATURE))
        t2 = time.perf_counter()
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(chunk):
            ids[row, : len(e.input_ids)], mask[row, : len(e.input_ids)] = torch.tensor(e.input_ids), 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask).logits
        t3 = time.perf_counter()
        seconds["bare"] += t1 - t0
        seconds["label"] += t2 - t1
        seconds["hf"] += t3 - t2
        # for the format comparison (not timed): top-64 of every position, the full distribution of a sample
        for i, logits in zip(batch, batch_logits):
            top64[i] = topk_logprobs(logits, 64, TEMPERATURE)
            if i in sample:
                full_sample[i] = torch.log_softmax(logits.double() / TEMPERATURE, -1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_shard(Path(tmp) / "s.safetensors", [entries[i] for i in range(len(records))], vocab_size=len(tok),
                    topk=32, temperature=TEMPERATURE)
        seconds["label"] += time.perf_counter() - t0

        # formats side by side
        vocab = model.get_output_embeddings().weight.shape[0]
        id_bits = math.ceil(math.log2(vocab))
        sample_ids = sorted(full_sample)
        full = torch.cat([full_sample[i] for i in sample_ids])  # (n, V)
        fmt_rows = []
        for k in KS:
            ids_k = {i: top64[i][0][:, :k] for i in top64}
            lps_k = {i: top64[i][1][:, :k] for i in top64}
            path = Path(tmp) / f"k{k}.safetensors"
            ours = write_shard(path, [(records[i]["id"], ids_k[i], lps_k[i]) for i in range(len(records))],
                               vocab_size=vocab, topk=k, temperature=TEMPERATURE)
            reader = ShardReader(path)
            got = [reader.get(records[i]["id"]) for i in sample_ids]
            s_ids = torch.cat([ids_k[i] for i in sample_ids])
            s_lps = torch.cat([lps_k[i] for i in sample_ids]).double()
            exact = reconstruction_kl(full, s_ids, s_lps)
            fmt_rows.append((k, "top-k exact (truncation only)", None, exact, exact))
            fmt_rows.append((k, "stillhouse v2", ours["bytes_per_token"],
                             reconstruction_kl(full, torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])), exact))
            fmt_rows.append((k, "fp16 log-probs + int32 ids", 6.0 * k,
                             reconstruction_kl(full, s_ids, s_lps.half().double()), exact))
            fmt_rows.append((k, "DistillKit-like budget (exact_k 1, [0, 1, sqrt])", k * id_bits / 8 + 2 + 12,
                             reconstruction_kl(full, s_ids, _distillkit_budget(s_lps)), exact))

    lengths = [len(e.input_ids) for e in encoded]
    waste_input, waste_sorted = _padding_waste(lengths, args.batch_size), _padding_waste(sorted(lengths), args.batch_size)
    overhead = seconds["label"] / seconds["bare"] - 1
    cmd = " ".join(["bench/label.py", *sys.argv[1:]])
    lines = [
        "### `stillhouse label`: throughput, soft-label formats, padding (SmolLM2-135M-Instruct teacher, CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}, no GPU",
        f"- command: `.venv/bin/python {cmd}`",
        f"- {len(records)} demo-like records (intent utterances with the demo's system prompt), {sum(lengths)} tokens, "
        f"{response_tokens} response tokens labeled; batch {args.batch_size}, bf16 autocast, T = {TEMPERATURE}",
        "",
        "| pass over the same batches | seconds | response tokens/s | vs bare |",
        "|---|---|---|---|",
        f"| bare forward (decoder + LM head at response positions) | {seconds['bare']:.1f} | "
        f"{response_tokens / seconds['bare']:.0f} | 1.00x |",
        f"| labeling (+ log-softmax, top-32, encode, write shard) | {seconds['label']:.1f} | "
        f"{response_tokens / seconds['label']:.0f} | {1 + overhead:.2f}x |",
        f"| transformers `model(...).logits` (LM head everywhere) | {seconds['hf']:.1f} | "
        f"{response_tokens / seconds['hf']:.0f} | {seconds['hf'] / seconds['bare']:.2f}x |",
        "",
        f"labeling overhead over the bare forward: {100 * overhead:+.1f}% (goal <= 10%)",
        "",
        f"Reconstruction KL: mean KL(teacher || stored) in nats over the {full.shape[0]} response positions of "
        f"{len(sample_ids)} records, at T = {TEMPERATURE}; bytes per token over all {response_tokens} labeled tokens "
        "(ours: the whole shard file, index and header included).",
        "",
        "The KL has two parts: the truncation to k (the same for every format at that k) and what the encoding adds.",
        "",
        "| k | format | bytes/token | reconstruction KL | added by the encoding |",
        "|---|---|---|---|---|",
        *[f"| {k} | {name} | {'-' if b is None else f'{b:.1f}'} | {kl:.5f} | {kl - exact:.2e} |"
          for k, name, b, kl, exact in fmt_rows],
        "",
        f"padding waste (batch {args.batch_size}): {100 * waste_input:.1f}% in input order, "
        f"{100 * waste_sorted:.1f}% length-sorted",
        "",
    ]
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
