"""monitor: has production traffic drifted away from what the student was trained on?

Reads the request log of `stillhouse serve` (`serve/requests.jsonl`, texts already PII-masked) and the training
data (`data/train.jsonl`, `data/val.jsonl`). On the most recent `monitor.window_requests` answered requests:

1. input length: population stability index (PSI) of the input's length in characters, bucketed at the train
   deciles, against train;
2. unseen words: the share of words never seen in train inputs, against the same share on the val split (held
   out, so it says how many new words ordinary traffic brings);
3. answers (classification only): PSI of the model's answers against the train label distribution.

Calibration. PSI of a small sample is biased upward (with n requests in K buckets it is about (K-1)/n with no
drift at all), so a fixed threshold cries wolf on small windows. Each check's threshold is the larger of the
configured one and the 99th percentile of the same statistic on samples of the same size drawn from the reference
itself (a bootstrap with a fixed seed). Large windows fall back to the fixed threshold: PSI measures how far apart
two distributions are and does not grow with the sample size, unlike a p-value (the KS-test false alarms on big
windows). Below `monitor.min_requests` there is no verdict, only "insufficient data".

On drift, the drifted inputs are written as unlabeled records (records.py schema, masked) to
`monitor/redistill.jsonl`, ready to be added to the prep sources and distilled again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from stillhouse.config import Config
from stillhouse.errors import GateError, StillhouseError
from stillhouse.records import prompt_messages, response_text
from stillhouse.workspace import StageRun, atomic_write_json, atomic_write_text, read_jsonl, stage_dir, write_jsonl

FORMAT_VERSION = 1
_BOOTSTRAP_DRAWS = 2000
_NULL_QUANTILE = 0.99  # a window of ordinary traffic exceeds the calibrated threshold 1% of the time
_PSEUDO_COUNT = 0.5  # per bucket, so an empty bucket does not make PSI infinite

# Scripts written without spaces between words (Thai, kana, CJK ideographs): each character counts as a word.
_UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Digits are left out on purpose: "set a timer for 17 minutes" brings no new word when train said "5 minutes".
_WORD = re.compile(rf"[{_UNSPACED}]|[^\W\d_{_UNSPACED}]+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


# ------------------------------------------------------------------------------------------------ inputs


def _read_log(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every request in the log. The server may be appending right now, so a torn last
    line is skipped; a bad line anywhere else is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            if n == len(lines):
                continue
            raise StillhouseError(f"{path} line {n}: not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def _request_messages(row: dict) -> list[dict] | None:
    """The prompt of a logged request as chat messages (a /v1/completions prompt becomes one user turn)."""
    msgs = row.get("messages")
    if isinstance(msgs, list):
        return msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    return None


def _input_text(messages: list[dict]) -> str:
    """What drift is measured on: the last user turn (system prompts are fixed per task, not traffic)."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def _system_prompt(messages: list[dict]) -> str | None:
    return next((m["content"] for m in messages if m.get("role") == "system"), None)


# ------------------------------------------------------------------------------------------------ statistics


def _psi(p_counts, q_counts):
    """Population stability index sum((p - q) ln(p / q)) of count vectors (..., K), with a pseudo-count per bucket."""
    import numpy as np

    p = np.asarray(p_counts, dtype=float) + _PSEUDO_COUNT
    q = np.asarray(q_counts, dtype=float) + _PSEUDO_COUNT
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    return ((p - q) * np.log(p / q)).sum(-1)


def _psi_null_quantile(q_counts, n: int, rng) -> float:
    """The 99th percentile of PSI between a sample of n drawn from the reference and a fresh reference sample of
    the same size as the real one: what PSI looks like at this window size when nothing drifted."""
    import numpy as np

    q_counts = np.asarray(q_counts, dtype=float)
    probs = q_counts / q_counts.sum()
    samples = rng.multinomial(n, probs, size=_BOOTSTRAP_DRAWS)
    refs = rng.multinomial(int(q_counts.sum()), probs, size=_BOOTSTRAP_DRAWS)
    return float(np.quantile(_psi(samples, refs), _NULL_QUANTILE))


def _psi_check(name: str, what: str, p_counts, q_counts, fixed: float, rng, detail: dict) -> dict:
    value = float(_psi(p_counts, q_counts))
    calibrated = _psi_null_quantile(q_counts, int(sum(p_counts)), rng)
    threshold = max(fixed, calibrated)
    drift = value > threshold
    return {
        "name": name, "statistic": "psi", "value": round(value, 4), "threshold": round(threshold, 4),
        "fixed_threshold": fixed, "calibrated_threshold": round(calibrated, 4), "drift": drift,
        "summary": f"{what}: PSI {value:.3f} {'>' if drift else '<='} {threshold:.3f}", "detail": detail,
    }


def _length_check(lengths: list[int], train_lengths: list[int], cfg: Config, rng) -> dict:
    import numpy as np

    # Buckets at the train deciles: each holds ~10% of train, so PSI weighs every part of the range alike.
    edges = np.unique(np.quantile(train_lengths, np.linspace(0.1, 0.9, 9)))
    k = len(edges) + 1
    p = np.bincount(np.searchsorted(edges, lengths, side="right"), minlength=k)
    q = np.bincount(np.searchsorted(edges, train_lengths, side="right"), minlength=k)
    detail = {"bucket_edges_chars": edges.tolist(), "requests_per_bucket": p.tolist(), "train_per_bucket": q.tolist(),
              "median_chars": {"requests": float(np.median(lengths)), "train": float(np.median(train_lengths))}}
    return _psi_check("input_length", "input length", p, q, cfg.monitor.drift_threshold, rng, detail)


def _oov_counts(texts: list[str], vocab: set[str]):
    import numpy as np

    counts = np.zeros((len(texts), 2))  # (unseen words, words) per text
    for i, text in enumerate(texts):
        words = _words(text)
        counts[i] = (sum(w not in vocab for w in words), len(words))
    return counts


def _oov_check(texts: list[str], vocab: set[str], val_texts: list[str], cfg: Config, rng) -> dict:
    import numpy as np

    if not val_texts:
        return {"name": "unseen_words", "skipped": "no val records (data/val.jsonl): no held-out baseline for unseen words"}
    req, val = _oov_counts(texts, vocab), _oov_counts(val_texts, vocab)
    rate = req[:, 0].sum() / max(req[:, 1].sum(), 1)
    val_rate = val[:, 0].sum() / max(val[:, 1].sum(), 1)
    # the same pooled rate on windows of this size drawn from val: how high it gets by chance
    idx = rng.integers(0, len(val), size=(_BOOTSTRAP_DRAWS, len(texts)))
    boot = val[idx, 0].sum(1) / np.maximum(val[idx, 1].sum(1), 1)
    calibrated = float(np.quantile(boot, _NULL_QUANTILE))
    threshold = max(val_rate + cfg.monitor.oov_margin, calibrated)
    drift = bool(rate > threshold)
    return {
        "name": "unseen_words", "statistic": "rate", "value": round(float(rate), 4), "threshold": round(float(threshold), 4),
        "val_rate": round(float(val_rate), 4), "calibrated_threshold": round(calibrated, 4), "drift": drift,
        "summary": f"words never seen in train: {rate:.1%} of request words {'>' if drift else '<='} {threshold:.1%} "
                   f"(val split: {val_rate:.1%})",
        "detail": {"request_words": int(req[:, 1].sum()), "train_vocabulary": len(vocab)},
        # per request, for choosing what to re-distill
        "per_request": (req[:, 0] / np.maximum(req[:, 1], 1)).tolist(),
        "per_request_threshold": float(max(np.quantile(val[:, 0] / np.maximum(val[:, 1], 1), 0.95), val_rate + cfg.monitor.oov_margin)),
    }


def _answer_check(answers: list[str], labels: list[str], cfg: Config, rng) -> dict:
    if len(answers) < cfg.monitor.min_requests:
        return {"name": "answers", "skipped": f"{len(answers)} classification requests; need {cfg.monitor.min_requests} (monitor.min_requests)"}
    classes = sorted(set(labels))
    known = [a for a in answers if a in classes]
    # Answers outside the label set are reported, not scored: a student that is sometimes wrong would otherwise
    # look drifted from day one.
    p = [known.count(c) for c in classes]
    q = [labels.count(c) for c in classes]
    detail = {"answers": dict(zip(classes, p)), "train_labels": dict(zip(classes, q)),
              "answers_outside_labels": len(answers) - len(known)}
    if not known:
        return {"name": "answers", "value": None, "drift": True, "detail": detail,
                "summary": f"answers: none of {len(answers)} answers is a train label"}
    return _psi_check("answers", "answers vs train labels", p, q, cfg.monitor.drift_threshold, rng, detail)


# ------------------------------------------------------------------------------------------------ the stage


def _gate(manifest: dict, fail_on_drift: bool) -> None:
    if fail_on_drift and manifest.get("verdict") == "drift":
        raise GateError(f"monitor: production inputs drifted ({'; '.join(manifest.get('reasons', []))}); "
                        f"see {Path(manifest.get('report', 'monitor/report.md'))}")


def run(cfg: Config, *, fail_on_drift: bool = False) -> dict:
    """Compare recent production requests with the training data; write monitor/report.json, report.md and
    (on drift) redistill.jsonl. Raises GateError on drift only when `fail_on_drift`, after writing the report."""
    import numpy as np

    from stillhouse.pii import mask
    from stillhouse.ui import console

    ws = cfg.workspace
    log_path = stage_dir(ws, "serve") / "requests.jsonl"
    train_path, val_path = ws / "data" / "train.jsonl", ws / "data" / "val.jsonl"
    if not train_path.exists():
        raise StillhouseError(f"{train_path} not found; run `stillhouse -w {ws} prep` first")
    if not log_path.exists():
        raise StillhouseError(f"{log_path} not found: no production requests yet; serve the model with `stillhouse -w {ws} serve` and send requests first")
    inputs = [log_path, train_path] + ([val_path] if val_path.exists() else [])
    stage = StageRun(cfg, "monitor", inputs=inputs, params={"monitor": cfg.monitor.model_dump(), "format": FORMAT_VERSION})
    if stage.previous:
        console.print(f"monitor: up to date ({stage.previous.get('verdict')}), skipped")
        _gate(stage.previous, fail_on_drift)
        return stage.previous

    # --- production window: answered requests only, most recent last
    requests = []
    for line_no, row in _read_log(log_path):
        messages = _request_messages(row)
        if row.get("status") == 200 and messages:
            requests.append({"line": line_no, "row": row, "messages": messages, "text": _input_text(messages)})
    requests = requests[-cfg.monitor.window_requests:]

    # --- training reference
    train = read_jsonl(train_path)
    val = read_jsonl(val_path) if val_path.exists() else []
    train_texts = [_input_text(prompt_messages(r)) for r in train]
    if not train_texts:
        raise StillhouseError(f"{train_path} holds no records; run `stillhouse -w {ws} prep` with some sources first")
    vocab = {w for t in train_texts for w in _words(t)}
    tasks = {r.get("task", "text") for r in train}
    cls_records = [r for r in train if r.get("task") == "classification" and response_text(r) is not None]
    cls_systems = {_system_prompt(prompt_messages(r)) for r in cls_records}

    def task_of(messages: list[dict]) -> str:
        # A request belongs to a task when it carries that task's system prompt; a single-task model owns all.
        if cls_records and (_system_prompt(messages) in cls_systems or tasks == {"classification"}):
            return "classification"
        return next(iter(tasks)) if len(tasks) == 1 else "text"

    rng = np.random.default_rng(0)  # fixed: the same log gives the same verdict
    n = len(requests)
    checks: list[dict] = []
    if n < cfg.monitor.min_requests:
        verdict = "insufficient data"
        reasons = [f"{n} answered requests in serve/requests.jsonl; need at least {cfg.monitor.min_requests} (monitor.min_requests)"]
    else:
        texts = [r["text"] for r in requests]
        checks.append(_length_check([len(t) for t in texts], [len(t) for t in train_texts], cfg, rng))
        checks.append(_oov_check(texts, vocab, [_input_text(prompt_messages(r)) for r in val], cfg, rng))
        if cls_records:
            answers = [str(r["row"].get("output", "")).strip() for r in requests if task_of(r["messages"]) == "classification"]
            checks.append(_answer_check(answers, [response_text(r).strip() for r in cls_records], cfg, rng))
        drifted = [c for c in checks if c.get("drift")]
        verdict = "drift" if drifted else "ok"
        reasons = [c["summary"] for c in (drifted or checks) if "summary" in c]

    out = stage.dir
    redistill_path = out / "redistill.jsonl"
    redistill = _redistill_records(requests, checks, train_texts, task_of, mask) if verdict == "drift" else []
    if redistill:
        write_jsonl(redistill_path, redistill)
    else:
        redistill_path.unlink(missing_ok=True)  # a stale file from an earlier drift must not be re-distilled again
    if verdict == "drift":
        # prep reads JSON Lines through a prep.tables mapping; each record's `text` is its input
        task = max({r["task"] for r in redistill}, key=[r["task"] for r in redistill].count)
        next_step = (
            f"add {redistill_path.relative_to(ws)} ({len(redistill)} unlabeled records) to prep.sources, with a "
            f"prep.tables entry {{pattern: '{redistill_path.name}', task: {task}, input: text, output: null, "
            f"system_prompt: <your task's>}}; then `stillhouse -w {ws} run` re-labels, re-trains and re-exports the student"
        )
    elif verdict == "insufficient data":
        next_step = f"send more traffic, then run `stillhouse -w {ws} monitor` again"
    else:
        next_step = "nothing to do"
    for c in checks:  # per-request scores served the selection above; the report keeps the summary
        for key in ("per_request", "per_request_threshold"):
            c.pop(key, None)
    report = {"verdict": verdict, "reasons": reasons, "requests": n, "window_requests": cfg.monitor.window_requests,
              "train_records": len(train), "val_records": len(val), "checks": checks,
              "redistill_records": len(redistill), "next_step": next_step}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report))

    colour = {"ok": "green", "drift": "red"}.get(verdict, "yellow")
    console.print(f"monitor: [{colour}]{verdict}[/] over {n} requests")
    for reason in reasons:
        console.print(f"  - {reason}")
    if verdict != "ok":
        console.print(f"  next: {next_step}")
    manifest = stage.finish(
        metrics={c["name"]: c["value"] for c in checks if "value" in c} | {"requests": n},
        verdict=verdict, reasons=reasons, next_step=next_step, report=str(out / "report.md"),
    )
    _gate(manifest, fail_on_drift)
    return manifest


def _redistill_records(requests: list[dict], checks: list[dict], train_texts: list[str], task_of, mask) -> list[dict]:
    """The drifted requests as unlabeled records: those that are individually unusual (unseen words, or a length
    outside every train length); when drift is only in the mix (no single request stands out), the whole window."""
    lo, hi = min(len(t) for t in train_texts), max(len(t) for t in train_texts)
    oov = next((c for c in checks if c["name"] == "unseen_words" and "per_request" in c), None)
    flagged = []
    for i, req in enumerate(requests):
        why = []
        if not lo <= len(req["text"]) <= hi:
            why.append(f"length {len(req['text'])} chars outside train's {lo}-{hi}")
        if oov and oov["per_request"][i] > oov["per_request_threshold"]:
            why.append(f"{oov['per_request'][i]:.0%} unseen words")
        if why:
            flagged.append((req, "; ".join(why)))
    if not flagged:
        flagged = [(req, "part of a drifted window") for req in requests]

    records, seen = [], set()
    for req, why in flagged:
        # The log is masked by serve already; masking again costs microseconds and protects against logs
        # written by something else.
        messages = [{"role": m["role"], "content": mask(m["content"])[0]} for m in req["messages"]]
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        records.append({
            "id": f"redistill-{req['line']:06d}",
            "task": task_of(req["messages"]),
            "messages": messages,  # no assistant turn: unlabeled, the teacher labels it
            "text": _input_text(messages),  # the input alone, for a prep.tables mapping (input: text, output: null)
            "source": {"file": "serve/requests.jsonl", "location": f"line {req['line']}"},
            "sensitivity": "confidential",  # production input: assume the worst until prep labels it
            "provenance": {"origin": "production request", "logged_at": req["row"].get("time"), "drift": why},
        })
    return records


def _markdown(report: dict) -> str:
    lines = [
        "# Monitor report", "",
        f"**Verdict: {report['verdict']}** over the last {report['requests']} answered requests "
        f"(window {report['window_requests']}; train {report['train_records']} records, val {report['val_records']}).", "",
    ]
    lines += [f"- {r}" for r in report["reasons"]] + [""]
    if report["checks"]:
        lines += ["| check | value | threshold | drift |", "|---|---|---|---|"]
        for c in report["checks"]:
            if "skipped" in c:
                lines.append(f"| {c['name']} | skipped: {c['skipped']} | | |")
            else:
                lines.append(f"| {c['name']} | {c['value']} | {c.get('threshold', '')} | {'yes' if c['drift'] else 'no'} |")
        lines += ["", "Thresholds are the larger of the configured one and what a window of this size from the "
                      "training data itself reaches 1% of the time, so small windows do not raise false alarms.", ""]
    lines += [f"Next: {report['next_step']}", ""]
    return "\n".join(lines)
