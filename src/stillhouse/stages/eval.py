"""eval: how much of the teacher does the student keep, per task, and at what cost?

Teacher, student (`student/best`), the student before distillation (`student/init`) and any baselines
(`eval.baselines`) answer the same test records with the same prompts and greedy decoding. Per task:

    classification   accuracy (+ macro-F1, confusion matrix); the prediction is the output's first line
    qa, summarization, and any other task with a response: ROUGE-L F1 (+ token F1)
    extraction       field-level F1 of the JSON output (+ precision, recall)
    text             perplexity of the response tokens (teacher-forced, no generation)
    general          the same, on held-out general-purpose data (prep.general): forgetting, reported but not gated

Retention = student score / teacher score (perplexity: teacher / student), with a paired bootstrap 95% CI over
test examples. Cost: latency at batch 1, tokens/s batched, parameters, size on disk, peak RSS. Writes
`eval/results.json`, `eval/predictions.jsonl`, `eval/report.html` (self-contained, plots inlined),
`eval/summary.md`; the gate (`eval.min_retention`, `eval.max_latency_ms_p95`) raises GateError after writing
them and before the manifest, so a re-run checks again.
"""

from __future__ import annotations

import gc
import html
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from stillhouse import metrics as M
from stillhouse.errors import GateError, StillhouseError
from stillhouse.models import (
    ModelSource,
    count_parameters,
    folder_size_bytes,
    load_model,
    load_tokenizer,
    resolve_model,
    teacher_source,
    tokenizer_fingerprint,
)
from stillhouse.records import encode, encode_prompt, generate, prompt_messages, response_text
from stillhouse.ui import console, progress_bar
from stillhouse.workspace import StageRun, atomic_write_json, atomic_write_text, read_jsonl, require_manifest, write_jsonl

TEACHER, STUDENT, INIT = "teacher", "student", "student-init"
FAILURE_SAMPLE_SIZE = 20  # rows of "where the student went wrong" shown for human review
GEN_BATCH_SIZE = 16


KNOWN_TASKS = ("classification", "extraction", "qa", "summarization", "text", "general")


def task_kind(task: str) -> str:
    """How a task is scored: classification | extraction | perplexity | generative (ROUGE-L)."""
    if task in ("classification", "extraction"):
        return task
    return "perplexity" if task in ("text", "general") else "generative"


_METRIC = {"classification": "accuracy", "generative": "rouge_l_f1", "extraction": "field_f1", "perplexity": "perplexity"}


@dataclass
class Candidate:
    """One model under evaluation."""

    name: str
    src: ModelSource
    trust_remote_code: bool = False


def run(cfg) -> dict:
    """Evaluate teacher, student, student-init and baselines on data/test.jsonl; write eval/; gate."""
    ws = Path(cfg.workspace)
    test_path = ws / "data" / "test.jsonl"
    if not test_path.exists():
        raise StillhouseError(f"{test_path} not found; run `stillhouse -w {ws} prep` first")
    require_manifest(ws, "train", "eval")  # a half-finished training run must not be evaluated as done
    candidates = _candidates(cfg, ws)
    inputs = [test_path] + [c.src.path for c in candidates]
    train_log = ws / "student" / "metrics.jsonl"
    if train_log.exists():
        inputs.append(train_log)  # the report plots it
    params = {"eval": cfg.eval.model_dump(mode="json"), "models": {c.name: c.src.ref or str(c.src.path) for c in candidates}}
    run_ = StageRun(cfg, "eval", inputs=inputs, params=params)
    if run_.previous:
        return run_.previous

    tasks = sample_by_task(_load_labeled(test_path), cfg.eval.max_examples, cfg.eval.seed)
    if not tasks:
        raise StillhouseError(f"{test_path}: no labeled records (with a final assistant message) to evaluate; check the prep output")
    for task in tasks:
        if task not in KNOWN_TASKS:  # still scored, but say how: a silent default would pass for a chosen metric
            console.print(f"[yellow]eval: task {task!r} has no dedicated metric (known: {', '.join(KNOWN_TASKS)}); "
                          "scored by ROUGE-L F1 against the reference response[/]")
    evaluated = {}
    # Student first: peak RSS is a process-wide reading, and a bigger model loaded earlier leaves freed memory
    # mapped, which would inflate the small model's number. The teacher goes last.
    for cand in candidates:
        evaluated[cand.name] = evaluate_model(cand, tasks, cfg)

    results = compare(tasks, evaluated, cfg)
    gate_failures = check_gate(results, cfg)
    results["gate"] = {"passed": not gate_failures, "failures": gate_failures,
                       "min_retention": cfg.eval.min_retention, "max_latency_ms_p95": cfg.eval.max_latency_ms_p95}

    atomic_write_json(run_.dir / "results.json", results)
    write_jsonl(run_.dir / "predictions.jsonl", _prediction_rows(tasks, evaluated))
    atomic_write_text(run_.dir / "report.html", render_html(results, _read_train_log(train_log), cfg))
    atomic_write_text(run_.dir / "summary.md", render_summary(results, cfg))
    _print_table(console, results)
    if gate_failures:
        raise GateError("eval gate: " + "; ".join(gate_failures) + f"; see {run_.dir / 'report.html'}")
    return run_.finish(metrics=_manifest_metrics(results))


# ------------------------------------------------------------------------------------------------ inputs


def _candidates(cfg, ws: Path) -> list[Candidate]:
    best = ws / "student" / "best"
    if not (best / "config.json").exists():
        raise StillhouseError(f"{best} not found; run `stillhouse -w {ws} train` first")
    out = [Candidate(STUDENT, resolve_model(str(best)), cfg.student.trust_remote_code)]
    init = ws / "student" / "init"
    if (init / "config.json").exists():
        out.append(Candidate(INIT, resolve_model(str(init)), cfg.student.trust_remote_code))
    for i, ref in enumerate(cfg.eval.baselines):
        src = resolve_model(ref, ws)
        name = f"baseline:{src.path.name}"
        if any(c.name == name for c in out):
            name = f"{name}#{i}"
        out.append(Candidate(name, src))
    out.append(Candidate(TEACHER, teacher_source(cfg), cfg.teacher.trust_remote_code))
    return out


def _load_labeled(path: Path) -> list[dict]:
    out = []
    for n, rec in enumerate(read_jsonl(path), 1):
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise StillhouseError(f"{path} line {n}: a record needs a 'messages' list; re-run `stillhouse prep`")
        if response_text(rec) is not None and prompt_messages(rec):
            out.append({**rec, "task": rec.get("task") or "text"})
    return out


def sample_by_task(records: list[dict], max_examples: int, seed: int) -> dict[str, list[dict]]:
    """{task: records}, at most `max_examples` per task: a seeded sample that keeps file order."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out = {}
    for task in sorted(by_task):
        recs = by_task[task]
        if len(recs) > max_examples:
            keep = sorted(random.Random(f"{seed}:{task}").sample(range(len(recs)), max_examples))
            recs = [recs[i] for i in keep]
        out[task] = recs
    return out


# ---------------------------------------------------------------------------------------------- one model


class PeakRss:
    """Samples this process's resident memory every 10 ms in a thread; `peak_mb` is the highest reading."""

    def __enter__(self):
        import threading

        import psutil

        self._proc = psutil.Process()
        self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self._peak / 2**20


def evaluate_model(cand: Candidate, tasks: dict[str, list[dict]], cfg) -> dict:
    """Outputs, per-example statistics per task and cost numbers for one model."""
    with PeakRss() as mem:
        try:
            model = load_model(cand.src, trust_remote_code=cand.trust_remote_code)
            tok = load_tokenizer(cand.src, trust_remote_code=cand.trust_remote_code)
        except StillhouseError as e:  # load_model names the file and the reader's error
            raise StillhouseError(f"eval: the {cand.name} model {e}") from None
        outputs: dict[str, list[str]] = {}
        gen = [(task, r) for task, recs in tasks.items() if task_kind(task) != "perplexity" for r in recs]
        with progress_bar(f"eval: {cand.name} generates", total=len(gen), unit="rec") as advance:
            texts = generate(model, tok, [encode_prompt(tok, r) for _, r in gen], cfg.eval.max_new_tokens,
                             batch_size=GEN_BATCH_SIZE, progress=advance)
        for (task, _), text in zip(gen, texts):
            outputs.setdefault(task, []).append(text)
        stats = {}
        for task, recs in tasks.items():
            kind = task_kind(task)
            if kind == "perplexity":
                stats[task] = _nll_stats(model, tok, recs, cfg.eval.max_seq_len)
            else:
                stats[task] = example_stats(kind, [response_text(r) for r in recs], outputs[task])
        all_recs = [r for recs in tasks.values() for r in recs]
        cost = measure_speed(model, tok, [encode_prompt(tok, r) for r in all_recs[: cfg.eval.latency_requests]],
                             cfg.eval.max_new_tokens)
        cost["parameters"] = count_parameters(model)
        fingerprint = tokenizer_fingerprint(tok)
    cost["size_bytes"] = folder_size_bytes(cand.src.path)
    cost["peak_rss_mb"] = round(mem.peak_mb, 1)
    del model
    gc.collect()
    return {"src": str(cand.src.path), "outputs": outputs, "stats": stats, "cost": cost, "tokenizer": fingerprint}


def example_stats(kind: str, expected: list[str], outputs: list[str]) -> dict:
    """Per-example numbers from which every task score (and its bootstrap) is computed."""
    import numpy as np

    if kind == "classification":
        gold = [e.strip() for e in expected]
        pred = [M.normalize_prediction(o) for o in outputs]
        return {"gold": gold, "pred": pred, "correct": np.array([g == p for g, p in zip(gold, pred)], dtype=float)}
    if kind == "extraction":
        counts = np.array([M.field_counts(o, e) for o, e in zip(outputs, expected)], dtype=float).reshape(-1, 3)
        return {"tp": counts[:, 0], "fp": counts[:, 1], "fn": counts[:, 2]}
    return {"rouge_l": np.array([M.rouge_l_f1(o, e) for o, e in zip(outputs, expected)], dtype=float),
            "token_f1": np.array([M.token_f1(o, e) for o, e in zip(outputs, expected)], dtype=float),
            # exact match after SQuAD-style normalization (case, punctuation, spacing): the same words in order
            "exact_match": np.array([M.words(o) == M.words(e) for o, e in zip(outputs, expected)], dtype=float)}


def _nll_stats(model, tok, recs: list[dict], max_seq_len: int) -> dict:
    """Teacher-forced negative log-likelihood of each response (nats), its token count and its UTF-8 bytes.
    Only the response positions go through the LM head (`logits_to_keep`): the full (T, V) logits of a large
    vocabulary are never built."""
    import inspect

    import numpy as np
    import torch
    import torch.nn.functional as F

    can_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    nll, n_tokens, n_bytes = [], [], []
    for r in recs:
        enc = encode(tok, r, max_seq_len)
        ids = torch.tensor([enc.input_ids])
        first = max(enc.prompt_len, 1)  # token 0 has no context to be predicted from
        targets = ids[0, first:]
        with torch.no_grad():
            if can_keep:
                logits = model(input_ids=ids, logits_to_keep=len(targets) + 1).logits[0, :-1]  # (R, V)
            else:
                logits = model(input_ids=ids).logits[0, first - 1 : -1]
        nll.append(F.cross_entropy(logits.float(), targets, reduction="sum").item())
        n_tokens.append(len(targets))
        n_bytes.append(max(len((response_text(r) or "").encode("utf-8")), 1))
    return {"nll": np.array(nll), "tokens": np.array(n_tokens, dtype=float), "bytes": np.array(n_bytes, dtype=float)}


def measure_speed(model, tok, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Latency per request at batch 1 (ms, p50/p95, after one warm-up request) and generated tokens per second
    with the same prompts in one batch. Token counts re-tokenize the decoded output, so they are approximate."""
    import numpy as np

    if not prompts:
        return {}
    generate(model, tok, prompts[:1], max_new_tokens, batch_size=1)  # warm-up: first call pays one-time setup
    latencies_ms, single_tokens = [], 0
    for p in prompts:
        t0 = time.perf_counter()
        out = generate(model, tok, [p], max_new_tokens, batch_size=1)[0]
        latencies_ms.append((time.perf_counter() - t0) * 1000)
        single_tokens += max(len(tok(out, add_special_tokens=False)["input_ids"]), 1)
    t0 = time.perf_counter()
    outs = generate(model, tok, prompts, max_new_tokens, batch_size=len(prompts))
    seconds = time.perf_counter() - t0
    new_tokens = sum(max(len(tok(o, add_special_tokens=False)["input_ids"]), 1) for o in outs)
    return {
        "latency_ms_p50": round(float(np.percentile(latencies_ms, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(latencies_ms, 95)), 2),
        "latency_requests": len(prompts),
        "tokens_per_s_batch1": round(single_tokens / (sum(latencies_ms) / 1000), 2),
        "tokens_per_s_batched": round(new_tokens / seconds, 2),
        "batch_size": len(prompts),
    }


# ------------------------------------------------------------------------------------------------ scoring


def primary_score(kind: str, stats: dict, idx, per_byte: bool = False) -> float:
    """The task's headline score over the examples `idx` (perplexity per byte when `per_byte`)."""
    if kind == "classification":
        return float(stats["correct"][idx].mean())
    if kind == "generative":
        return float(stats["rouge_l"][idx].mean())
    if kind == "extraction":
        return M.prf1(stats["tp"][idx].sum(), stats["fp"][idx].sum(), stats["fn"][idx].sum())[2]
    return M.perplexity(stats["nll"][idx].sum(), stats["bytes" if per_byte else "tokens"][idx].sum())


def retention(kind: str, student: dict, teacher: dict, idx, per_byte: bool = False) -> float:
    """Student score / teacher score on the same examples; for perplexity (lower is better) teacher / student.
    NaN when the teacher scores 0: "percent of nothing" is undefined, not infinite."""
    s, t = primary_score(kind, student, idx, per_byte), primary_score(kind, teacher, idx, per_byte)
    if kind == "perplexity":
        return t / s if s > 0 else float("nan")
    return s / t if t > 0 else float("nan")


def _num(x, digits: int = 4):
    return round(float(x), digits) if x is not None and math.isfinite(float(x)) else None


def _ci(ci):
    return [round(ci[0], 4), round(ci[1], 4)] if ci else None


def compare(tasks: dict[str, list[dict]], evaluated: dict[str, dict], cfg) -> dict:
    """Scores, CIs and retention per task; cost per model; the tasks that lost the most; failures to review."""
    import numpy as np

    names = [TEACHER] + [n for n in evaluated if n != TEACHER]  # tables read teacher, student, init, baselines
    boot = dict(samples=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)
    out_tasks = {}
    for task, recs in tasks.items():
        kind = task_kind(task)
        n = len(recs)
        everything = np.arange(n)
        entry = {"kind": kind, "metric": _METRIC[kind], "higher_is_better": kind != "perplexity", "n": n,
                 "models": {}, "retention": {}}
        labels = sorted({(response_text(r) or "").strip() for r in recs}) if kind == "classification" else None
        for name in names:
            st = evaluated[name]["stats"][task]
            score = primary_score(kind, st, everything)
            m = {"score": _num(score), "ci95": _ci(M.bootstrap_ci(n, lambda i, st=st: primary_score(kind, st, i), **boot))}
            if kind == "classification":
                m.update(accuracy=_num(score), macro_f1=_num(M.macro_f1(st["gold"], st["pred"], labels)),
                         confusion={"labels": labels + [M.OTHER], "matrix": M.confusion_matrix(st["gold"], st["pred"], labels)})
            elif kind == "generative":
                m.update(rouge_l_f1=_num(score), token_f1=_num(st["token_f1"].mean()),
                         exact_match=_num(st["exact_match"].mean()))
            elif kind == "extraction":
                p, r, f = M.prf1(st["tp"].sum(), st["fp"].sum(), st["fn"].sum())
                m.update(precision=_num(p), recall=_num(r), f1=_num(f))
            else:
                m.update(perplexity=_num(score), nll_per_token=_num(st["nll"].sum() / st["tokens"].sum()),
                         tokens=int(st["tokens"].sum()))
            entry["models"][name] = m
        t_stats = evaluated[TEACHER]["stats"][task]
        for name in names:
            if name == TEACHER:
                continue
            # Perplexities over different vocabularies are not comparable per token; per byte of the same text they are.
            per_byte = kind == "perplexity" and evaluated[name]["tokenizer"] != evaluated[TEACHER]["tokenizer"]
            st = evaluated[name]["stats"][task]

            def stat(i, st=st, per_byte=per_byte):
                return retention(kind, st, t_stats, i, per_byte)

            entry["retention"][name] = {"value": _num(stat(everything)), "ci95": _ci(M.bootstrap_ci(n, stat, **boot)),
                                        "unit": "per byte" if per_byte else ("per token" if kind == "perplexity" else "")}
        out_tasks[task] = entry

    ranked = sorted((e["retention"][STUDENT]["value"], t) for t, e in out_tasks.items()
                    if e["retention"].get(STUDENT, {}).get("value") is not None)
    return {
        "models": {name: {"path": evaluated[name]["src"], **evaluated[name]["cost"]} for name in names},
        "tasks": out_tasks,
        # the tasks where the student kept the least of the teacher, worst first
        "lost_most": [{"task": t, "retention": r} for r, t in ranked if r < 1][:3],
        "failures": failure_sample(tasks, evaluated, cfg.eval.seed),
        "settings": {"decoding": "greedy", "max_new_tokens": cfg.eval.max_new_tokens,
                     "max_examples_per_task": cfg.eval.max_examples, "bootstrap_samples": cfg.eval.bootstrap_samples,
                     "device": "cpu", "torch_threads": _torch_threads()},
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def failure_sample(tasks: dict[str, list[dict]], evaluated: dict[str, dict], seed: int) -> list[dict]:
    """Generated answers where the student scored below 1, largest gap to the teacher first (ties in seeded
    random order), for a human to read."""
    rows = []
    for task, recs in tasks.items():
        kind = task_kind(task)
        if kind == "perplexity":
            continue
        per_example = {}
        for name in (TEACHER, STUDENT):
            st = evaluated[name]["stats"][task]
            if kind == "classification":
                per_example[name] = list(st["correct"])
            elif kind == "generative":
                per_example[name] = list(st["rouge_l"])
            else:
                per_example[name] = [M.prf1(tp, fp, fn)[2] for tp, fp, fn in zip(st["tp"], st["fp"], st["fn"])]
        for i, r in enumerate(recs):
            s, t = per_example[STUDENT][i], per_example[TEACHER][i]
            if s < 1:
                user = [m["content"] for m in prompt_messages(r) if m["role"] == "user"]
                rows.append({"task": task, "id": r.get("id"), "input": (user[-1] if user else "")[:500],
                             "expected": (response_text(r) or "")[:500],
                             "teacher": evaluated[TEACHER]["outputs"][task][i], "student": evaluated[STUDENT]["outputs"][task][i],
                             "teacher_score": round(float(t), 3), "student_score": round(float(s), 3)})
    random.Random(seed).shuffle(rows)
    rows.sort(key=lambda row: row["teacher_score"] - row["student_score"], reverse=True)
    return rows[:FAILURE_SAMPLE_SIZE]


def _prediction_rows(tasks: dict[str, list[dict]], evaluated: dict[str, dict]) -> list[dict]:
    rows = []
    for task, recs in tasks.items():
        for i, r in enumerate(recs):
            row = {"id": r.get("id"), "task": task, "expected": response_text(r)}
            if task_kind(task) == "perplexity":
                row["nll_per_token"] = {n: round(float(e["stats"][task]["nll"][i] / e["stats"][task]["tokens"][i]), 4)
                                        for n, e in evaluated.items()}
            else:
                row["outputs"] = {n: e["outputs"][task][i] for n, e in evaluated.items()}
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- gate


def check_gate(results: dict, cfg) -> list[str]:
    """Reasons the student does not qualify (empty: it does)."""
    failures = []
    for task, e in results["tasks"].items():
        ret = e["retention"].get(STUDENT, {})
        value = ret.get("value")
        if task == "general":
            continue  # general-data perplexity shows forgetting; the gate is about the task the student is for
        if value is not None and value < cfg.eval.min_retention:
            ci = ret.get("ci95")
            ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
            failures.append(
                f"task '{task}' {e['metric']} retention {value:.3f}{ci_text} < eval.min_retention {cfg.eval.min_retention} "
                f"(teacher {e['models'][TEACHER]['score']}, student {e['models'][STUDENT]['score']})"
            )
    limit = cfg.eval.max_latency_ms_p95
    p95 = results["models"][STUDENT].get("latency_ms_p95")
    if limit is not None and p95 is not None and p95 > limit:
        failures.append(f"student latency p95 {p95:.1f} ms > eval.max_latency_ms_p95 {limit} ms")
    return failures


def _manifest_metrics(results: dict) -> dict:
    tasks = {}
    for task, e in results["tasks"].items():
        ret = e["retention"].get(STUDENT, {})
        tasks[task] = {"metric": e["metric"], "n": e["n"],
                       **{name.replace("-", "_"): e["models"][name]["score"] for name in (TEACHER, STUDENT, INIT) if name in e["models"]},
                       "retention": ret.get("value"), "retention_ci95": ret.get("ci95")}
    keys = ("parameters", "latency_ms_p50", "latency_ms_p95", "tokens_per_s_batch1", "tokens_per_s_batched", "peak_rss_mb")
    models = {name: {**{k: m.get(k) for k in keys}, "size_mb": round(m.get("size_bytes", 0) / 1e6, 1)}
              for name, m in results["models"].items() if name in (TEACHER, STUDENT, INIT)}
    t50, s50 = models[TEACHER]["latency_ms_p50"], models[STUDENT]["latency_ms_p50"]
    return {"tasks": tasks, "models": models, "speedup_p50": round(t50 / s50, 2) if t50 and s50 else None,
            "lost_most": [x["task"] for x in results["lost_most"]], "gate": "pass" if results["gate"]["passed"] else "fail"}


# ------------------------------------------------------------------------------------------------- report


def _read_train_log(path: Path) -> list[dict]:
    """student/metrics.jsonl, tolerating a torn last line (train appends to it while running)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _png(fig) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="">'


def _figures(results: dict, train_log: list[dict], cfg) -> list[tuple[str, str]]:
    """(title, <img> tag) pairs. matplotlib's object API (Figure, not pyplot): no global state, no display."""
    from matplotlib.figure import Figure

    figs = []
    tasks = results["tasks"]
    others = [n for n in results["models"] if n != TEACHER]

    # retention per task, one bar per model, 95% CI whiskers
    fig = Figure(figsize=(max(4.5, 1.6 * len(tasks) * max(1, len(others)) / 2), 3.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(others))
    for j, name in enumerate(others):
        xs, ys, lo, hi = [], [], [], []
        for i, e in enumerate(tasks.values()):
            r = e["retention"].get(name, {})
            if r.get("value") is None:
                continue
            xs.append(i + (j - (len(others) - 1) / 2) * width)
            ys.append(r["value"])
            ci = r.get("ci95") or [r["value"], r["value"]]
            lo.append(max(0.0, r["value"] - ci[0]))
            hi.append(max(0.0, ci[1] - r["value"]))
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=name)
    for i, e in enumerate(tasks.values()):
        if all(r.get("value") is None for r in e["retention"].values()):
            ax.text(i, 0.02, "n/a (teacher 0)", ha="center", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    if cfg.eval.min_retention > 0:
        ax.axhline(cfg.eval.min_retention, color="red", ls="--", lw=0.8, label="gate")
    ax.set_xticks(range(len(tasks)), list(tasks))
    ax.set_ylabel("retention (teacher = 1)")
    ax.legend(fontsize=7)
    figs.append(("Retention per task (95% CI)", _png(fig)))

    # quality vs latency
    cls = tasks.get("classification")
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    for name, m in results["models"].items():
        if cls is not None:
            y = cls["models"][name]["score"]
        else:
            vals = [1.0] if name == TEACHER else [e["retention"][name]["value"] for e in tasks.values()
                                                  if e["retention"].get(name, {}).get("value") is not None]
            y = sum(vals) / len(vals) if vals else None
        if y is not None and m.get("latency_ms_p50") is not None:
            ax.scatter(m["latency_ms_p50"], y)
            ax.annotate(name, (m["latency_ms_p50"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("latency p50 at batch 1 (ms)")
    ax.set_ylabel("classification accuracy" if cls is not None else "mean retention")
    figs.append(("Quality vs latency", _png(fig)))

    if train_log:
        fig = Figure(figsize=(9, 3.2))
        ax_loss, ax_val = fig.subplots(1, 2)
        for key in ("loss", "ce", "kd"):
            pts = [(r["step"], r[key]) for r in train_log if isinstance(r.get(key), (int, float))]
            if pts:
                ax_loss.plot(*zip(*pts), label=key)
        ax_loss.set_xlabel("step")
        ax_loss.set_title("training loss", fontsize=9)
        ax_loss.legend(fontsize=7)
        pts = [(r["step"], r["val_score"]) for r in train_log if isinstance(r.get("val_score"), (int, float))]
        if pts:
            ax_val.plot(*zip(*pts), marker="o", label="val score")
        ax_val.set_xlabel("step")
        ax_val.set_title("validation score", fontsize=9)
        figs.append(("Training curves (student/metrics.jsonl)", _png(fig)))

    if cls is not None:
        names = [n for n in (TEACHER, STUDENT) if n in cls["models"]]
        labels = cls["models"][names[0]]["confusion"]["labels"]
        fig = Figure(figsize=(min(9, 2.5 + 0.4 * len(labels)) * len(names), min(9, 2 + 0.4 * len(labels))), layout="constrained")
        for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
            matrix = cls["models"][name]["confusion"]["matrix"]
            ax.imshow(matrix, cmap="Blues")
            if len(labels) <= 20:  # counts stay readable up to about this many classes
                peak = max(max(row) for row in matrix) or 1
                for i, row in enumerate(matrix):
                    for j, count in enumerate(row):
                        if count:
                            ax.text(j, i, count, ha="center", va="center", fontsize=7,
                                    color="white" if count > peak / 2 else "black")
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(labels) - 1), labels[:-1], fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("expected")
            ax.set_title(name, fontsize=9)
        figs.append(("Confusion matrices (classification)", _png(fig)))
    return figs


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _ret_text(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "n/a"
    ci = r.get("ci95")
    return f"{r['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _table(header: list[str], rows: list[list]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _score_rows(results: dict) -> tuple[list[str], list[list]]:
    names = list(results["models"])
    header = ["task", "metric", "n"] + names + ["student retention [95% CI]"]
    rows = []
    for task, e in results["tasks"].items():
        scores = [_fmt(e["models"][n]["score"]) for n in names]
        rows.append([task, e["metric"] + ("" if e["higher_is_better"] else " (lower is better)"), e["n"], *scores,
                     _ret_text(e["retention"].get(STUDENT))])
    return header, rows


def _cost_rows(results: dict) -> tuple[list[str], list[list]]:
    header = ["model", "parameters", "size on disk (MB)", "latency p50 (ms)", "latency p95 (ms)", "tokens/s batched", "peak RSS (MB)"]
    rows = [[n, _fmt(m.get("parameters")), _fmt(m.get("size_bytes", 0) / 1e6, 1), _fmt(m.get("latency_ms_p50"), 1),
             _fmt(m.get("latency_ms_p95"), 1), _fmt(m.get("tokens_per_s_batched"), 1), _fmt(m.get("peak_rss_mb"), 0)]
            for n, m in results["models"].items()]
    return header, rows


def render_html(results: dict, train_log: list[dict], cfg) -> str:
    """The whole report in one file: tables, plots as inline PNGs, failures for review."""
    e = html.escape
    gate = results["gate"]
    verdict = "PASS" if gate["passed"] else "FAIL"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>stillhouse eval: {e(cfg.project)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}.pass{color:#170}.fail{color:#b00}"
        "td{max-width:320px;white-space:pre-wrap;word-break:break-word}</style></head><body>",
        f"<h1>stillhouse eval: {e(cfg.project)}</h1>",
        f"<p>Gate: <b class='{verdict.lower()}'>{verdict}</b>"
        f" (eval.min_retention = {e(str(gate['min_retention']))}, eval.max_latency_ms_p95 = {e(str(gate['max_latency_ms_p95']))})</p>",
    ]
    if gate["failures"]:
        parts.append("<ul>" + "".join(f"<li class='fail'>{e(f)}</li>" for f in gate["failures"]) + "</ul>")
    if results["lost_most"]:
        lost = ", ".join(f"{x['task']} ({x['retention']:.3f})" for x in results["lost_most"])
        parts.append(f"<p>Tasks that lost the most: <b>{e(lost)}</b></p>")
    header, rows = _score_rows(results)
    parts += ["<h2>Scores and retention</h2>", _table(header, rows),
              "<p>Retention = student / teacher (perplexity: teacher / student); 95% CI from a paired bootstrap over "
              f"test examples ({results['settings']['bootstrap_samples']} resamples). n/a: the teacher scored 0.</p>"]
    header, rows = _cost_rows(results)
    parts += ["<h2>Cost</h2>", _table(header, rows),
              f"<p>Greedy decoding, max_new_tokens = {results['settings']['max_new_tokens']}, CPU with "
              f"{results['settings']['torch_threads']} threads. Latency: one request at a time after a warm-up; peak RSS is "
              "the whole process while that model was loaded and running.</p>"]
    for title, img in _figures(results, train_log, cfg):
        parts += [f"<h2>{e(title)}</h2>", img]
    fails = results["failures"]
    parts.append("<h2>Failures to review</h2>")
    if fails:
        parts.append(_table(["task", "id", "input", "expected", "teacher", "student"],
                            [[f["task"], f["id"], f["input"], f["expected"], f["teacher"], f["student"]] for f in fails]))
    else:
        parts.append("<p>None: the student scored fully on every generated answer (or no task generates).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_summary(results: dict, cfg) -> str:
    """A short Markdown summary: verdict, scores with retention, cost."""
    gate = results["gate"]
    lines = [f"# stillhouse eval: {cfg.project}", "", f"Gate: **{'PASS' if gate['passed'] else 'FAIL'}**"]
    lines += [f"- {f}" for f in gate["failures"]]
    lines += ["", "## Retention", "", _md_table(*_score_rows(results)), ""]
    if results["lost_most"]:
        lines += ["Lost the most: " + ", ".join(f"{x['task']} ({x['retention']:.3f})" for x in results["lost_most"]), ""]
    lines += ["## Cost", "", _md_table(*_cost_rows(results)), "", "Full report: eval/report.html", ""]
    return "\n".join(lines)


def _print_table(console, results: dict) -> None:
    from rich.table import Table

    table = Table(title="eval: student vs teacher")
    for col in ("task", "metric", "teacher", "student", "retention [95% CI]"):
        table.add_column(col)
    for task, e in results["tasks"].items():
        table.add_row(task, e["metric"], _fmt(e["models"][TEACHER]["score"]), _fmt(e["models"][STUDENT]["score"]),
                      _ret_text(e["retention"].get(STUDENT)))
    console.print(table)
    t, s = results["models"][TEACHER], results["models"][STUDENT]
    console.print(f"latency p50: teacher {_fmt(t.get('latency_ms_p50'), 1)} ms, student {_fmt(s.get('latency_ms_p50'), 1)} ms; "
                  f"parameters: teacher {_fmt(t.get('parameters'))}, student {_fmt(s.get('parameters'))}; "
                  f"gate: {'pass' if results['gate']['passed'] else 'FAIL'}")
