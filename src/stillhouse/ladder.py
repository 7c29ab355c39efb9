"""`stillhouse ladder`: which student size is enough? Several students, the same budget, accuracy against latency.

An orchestration like `stillhouse run` (stillhouse.pipeline): prep, check, adapt and label run once in the
workspace (each skips itself when done); then each rung of `ladder.rungs` (a number of teacher layers to keep, or a
model folder) gets a sub-workspace `ladder/NAME/` whose `data/` and `labels/` (and `teacher/`, when adapted) are
links to the workspace's, and whose `stillhouse.yaml` is the workspace's config with only `student` changed: so
every rung trains on the same labels with the same `train` budget and is evaluated on the same test records.
A rung is a plain workspace: `stillhouse -w ladder/L4 eval` works on it, and a re-run skips finished rungs.

The requirements are the eval gate's (`eval.min_retention`, `eval.max_latency_ms_p95`); the smallest rung (by
parameters) that passes it is named. Writes `ladder/results.json`, `ladder/summary.md` and `ladder/ladder.png`
(task score against latency p95, the requirements drawn in).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from stillhouse.config import CONFIG_NAME, Config, load_config
from stillhouse.errors import GateError, StillhouseError
from stillhouse.ui import console
from stillhouse.workspace import atomic_write_json, atomic_write_text

SHARED = ("data", "labels", "teacher")  # what every rung reads from the workspace, linked, never copied


def rung_name(spec: int | str) -> str:
    """`L4` for 4 derived layers, `M-<folder name>` for a model folder."""
    if isinstance(spec, int):
        return f"L{spec}"
    return "M-" + re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(spec).rstrip("/")).name or "model")


def validate_rungs(cfg: Config, rungs: list[int | str]) -> int:
    """The teacher's layer count; one clear error naming `ladder.rungs` for a rung it cannot have."""
    from stillhouse.models import resolve_model
    from stillhouse.stages.check import model_shape, read_model_config  # config only: no weights are loaded

    if not rungs:
        raise StillhouseError("ladder.rungs is empty; give layer counts and/or model folders, e.g. --set ladder.rungs=[2,4,6]")
    names = [rung_name(r) for r in rungs]
    if len(set(names)) != len(names):
        raise StillhouseError(f"ladder.rungs {rungs}: two rungs would share the folder name; list each size once")
    src = resolve_model(cfg.teacher.model, cfg.workspace, cfg.teacher.sha256)
    layers = model_shape(read_model_config(src, cfg.teacher.trust_remote_code), f"{src.path} config")["layers"]
    for r in rungs:
        if isinstance(r, int) and not 1 <= r <= layers:
            raise StillhouseError(f"ladder.rungs: {r} layers is {'more than' if r > layers else 'not within'} the "
                                  f"teacher's {layers} ({cfg.teacher.model}); use 1..{layers}, or a model folder")
        if isinstance(r, str):
            resolve_model(r, cfg.workspace)  # names the path when it is not a model
    return layers


def _rung_config(cfg: Config, spec: int | str, sub: Path) -> Config:
    """The workspace's config with only the student changed, written to `sub/stillhouse.yaml` and loaded back."""
    data = cfg.model_dump(mode="json")
    if isinstance(spec, int):
        data["student"].update(model=None, derive_layers=spec)
    else:
        ref = spec if spec.startswith("asset:") else str(cfg.path(spec).resolve())
        data["student"].update(model=ref, derive_layers=None)
    # Relative model paths (teacher.model, eval.baselines) stay as written -- train checks that the labels came
    # from the same teacher.model -- and resolve in the rung through a link to their first folder.
    for ref in [cfg.teacher.model, *cfg.eval.baselines]:
        first = Path(ref).parts[0] if ref and not ref.startswith("asset:") and not Path(ref).is_absolute() else None
        if first and first not in SHARED and first not in ("student", "eval", "ladder"):
            _link(sub / first, cfg.workspace / first)
    header = f"# ladder rung {sub.name}, written by `stillhouse ladder`: the workspace's config with another student\n"
    atomic_write_text(sub / CONFIG_NAME, header + yaml.safe_dump(data, sort_keys=False))
    return load_config(sub)


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise StillhouseError(f"{link} exists and is not a link to {target}; delete {link.parent} and run the ladder again")
    if target.exists():
        link.symlink_to(target, target_is_directory=target.is_dir())


def _row(name: str, spec: int | str, results: dict, gate_passed: bool) -> dict:
    from stillhouse.stages.eval import STUDENT, TEACHER

    m = results["models"][STUDENT]
    tasks = {t: {"metric": e["metric"], "score": e["models"][STUDENT]["score"], "teacher": e["models"][TEACHER]["score"],
                 "retention": e["retention"].get(STUDENT, {}).get("value")} for t, e in results["tasks"].items()}
    return {"rung": name, "spec": spec, "parameters": m.get("parameters"), "latency_ms_p50": m.get("latency_ms_p50"),
            "latency_ms_p95": m.get("latency_ms_p95"), "tokens_per_s_batch1": m.get("tokens_per_s_batch1"),
            "tasks": tasks, "meets_requirements": gate_passed, "failures": results["gate"]["failures"]}


def run_ladder(cfg: Config, rungs: list[int | str] | None = None, prepare: bool = True) -> dict:
    """Distill and evaluate one student per rung; write ladder/; return the results (see the module doc).
    `prepare=False`: use data/ and labels/ as they are (they must exist) instead of running prep ... label first."""
    from stillhouse.pipeline import run_all, stage_functions
    from stillhouse.workspace import require_manifest

    rungs = list(rungs if rungs is not None else cfg.ladder.rungs)
    teacher_layers = validate_rungs(cfg, rungs)  # before anything slow runs
    ws = cfg.workspace
    if prepare:
        console.rule("[bold]ladder: shared stages")
        run_all(cfg, ["prep", "check", "adapt", "label"])
    require_manifest(ws, "label", "ladder")
    funcs = stage_functions()
    rows, teacher = [], None
    for spec in rungs:
        name = rung_name(spec)
        sub = ws / "ladder" / name
        sub.mkdir(parents=True, exist_ok=True)
        for shared in SHARED:
            _link(sub / shared, ws / shared)
        rcfg = _rung_config(cfg, spec, sub)
        console.rule(f"[bold]ladder: {name} ({spec if isinstance(spec, str) else f'{spec} of {teacher_layers} layers'})")
        funcs["train"](rcfg)
        passed = True
        try:
            funcs["eval"](rcfg)
        except GateError as e:  # the rung misses a requirement: results.json is written, the ladder goes on
            passed = False
            console.print(f"[yellow]ladder: {name} misses the requirements ({e})[/]")
        results = json.loads((sub / "eval" / "results.json").read_text())
        rows.append(_row(name, spec, results, passed))
        teacher = results["models"]["teacher"]
        teacher_scores = {t: e["models"]["teacher"]["score"] for t, e in results["tasks"].items()}

    rows.sort(key=lambda r: r["parameters"] or 0)
    chosen = next((r["rung"] for r in rows if r["meets_requirements"]), None)
    out = {
        "rungs": rows,
        "teacher": {"parameters": teacher.get("parameters"), "latency_ms_p50": teacher.get("latency_ms_p50"),
                    "latency_ms_p95": teacher.get("latency_ms_p95"), "scores": teacher_scores, "layers": teacher_layers},
        "requirements": {"min_retention": cfg.eval.min_retention, "max_latency_ms_p95": cfg.eval.max_latency_ms_p95},
        "smallest_meeting_requirements": chosen,
        "budget": {k: getattr(cfg.train, k) for k in ("steps", "batch_size", "learning_rate", "alpha")},
    }
    atomic_write_json(ws / "ladder" / "results.json", out)
    atomic_write_text(ws / "ladder" / "summary.md", render_summary(out))
    _plot(out, ws / "ladder" / "ladder.png")
    _print(out)
    return out


def _headline_task(out: dict) -> str:
    """The task the plot shows: the first that is not the general-data check."""
    tasks = list(out["rungs"][0]["tasks"])
    return next((t for t in tasks if t != "general"), tasks[0])


def _plot(out: dict, path: Path) -> None:
    """Task score against latency p95 per rung, the teacher, and the requirements as dashed lines."""
    import io

    from matplotlib.figure import Figure

    task = _headline_task(out)
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for r in out["rungs"]:
        x, y = r["latency_ms_p95"], r["tasks"][task]["score"]
        ax.scatter(x, y, color="tab:green" if r["meets_requirements"] else "tab:gray")
        ax.annotate(f"{r['rung']} ({r['parameters'] / 1e6:.1f}M)", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    t = out["teacher"]
    ax.scatter(t["latency_ms_p95"], t["scores"][task], marker="*", s=120, color="tab:blue")
    ax.annotate("teacher", (t["latency_ms_p95"], t["scores"][task]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    req = out["requirements"]
    if req["min_retention"] > 0 and t["scores"][task] is not None:
        metric = out["rungs"][0]["tasks"][task]["metric"]
        # retention = student / teacher, or teacher / student for perplexity (lower is better)
        line = t["scores"][task] / req["min_retention"] if metric == "perplexity" else t["scores"][task] * req["min_retention"]
        ax.axhline(line, color="red", ls="--", lw=0.8, label=f"eval.min_retention {req['min_retention']}")
    if req["max_latency_ms_p95"]:
        ax.axvline(req["max_latency_ms_p95"], color="red", ls=":", lw=0.8, label=f"eval.max_latency_ms_p95 {req['max_latency_ms_p95']}")
    ax.set_xlabel("latency p95 at batch 1 (ms)")
    ax.set_ylabel(f"{task}: {out['rungs'][0]['tasks'][task]['metric']}")
    ax.set_title(f"smallest meeting the requirements: {out['smallest_meeting_requirements'] or 'none'}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    from stillhouse.workspace import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_summary(out: dict) -> str:
    """ladder/summary.md: one row per rung, the requirements, the choice."""
    tasks = list(out["rungs"][0]["tasks"])
    req = out["requirements"]
    lines = ["# stillhouse ladder", "",
             f"Same budget for every rung: {', '.join(f'train.{k}={v}' for k, v in out['budget'].items())}. "
             f"Requirements (the eval gate): eval.min_retention={req['min_retention']}, "
             f"eval.max_latency_ms_p95={req['max_latency_ms_p95']}.", "",
             f"**Smallest student meeting them: {out['smallest_meeting_requirements'] or 'none'}**", ""]
    if not req["min_retention"] and not req["max_latency_ms_p95"]:
        lines += ["No requirement is configured, so every rung meets them: set eval.min_retention and/or "
                  "eval.max_latency_ms_p95.", ""]
    header = ["rung", "parameters (M)", "latency p50 (ms)", "latency p95 (ms)",
              *[f"{t} ({out['rungs'][0]['tasks'][t]['metric']}) [retention]" for t in tasks], "meets"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in out["rungs"]:
        cells = [r["rung"], _fmt(r["parameters"] / 1e6, ".1f"), _fmt(r["latency_ms_p50"], ".1f"), _fmt(r["latency_ms_p95"], ".1f")]
        cells += [f"{_fmt(r['tasks'][t]['score'], '.3f')} [{_fmt(r['tasks'][t]['retention'], '.2f')}]" for t in tasks]
        cells.append("yes" if r["meets_requirements"] else "no: " + "; ".join(r["failures"])[:160])
        lines.append("| " + " | ".join(cells) + " |")
    t = out["teacher"]
    lines.append("| teacher | " + " | ".join([_fmt(t["parameters"] / 1e6, ".1f"), _fmt(t["latency_ms_p50"], ".1f"),
                                                _fmt(t["latency_ms_p95"], ".1f"),
                                                *[_fmt(t["scores"][task], ".3f") for task in tasks], ""]) + " |")
    lines += ["", "Plot: ladder/ladder.png. Each rung is a workspace: ladder/NAME/ (eval/report.html inside).", ""]
    return "\n".join(lines)


def _print(out: dict) -> None:
    from rich.markup import escape

    console.print(escape(render_summary(out)))
