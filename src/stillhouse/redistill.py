"""`stillhouse monitor --redistill`: distill what production brought into a candidate student, and promote it
only if it passes the eval gate and redteam; `stillhouse monitor --rollback` restores the previous student.

An orchestration over the stages, like pipeline.py. The candidate is a workspace of its own,
`redistill/candidate/`, whose config is this one's with three changes: the teacher is the one this workspace
distills from (the adapted `teacher/best` when adaptation is on, used as is), the student starts from the
current `student/best` (training continues from it, and eval scores it as `student-init` on the same test split:
the before/after comparison is paired), and `train.steps` is `monitor.redistill_steps` when set. Its data/ is
this workspace's data/ with the new records added to train: `monitor/redistill.jsonl` (drifted production
inputs, unlabeled: the teacher labels them) and `monitor.labeled_requests` (inputs with people's labels, masked
here). Then label, train, eval and redteam run in the candidate, each resumable and skipped when up to date.

Promotion needs all of: eval's gate passed, no task scored worse than the current student by more than
`monitor.redistill_max_regression` (relative for perplexity), and a redteam verdict other than "fail". Then
`student/` becomes `student-prev-N/` (with this workspace's `eval/` and `redteam/` inside it), the candidate's
student/, eval/ and redteam/ take their places, and export re-runs when the workspace had been exported, so
`serve` serves the new student. `--rollback` puts the newest `student-prev-N/` back (the student it replaces is
kept as `student-rolledback-N/`). The report is `monitor/redistill-report.json`; a refusal exits 1.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from stillhouse.config import CONFIG_NAME, Config, validate
from stillhouse.errors import GateError, StillhouseError
from stillhouse.records import prompt_messages
from stillhouse.ui import console
from stillhouse.workspace import MANIFEST, StageRun, atomic_write_json, atomic_write_text, load_manifest, read_jsonl, write_jsonl

FORMAT_VERSION = 1
CANDIDATE = Path("redistill") / "candidate"
_MOVED_WITH_STUDENT = ("eval", "redteam")  # the folders that describe one particular student


def _system_prompt(messages: list[dict]) -> str | None:
    return next((m["content"] for m in messages if m.get("role") == "system"), None)


def new_records(cfg: Config) -> tuple[list[dict], dict]:
    """The records to add to train: drifted production inputs (unlabeled) and requests labeled by people
    (masked; their task is the task of train records with the same system prompt). Returns (records, counts)."""
    from stillhouse.pii import mask
    from stillhouse.stages.monitor import read_labeled_requests

    ws = cfg.workspace
    drifted_path = ws / "monitor" / "redistill.jsonl"
    records = read_jsonl(drifted_path) if drifted_path.exists() else []
    counts = {"production_unlabeled": len(records), "labeled_by_people": 0}
    if cfg.monitor.labeled_requests:
        path = cfg.path(cfg.monitor.labeled_requests)
        train = read_jsonl(ws / "data" / "train.jsonl")
        task_of_system = {_system_prompt(prompt_messages(r)): r.get("task", "text") for r in train}
        for i, (messages, label) in enumerate(read_labeled_requests(path), 1):
            masked = [{"role": m["role"], "content": mask(m["content"])[0]} for m in messages]
            records.append({
                "id": f"labeled-request-{i:06d}",
                "task": task_of_system.get(_system_prompt(messages), "classification"),
                "messages": masked + [{"role": "assistant", "content": mask(label)[0]}],
                "source": {"file": str(path), "location": f"record {i}"},
                "sensitivity": "confidential",
                "provenance": {"origin": "production request", "labeled_by": "people"},
            })
        counts["labeled_by_people"] = len(records) - counts["production_unlabeled"]
    return records, counts


def candidate_config(cfg: Config) -> Config:
    """This workspace's config for the candidate workspace (see the module docstring for the three changes)."""
    from stillhouse.models import teacher_source

    ws = cfg.workspace
    data = cfg.model_dump(mode="json")
    teacher = data["teacher"]
    if cfg.teacher.adapt.enabled:  # adapting again would start from the base model: use the adapted one
        teacher.update(model=str(teacher_source(cfg).path), sha256=None, adapt={**teacher["adapt"], "enabled": False})
    elif not cfg.teacher.model.startswith("asset:"):
        teacher["model"] = str(cfg.path(cfg.teacher.model))
    data["student"].update(model=str(ws / "student" / "best"), derive_layers=None)
    data["train"]["steps"] = cfg.monitor.redistill_steps or cfg.train.steps
    if cfg.monitor.labeled_requests:
        data["monitor"]["labeled_requests"] = str(cfg.path(cfg.monitor.labeled_requests))
    return validate(data, ws / CANDIDATE, source="redistill candidate config")


def _candidate_data(cfg: Config, cand: Config, records: list[dict]) -> dict:
    """candidate/data/: this workspace's data/ with `records` appended to train.jsonl (inputs already in train
    are left out). A manifest like any prep output, so the candidate's stages see a finished prep."""
    src = cfg.workspace / "data"
    new_path = cand.workspace / "new-records.jsonl"
    write_jsonl(new_path, records)
    stage = StageRun(cand, "prep", inputs=[src, new_path], params={"redistill": FORMAT_VERSION})
    if stage.previous:
        return stage.previous
    train = read_jsonl(src / "train.jsonl")
    seen = {json.dumps(prompt_messages(r), sort_keys=True) for r in train}
    added = []
    for r in records:
        key = json.dumps(prompt_messages(r), sort_keys=True)
        if key not in seen:
            seen.add(key)
            added.append(r)
    write_jsonl(stage.dir / "train.jsonl", train + added)
    for p in src.iterdir():  # val/test (the same split: the comparison is paired), PII and canary files for redteam
        if p.is_file() and p.name not in (MANIFEST, "manifest.previous.json", "train.jsonl"):
            shutil.copy2(p, stage.dir / p.name)
    return stage.finish(metrics={"train_records": len(train) + len(added), "added": len(added),
                                 "already_in_train": len(records) - len(added)}, redistill_from=str(cfg.workspace))


def regressions(results: dict, max_regression: float) -> list[str]:
    """Tasks where the candidate (`student`) is worse than the current student (`student-init`, the model the
    candidate started from) by more than `max_regression`: absolute for scores in [0, 1], relative for
    perplexity (lower is better)."""
    out = []
    for task, t in results.get("tasks", {}).items():
        new, old = (t.get("models", {}).get(m, {}).get("score") for m in ("student", "student-init"))
        if new is None or old is None:
            continue
        if t.get("higher_is_better", True):
            worse = old - new > max_regression
        else:
            worse = new > old * (1 + max_regression)
        if worse:
            out.append(f"{task}: {t.get('metric')} {new:.4g} vs the current student's {old:.4g} "
                       f"(monitor.redistill_max_regression={max_regression})")
    return out


def _scores(results: dict, model: str) -> dict:
    return {task: t.get("models", {}).get(model, {}).get("score") for task, t in results.get("tasks", {}).items()}


def _prev_number(ws: Path, prefix: str) -> int:
    found = [int(m.group(1)) for p in ws.glob(f"{prefix}-*") if (m := re.fullmatch(rf"{prefix}-(\d+)", p.name))]
    return max(found, default=0)


def _reexport(cfg: Config, had_export: bool) -> bool:
    if not had_export:
        return False
    from stillhouse.pipeline import stage_functions

    stage_functions()["export"](cfg)
    return True


def run(cfg: Config) -> dict:
    """Label the new records with the teacher, train a candidate from the current student, eval and redteam it,
    and promote it if it passes; write monitor/redistill-report.json. GateError (exit 1) when refused."""
    from stillhouse.pipeline import stage_functions

    ws = cfg.workspace
    if not (ws / "student" / "best" / "config.json").exists() or load_manifest(ws, "train") is None:
        raise StillhouseError(f"{ws / 'student' / 'best'} not found: there is no student to continue from; run `stillhouse -w {ws} run` first")
    records, counts = new_records(cfg)
    report_path = ws / "monitor" / "redistill-report.json"
    if not records:
        console.print("redistill: nothing to re-distill (monitor found no drift, so no monitor/redistill.jsonl, and "
                      "monitor.labeled_requests is not set)")
        return {"outcome": "nothing to do"}
    t0 = time.time()
    cand = candidate_config(cfg)
    cand.workspace.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cand.workspace / CONFIG_NAME, "# Written by `stillhouse monitor --redistill`: the candidate "
                      "student's workspace.\n" + json.dumps(cand.model_dump(mode="json"), indent=2) + "\n")
    data = _candidate_data(cfg, cand, records)
    console.print(f"redistill: {data['metrics']['added']} new records ({counts}) added to {data['metrics']['train_records'] - data['metrics']['added']} "
                  f"train records; candidate in {cand.workspace}")

    funcs = stage_functions()
    refusals: list[str] = []
    seconds: dict[str, float] = {}
    for name in ("label", "train", "eval", "redteam"):
        console.rule(f"[bold]redistill: {name}")
        t = time.time()
        try:
            funcs[name](cand)
        except GateError as e:
            refusals.append(str(e))
            break
        finally:
            seconds[name] = round(time.time() - t, 1)
    results_path = cand.workspace / "eval" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "eval" in seconds and results:
        refusals += regressions(results, cfg.monitor.redistill_max_regression)
    red = (load_manifest(cand.workspace, "redteam") or {}) if "redteam" in seconds else {}
    if "redteam" in seconds and not refusals and red.get("verdict") == "fail":
        refusals.append(f"redteam: verdict fail ({'; '.join(red.get('verdict_reasons', []))})")

    report = {
        "outcome": "refused" if refusals else "promoted", "reasons": refusals, "candidate": str(cand.workspace),
        "new_records": counts | {"added_to_train": data["metrics"]["added"]},
        "before": _scores(results, "student-init"), "after": _scores(results, "student"),
        "teacher": _scores(results, "teacher"), "redteam_verdict": red.get("verdict"), "seconds": seconds,
    }
    if not refusals:
        report |= _promote(cfg, cand.workspace)
    report["seconds"]["total"] = round(time.time() - t0, 1)
    atomic_write_json(report_path, report)
    before, after = report["before"], report["after"]
    for task in after:
        console.print(f"  {task}: current student {before.get(task)} -> candidate {after.get(task)}")
    if refusals:
        raise GateError(f"redistill: candidate refused ({'; '.join(refusals)}); the current student stays. "
                        f"See {report_path} and {cand.workspace}")
    console.print(f"[bold green]redistill: candidate promoted to student/[/]; the previous student is in "
                  f"{report['previous']} (`stillhouse -w {ws} monitor --rollback` puts it back)")
    return report


def _promote(cfg: Config, cand_ws: Path) -> dict:
    """student/ (+ eval/, redteam/) -> student-prev-N/; the candidate's take their places; re-export."""
    ws = cfg.workspace
    had_export = load_manifest(ws, "export") is not None
    prev = ws / f"student-prev-{_prev_number(ws, 'student-prev') + 1}"
    (ws / "student").rename(prev)
    for name in _MOVED_WITH_STUDENT:
        if (ws / name).exists():
            (ws / name).rename(prev / name)
    for name in ("student", *_MOVED_WITH_STUDENT):
        (cand_ws / name).rename(ws / name)
    manifest_path = ws / "student" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["promoted"] = {"by": "stillhouse monitor --redistill", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "previous": prev.name, "candidate": str(cand_ws)}
    atomic_write_json(manifest_path, manifest)
    return {"previous": prev.name, "exported": _reexport(cfg, had_export)}


def rollback(cfg: Config) -> dict:
    """Put the newest student-prev-N/ back as student/ (with its eval/ and redteam/); the student it replaces
    is kept as student-rolledback-N/. Re-exports when the workspace had been exported."""
    ws = cfg.workspace
    n = _prev_number(ws, "student-prev")
    if n == 0:
        raise StillhouseError(f"no student-prev-N folder in {ws}: there is no previous student to roll back to")
    prev, kept = ws / f"student-prev-{n}", ws / f"student-rolledback-{n}"
    if kept.exists():
        raise StillhouseError(f"{kept} already exists; move it away, then run --rollback again (nothing was changed)")
    had_export = load_manifest(ws, "export") is not None
    (ws / "student").rename(kept)
    for name in _MOVED_WITH_STUDENT:
        if (ws / name).exists():
            (ws / name).rename(kept / name)
        if (prev / name).exists():
            (prev / name).rename(ws / name)
    prev.rename(ws / "student")
    exported = _reexport(cfg, had_export)
    console.print(f"rollback: {prev.name} is student/ again; the replaced student is in {kept.name}")
    return {"restored": prev.name, "kept": kept.name, "exported": exported}
