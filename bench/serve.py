"""Benchmark: a bounded load test of `stillhouse serve` on loopback, side by side with llama.cpp's server on the
exported GGUF of the same student.

    .venv/bin/python bench/serve.py --workspace stillhouse-demo [--requests 48] [--clients 8] [--max-tokens 16]

Both servers get the same chat requests (the test split's prompts, in order, cycled to --requests) from --clients
concurrent clients using the official openai client, greedy (temperature 0), --max-tokens new tokens at most.
Ours serves WORKSPACE/export/model (safetensors; fp32 on CPU) with its batcher; llama.cpp (`python -m
llama_cpp.server`, from `pip install llama-cpp-python`, which compiles llama.cpp) serves the GGUF files this script
writes from the same folder with `stillhouse.gguf_export`. Reported per server: errors, wall time, requests/s,
completion tokens/s, p50/p95 latency, and how many answers equal ours. Prints a table and appends it to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import stillhouse  # noqa: F401  (offline environment first)

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def load_test(base_url: str, model: str, conversations: list[list[dict]], clients: int, max_tokens: int) -> dict:
    """Send every conversation once from `clients` threads; latencies in ms, answers in request order."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)

    def one(messages: list[dict]):
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
            return (time.perf_counter() - t0) * 1000, r.choices[0].message.content, r.usage.completion_tokens, None
        except Exception as e:  # counted, not raised: the load test reports errors
            return (time.perf_counter() - t0) * 1000, None, 0, f"{type(e).__name__}: {e}"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, conversations))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    errors = [r[3] for r in results if r[3]]
    return {"wall_s": wall, "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "req_per_s": len(results) / wall, "tokens_per_s": sum(r[2] for r in results) / wall,
            "p50_ms": lat[len(lat) // 2], "p95_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "answers": [r[1] for r in results]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_server(gguf: Path, conversations, args) -> dict | None:
    """Start `python -m llama_cpp.server` on the GGUF, wait until it answers, run the load test, stop it."""
    import httpx

    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    # `python -m llama_cpp.server ARGS`, with llama.cpp's weight repacking off first (see bench/gguf_export.py)
    launcher = (f"import sys, runpy; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                "from gguf_export import llama_cpp_without_repack; llama_cpp_without_repack(); "
                "sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", launcher, "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", str(os.cpu_count()),
                             "--model_alias", "student", "--verbose", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"llama.cpp server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        return load_test(f"http://127.0.0.1:{port}", "student", conversations, args.clients, args.max_tokens)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--gguf", nargs="+", default=["f16", "q8_0", "q4_0"], help="GGUF files llama.cpp serves")
    args = ap.parse_args()

    from stillhouse.config import validate
    from stillhouse.gguf_export import write_gguf
    from stillhouse.records import prompt_messages
    from stillhouse.stages.serve import create_app, serve_in_thread
    from stillhouse.workspace import read_jsonl

    model_dir = args.workspace / "export" / "model"
    records = read_jsonl(args.workspace / "data" / "test.jsonl")
    conversations = [prompt_messages(records[i % len(records)]) for i in range(args.requests)]
    tmp = Path(tempfile.mkdtemp(prefix="stillhouse-serve-bench-"))
    cfg = validate({"serve": {"max_batch_size": 16, "batch_window_ms": 5, "max_concurrent_requests": 64}},
                   workspace=tmp, source="bench")

    rows = []
    app = create_app(model_dir, cfg, api_key_hashes=None, log_path=None)
    with serve_in_thread(app) as url:
        load_test(url, "student", conversations[: args.clients], args.clients, args.max_tokens)  # warm-up
        ours = load_test(url, "student", conversations, args.clients, args.max_tokens)
    rows.append(("stillhouse serve (safetensors, fp32, batched)", ours))
    print(rows[-1][0], {k: v for k, v in ours.items() if k != "answers"}, flush=True)  # progress, in case of a timeout
    for quant in args.gguf:
        path = tmp / f"student-{quant}.gguf"
        write_gguf(model_dir, path, quant=quant)
        res = llama_cpp_server(path, conversations, args)
        if res is None:
            print("llama-cpp-python is not installed: only our server was measured")
            break
        rows.append((f"llama.cpp server (GGUF {quant})", res))
        print(rows[-1][0], {k: v for k, v in res.items() if k != "answers"}, flush=True)
        path.unlink()

    def same(res: dict) -> str:
        n = sum(a is not None and a.strip() == b.strip() for a, b in zip(res["answers"], ours["answers"]))
        return f"{n}/{len(ours['answers'])}"

    lines = [
        "### serve: load test on loopback, stillhouse vs llama.cpp's server on the same student",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU",
        f"- command: `.venv/bin/python bench/serve.py --workspace {args.workspace} --requests {args.requests} "
        f"--clients {args.clients} --max-tokens {args.max_tokens}` (chat completions, greedy, test-split prompts; "
        "llama-cpp-python 0.3.36 built from source with GGML_NATIVE; its CPU weight repacking is turned off: on this "
        "AMX/AVX512 CPU it segfaults on every Q8_0/Q4_0 file, see `llama_cpp_without_repack` in bench/gguf_export.py)",
        "- same answers: the answer text equals stillhouse's for the same request",
        "",
        "| server | errors | wall s | req/s | completion tok/s | p50 ms | p95 ms | same answers |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {name} | {r['errors']} | {r['wall_s']:.1f} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
          f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {same(r)} |" for name, r in rows],
        "",
    ]
    for name, r in rows:
        if r["first_error"]:
            lines.insert(-1, f"- first error of {name}: {r['first_error'][:300]}")
    publish(lines)


if __name__ == "__main__":
    main()
