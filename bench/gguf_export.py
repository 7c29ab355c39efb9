"""Benchmark: GGUF export of a demo student — size, and greedy agreement with the safetensors model, read by
transformers and by llama.cpp itself.

    .venv/bin/python bench/gguf_export.py --workspace stillhouse-demo [--prompts 40]

Exports WORKSPACE/export/model (the bf16 safetensors export) to f16, q8_0 and q4_0 GGUF, greedy-decodes the test
split's prompts (the same token ids) with each file loaded back through transformers and, when llama-cpp-python is
installed (`pip install llama-cpp-python`: it compiles llama.cpp), run by llama.cpp, and compares the generated
tokens with the safetensors model's. Prints a table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import stillhouse  # noqa: F401  (offline environment first)

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def llama_cpp_without_repack() -> None:
    """Load llama.cpp models without its "extra buffer types" (the CPU weight repacking for Q4_0/Q8_0, AMX here).
    Measured on this machine (llama-cpp-python 0.3.36 built from source, CPU with AMX_INT8 and AVX512): with
    them, decoding any Q8_0/Q4_0 GGUF segfaults (exit 139); without them the same files run. F16 is unaffected."""
    from llama_cpp import llama as llama_module
    from llama_cpp import llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = llama_module.llama_cpp.llama_model_default_params = params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_0"])
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

    def agreement(toks: list[list[int]]) -> tuple[float, float]:
        """(share of identical outputs, share of equal tokens position by position) against the safetensors model"""
        same = sum(a == b for a, b in zip(ref_tokens, toks)) / len(toks)
        agree_n = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(ref_tokens, toks))
        return same, agree_n / max(1, sum(max(len(a), len(b)) for a, b in zip(ref_tokens, toks)))

    def llama_cpp_greedy(path: Path) -> list[list[int]] | None:
        try:
            from llama_cpp import Llama
        except ImportError:
            return None
        llama_cpp_without_repack()
        llm = Llama(str(path), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
        out = []
        for p in prompts:
            toks = []
            for t in llm.generate(p, top_k=1, temp=0.0, reset=True):  # greedy, from the same prompt ids
                toks.append(t)  # as transformers does above: the end-of-turn token it stops at is kept
                if t == eot or len(toks) == args.max_new_tokens:
                    break
            out.append(toks)
        return out

    rows = [("safetensors (bf16)", sum(f.stat().st_size for f in best.glob("*.safetensors")), 1.0, 1.0, 0.0, None)]
    tmp = Path(tempfile.mkdtemp(prefix="stillhouse-gguf-"))
    for quant in args.quants:
        t0 = time.time()
        info = write_gguf(best, tmp / f"student-{quant}.gguf", quant=quant)
        seconds = time.time() - t0
        same, agree = agreement(greedy(load_model(ModelSource(tmp, f"student-{quant}.gguf"))))
        cpp = llama_cpp_greedy(tmp / f"student-{quant}.gguf")
        rows.append((f"GGUF {quant}", info["bytes"], same, agree, seconds, agreement(cpp) if cpp else None))
        print(*rows[-1], f"{time.time() - t0:.0f} s", flush=True)  # progress, in case of a timeout

    lines = [
        "### GGUF export of the demo student: size and greedy agreement with the safetensors model",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        f"- command: `.venv/bin/python bench/gguf_export.py --workspace {args.workspace} --prompts {args.prompts} "
        f"--quants {' '.join(args.quants)}` "
        f"({len(prompts)} test prompts, greedy, {args.max_new_tokens} new tokens, batch 1)",
        "",
        "Agreement with the safetensors model's greedy tokens, the GGUF read by transformers (dequantized) and run by "
        "llama.cpp (llama-cpp-python 0.3.36 built from source, weight repacking off: it segfaults on Q8_0/Q4_0 on this "
        "CPU; — when not installed).",
        "",
        "| format | MB | identical outputs (transformers) | token agreement (transformers) | identical outputs (llama.cpp) "
        "| token agreement (llama.cpp) | export s |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {b / 1e6:.1f} | {s:.1%} | {a:.1%} | {f'{c[0]:.1%}' if c else '—'} | {f'{c[1]:.1%}' if c else '—'} "
          f"| {t:.1f} |" for n, b, s, a, t, c in rows],
        "",
    ]
    publish(lines)


if __name__ == "__main__":
    main()
