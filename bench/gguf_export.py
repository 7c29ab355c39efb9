"""Benchmark: GGUF export of a demo student — size, and greedy agreement with the safetensors model.

    .venv/bin/python bench/gguf_export.py --workspace stillhouse-demo [--prompts 40]

Exports WORKSPACE/export/model (the bf16 safetensors export) to f16 and q8_0 GGUF, loads each back through transformers, greedy-decodes the
test split's prompts, and compares the generated tokens with the safetensors model (f16 should be identical;
q8_0 >= 95% token agreement). Prints a table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import stillhouse  # noqa: F401  (offline environment first)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    import torch

    from stillhouse.gguf_export import write_gguf
    from stillhouse.models import ModelSource, load_model, load_tokenizer, resolve_model
    from stillhouse.records import encode_prompt, end_of_turn_id
    from stillhouse.workspace import read_jsonl

    best = args.workspace / "export" / "model"
    src = resolve_model(str(best))
    ref, tok = load_model(src), load_tokenizer(src)
    prompts = [encode_prompt(tok, r) for r in read_jsonl(args.workspace / "data" / "test.jsonl")[: args.prompts]]
    eot = end_of_turn_id(tok)

    def greedy(model) -> list[list[int]]:
        out = []
        for p in prompts:  # batch 1, no padding: token-exact comparison
            with torch.no_grad():
                g = model.generate(torch.tensor([p]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                   eos_token_id=[eot], pad_token_id=tok.pad_token_id)
            out.append(g[0, len(p):].tolist())
        return out

    ref_tokens = greedy(ref)
    rows = [("safetensors (bf16)", sum(f.stat().st_size for f in best.glob("*.safetensors")), 1.0, 1.0, 0.0)]
    tmp = Path(tempfile.mkdtemp(prefix="stillhouse-gguf-"))
    for quant in ("f16", "q8_0"):
        t0 = time.time()
        info = write_gguf(best, tmp / f"student-{quant}.gguf", quant=quant)
        seconds = time.time() - t0
        toks = greedy(load_model(ModelSource(tmp, f"student-{quant}.gguf")))
        same = sum(a == b for a, b in zip(ref_tokens, toks)) / len(toks)
        agree_n = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(ref_tokens, toks))
        total = sum(max(len(a), len(b)) for a, b in zip(ref_tokens, toks))
        rows.append((f"GGUF {quant}", info["bytes"], same, agree_n / max(1, total), seconds))

    lines = [
        "### GGUF export of the demo student: size and greedy agreement with the safetensors model",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        f"- command: `.venv/bin/python bench/gguf_export.py --workspace {args.workspace}` "
        f"({len(prompts)} test prompts, greedy, {args.max_new_tokens} new tokens, batch 1)",
        "",
        "| format | MB | identical outputs | token agreement | export s |",
        "|---|---|---|---|---|",
        *[f"| {n} | {b / 1e6:.1f} | {s:.1%} | {a:.1%} | {t:.1f} |" for n, b, s, a, t in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(ROOT / "docs" / "benchmarks.md", "a") as f:
        f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
