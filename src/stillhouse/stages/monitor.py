"""monitor: has production traffic drifted away from what the student was trained on?

Reads the request log of `stillhouse serve` (`serve/requests.jsonl`, texts already PII-masked; a corrupt line is
skipped and counted) and the training data (`data/train.jsonl`, `data/val.jsonl`). The reference is the train
records of the requests' task (same system prompt), else all of train. On the most recent
`monitor.window_requests` answered requests:

1. input length: population stability index (PSI) of the input's length in characters, bucketed at the train
   deciles, against train;
2. unseen words: the share of words never seen in train inputs, against the same share on the val split (held
   out, so it says how many new words ordinary traffic brings);
3. answers (classification only): PSI of the model's answers against the train label distribution;
4. embeddings: maximum mean discrepancy (MMD, RBF kernel at the median-distance bandwidth) between the student's
   mean-pooled last hidden states of the requests and of a sample of train inputs, each side capped at
   `monitor.embedding_sample`, with a permutation p-value. It sees what lengths and words miss: a new topic in
   familiar words.

Calibration. Every check has a p-value against its null distribution at this window size (bootstrap from the
reference for 1-3, permutations for 4), and the family-wise false-alarm rate is `monitor.false_alarm_rate`
(Bonferroni: each check is tested at that rate over the number of checks). A p-value alone would cry wolf on big
windows, where any tiny difference between train and traffic is "significant" (the KS-test false alarms of big
windows), so checks 1-3 must also exceed a fixed effect size (`drift_threshold` PSI, `oov_margin`); the
embedding test is capped in size, so its power does not grow with the window. Below `monitor.min_requests`
there is no verdict, only "insufficient data".

Accuracy drift (optional): `monitor.labeled_requests` holds requests labeled by people; the current student's
accuracy on them is compared with its test accuracy from eval/results.json, and a drop of more than
`monitor.accuracy_margin` is drift.

On drift, the drifted inputs are written as unlabeled records (records.py schema, masked) to
`monitor/redistill.jsonl`; `stillhouse monitor --redistill` (stillhouse.redistill) distills them into a
candidate student and promotes it only if it passes eval and redteam.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stillhouse.config import Config
from stillhouse.errors import GateError, StillhouseError
from stillhouse.records import prompt_messages, response_text
from stillhouse.workspace import StageRun, atomic_write_json, atomic_write_text, read_jsonl, stage_dir, write_jsonl

FORMAT_VERSION = 2
_BOOTSTRAP_DRAWS = 2000  # null samples per bootstrap check: p-values down to 1/2001
_PERMUTATIONS = 1000  # for the MMD test: p-values down to 1/1001, below 0.01 / 4 checks
_PSEUDO_COUNT = 0.5  # per bucket, so an empty bucket does not make PSI infinite
_EMBED_MAX_TOKENS = 128  # a request's first 128 tokens describe its topic well enough

# Scripts written without spaces between words (Thai, kana, CJK ideographs): each character counts as a word.
_UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Digits are left out on purpose: "set a timer for 17 minutes" brings no new word when train said "5 minutes".
_WORD = re.compile(rf"[{_UNSPACED}]|[^\W\d_{_UNSPACED}]+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


# ------------------------------------------------------------------------------------------------ inputs


def _read_log(path: Path) -> tuple[list[tuple[int, dict]], list[int]]:
    """(line number, row) of every request in the log, and the numbers of the lines skipped as corrupt. A log is
    appended to while the server runs and may be cut by a crash or a full disk: one bad line must not stop
    monitoring, but it is counted in the report."""
    rows, skipped = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped.append(n)
                continue
            if isinstance(row, dict):
                rows.append((n, row))
            else:
                skipped.append(n)
    return rows, skipped


def _request_messages(row: dict) -> list[dict] | None:
    """The prompt of a logged request as chat messages (a /v1/completions prompt becomes one user turn)."""
    msgs = row.get("messages")
    if isinstance(msgs, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
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


def student_dir(ws: Path) -> Path | None:
    """The model production runs: export/model, else student/best; None before training."""
    for d in (stage_dir(ws, "export") / "model", stage_dir(ws, "train") / "best"):
        if (d / "config.json").exists():
            return d
    return None


class Student:
    """The current student, loaded on first use (the embedding test and accuracy drift share one load)."""

    def __init__(self, path: Path):
        self.path = path
        self._loaded = None

    def get(self):
        if self._loaded is None:
            from stillhouse.models import load_model, load_tokenizer, resolve_model

            src = resolve_model(str(self.path))
            self._loaded = load_model(src), load_tokenizer(src)
        return self._loaded

    def embed(self, texts: list[str], batch_size: int = 32):
        """Mean-pooled last hidden states (n, H) as float64 numpy, over each text's first tokens (no chat template:
        the system prompt is the same for every request and would only dilute the mean)."""
        import numpy as np
        import torch

        model, tok = self.get()
        tok.padding_side = "right"  # position ids count from 0 on the left; right padding keeps them true
        out = np.zeros((len(texts), model.config.hidden_size))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] or " " for i in idx], padding=True,  # " ": an empty request still has one token truncation=True, max_length=_EMBED_MAX_TOKENS,
                      add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                hidden = model.get_decoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            out[idx] = ((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)).double().numpy()
        return out


# ------------------------------------------------------------------------------------------------ statistics


def _psi(p_counts, q_counts):
    """Population stability index sum((p - q) ln(p / q)) of count vectors (..., K), with a pseudo-count per bucket."""
    import numpy as np

    p = np.asarray(p_counts, dtype=float) + _PSEUDO_COUNT
    q = np.asarray(q_counts, dtype=float) + _PSEUDO_COUNT
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    return ((p - q) * np.log(p / q)).sum(-1)


def _p_value(observed: float, null) -> float:
    """Share of null draws at least as extreme, counting the observation itself (never 0: (1 + k) / (1 + B))."""
    import numpy as np

    null = np.asarray(null)
    return float((1 + (null >= observed).sum()) / (1 + null.size))


def _psi_check(name: str, what: str, p_counts, q_counts, fixed: float, alpha: float, rng, detail: dict) -> dict:
    """PSI of a window of n against the reference; its null: a sample of n drawn from the reference against a
    fresh reference sample of the reference's size (PSI of a small sample is biased upward, about (K-1)/n)."""
    import numpy as np

    value = float(_psi(p_counts, q_counts))
    q_counts = np.asarray(q_counts, dtype=float)
    probs = q_counts / q_counts.sum()
    null = _psi(rng.multinomial(int(sum(p_counts)), probs, size=_BOOTSTRAP_DRAWS),
                rng.multinomial(int(q_counts.sum()), probs, size=_BOOTSTRAP_DRAWS))
    return _decide(name, "psi", value, null, fixed, alpha, f"{what}: PSI", lambda v: f"{v:.3f}", detail)


def _decide(name: str, statistic: str, value: float, null, floor: float, alpha: float, what: str, fmt, detail: dict) -> dict:
    """Drift when the value is both unlikely by chance (p < alpha: small windows) and above the effect-size
    floor (large windows). The threshold reported is the larger of the floor and the null's 1 - alpha quantile."""
    import numpy as np

    p = _p_value(value, null)
    calibrated = float(np.quantile(null, 1 - alpha))
    threshold = max(floor, calibrated)
    drift = bool(p < alpha and value > floor)
    return {
        "name": name, "statistic": statistic, "value": round(value, 4), "p_value": round(p, 5), "alpha": round(alpha, 5),
        "threshold": round(threshold, 4), "floor": floor, "calibrated_threshold": round(calibrated, 4), "drift": drift,
        "summary": f"{what} {fmt(value)} {'>' if drift else '<='} {fmt(threshold)} (p={p:.4f})", "detail": detail,
    }


def _length_check(lengths: list[int], train_lengths: list[int], cfg: Config, alpha: float, rng) -> dict:
    import numpy as np

    # Buckets at the train deciles: each holds ~10% of train, so PSI weighs every part of the range alike.
    edges = np.unique(np.quantile(train_lengths, np.linspace(0.1, 0.9, 9)))
    k = len(edges) + 1
    p = np.bincount(np.searchsorted(edges, lengths, side="right"), minlength=k)
    q = np.bincount(np.searchsorted(edges, train_lengths, side="right"), minlength=k)
    detail = {"bucket_edges_chars": edges.tolist(), "requests_per_bucket": p.tolist(), "train_per_bucket": q.tolist(),
              "median_chars": {"requests": float(np.median(lengths)), "train": float(np.median(train_lengths))}}
    return _psi_check("input_length", "input length", p, q, cfg.monitor.drift_threshold, alpha, rng, detail)


def _oov_counts(texts: list[str], vocab: set[str]):
    import numpy as np

    counts = np.zeros((len(texts), 2))  # (unseen words, words) per text
    for i, text in enumerate(texts):
        words = _words(text)
        counts[i] = (sum(w not in vocab for w in words), len(words))
    return counts


def _oov_check(texts: list[str], ref: Reference, cfg: Config, alpha: float, rng) -> dict:
    import numpy as np

    req, val = _oov_counts(texts, ref.vocab), ref.val_oov
    rate = req[:, 0].sum() / max(req[:, 1].sum(), 1)
    val_rate = val[:, 0].sum() / max(val[:, 1].sum(), 1)
    # the same pooled rate on windows of this size drawn from val: how high it gets by chance (in chunks of
    # draws, so a window of 10,000 needs 2.5M indices at a time, not 20M)
    boot = []
    for start in range(0, _BOOTSTRAP_DRAWS, 250):
        idx = rng.integers(0, len(val), size=(min(250, _BOOTSTRAP_DRAWS - start), len(texts)))
        boot.append(val[idx, 0].sum(1) / np.maximum(val[idx, 1].sum(1), 1))
    check = _decide("unseen_words", "rate", float(rate), np.concatenate(boot), float(val_rate + cfg.monitor.oov_margin),
                    alpha, "words never seen in train:", lambda v: f"{v:.1%}",
                    {"request_words": int(req[:, 1].sum()), "train_vocabulary": len(ref.vocab)})
    check["val_rate"] = round(float(val_rate), 4)
    check["summary"] += f" (val split: {val_rate:.1%})"
    # per request, for choosing what to re-distill
    check["per_request"] = (req[:, 0] / np.maximum(req[:, 1], 1)).tolist()
    check["per_request_threshold"] = float(max(np.quantile(val[:, 0] / np.maximum(val[:, 1], 1), 0.95), val_rate + cfg.monitor.oov_margin))
    return check


def _answer_check(answers: list[str], labels: list[str], cfg: Config, alpha: float, rng) -> dict:
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
    return _psi_check("answers", "answers vs train labels", p, q, cfg.monitor.drift_threshold, alpha, rng, detail)


def mmd_permutation_test(x, y, permutations: int, rng) -> tuple[float, float, float]:
    """(MMD², p-value, bandwidth²) of two samples x (n, d) and y (m, d): the biased (V-statistic) squared maximum
    mean discrepancy with the RBF kernel exp(-|a - b|² / h), h the median squared distance of the pooled
    sample (the median heuristic), and its permutation p-value. Every permutation reuses the one (n+m)² kernel
    matrix: with w = (1/n, ..., -1/m, ...), MMD² = wᵀKw, and all permutations are one matrix product."""
    import numpy as np

    z = np.concatenate([x, y]).astype(np.float64)
    n, size = len(x), len(z)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)  # (N, N) squared distances
    h = float(np.median(d2[np.triu_indices(size, 1)]))
    kernel = np.exp(-d2 / h) if h > 0 else np.ones_like(d2)
    w = np.concatenate([np.full(n, 1 / n), np.full(size - n, -1 / (size - n))])
    weights = np.vstack([w, rng.permuted(np.tile(w, (permutations, 1)), axis=1)])  # (1 + P, N); row 0 observed
    stats = np.einsum("pi,pi->p", weights @ kernel, weights)
    return float(stats[0]), _p_value(stats[0] - 1e-12, stats[1:]), h  # 1e-12: round-off ties count as extreme


def _embedding_check(texts: list[str], ref: Reference, alpha: float, cap: int, rng) -> dict:
    # Distinct inputs only: the reference is deduplicated by prep, and a request sent 50 times (by a retrying
    # client, or because people say "turn on the light" a lot) is not a new topic. Exact duplicates would
    # also put zero distances into the kernel matrix and make ordinary traffic look unlike train.
    texts = list(dict.fromkeys(texts))
    pick = rng.choice(len(texts), size=min(cap, len(texts)), replace=False)
    window = ref.embed([texts[i] for i in pick])
    mmd2, p, h = mmd_permutation_test(window, ref.embeddings, _PERMUTATIONS, rng)
    drift = p < alpha
    return {
        "name": "embeddings", "statistic": "mmd2", "value": round(mmd2, 6), "p_value": round(p, 5), "alpha": round(alpha, 5),
        "drift": drift,
        "summary": f"student embeddings of requests vs train inputs: MMD² {mmd2:.4f}, permutation p={p:.4f} "
                   f"{'<' if drift else '>='} {alpha:.4f}",
        "detail": {"distinct_requests": len(texts), "requests_sampled": len(pick), "train_sampled": len(ref.embeddings), "bandwidth_sq": round(h, 4),
                   "permutations": _PERMUTATIONS, "model": str(ref.model)},
    }


# ------------------------------------------------------------------------------------------------ the checks


@dataclass
class Reference:
    """What a window is compared with: train inputs of the window's task, val inputs, train labels, and the
    student's embeddings of up to `monitor.embedding_sample` train inputs (None when there is no student)."""

    texts: list[str]
    labels: list[str]
    vocab: set[str]
    val_oov: object  # (n_val, 2) unseen and total words per val input, or None without val
    embed: Callable | None = None  # list[str] -> (n, H) array
    embeddings: object = None  # (<= embedding_sample, H)
    model: Path | None = None
    notes: list[str] = field(default_factory=list)


def build_reference(train_texts: list[str], val_texts: list[str], labels: list[str], cfg: Config, rng,
                    embed: Callable | None = None, model: Path | None = None) -> Reference:
    """The reference for drift_checks; `embed` (texts -> array) turns on the embedding test."""
    vocab = {w for t in train_texts for w in _words(t)}
    ref = Reference(train_texts, labels, vocab, _oov_counts(val_texts, vocab) if val_texts else None, model=model)
    if embed is not None and cfg.monitor.embedding_sample > 0:
        pick = rng.choice(len(train_texts), size=min(cfg.monitor.embedding_sample, len(train_texts)), replace=False)
        ref.embed, ref.embeddings = embed, embed([train_texts[i] for i in pick])
    return ref


def drift_checks(texts: list[str], answers: list[str] | None, ref: Reference, cfg: Config, rng) -> list[dict]:
    """Every drift check of one window of request inputs (and, for classification, the model's answers), each
    with a p-value; together they raise a false alarm on ordinary traffic at most `monitor.false_alarm_rate`
    of the time (Bonferroni over the checks that run)."""
    mc = cfg.monitor
    run_answers = bool(ref.labels) and answers is not None and len(answers) >= mc.min_requests
    run_embed = ref.embeddings is not None and len(set(texts)) >= 2
    alpha = mc.false_alarm_rate / (1 + (ref.val_oov is not None) + run_answers + run_embed)
    checks = [_length_check([len(t) for t in texts], [len(t) for t in ref.texts], cfg, alpha, rng)]
    if ref.val_oov is not None:
        checks.append(_oov_check(texts, ref, cfg, alpha, rng))
    else:
        checks.append({"name": "unseen_words", "skipped": "no val records (data/val.jsonl): no held-out baseline for unseen words"})
    if ref.labels:
        if run_answers:
            checks.append(_answer_check(answers, ref.labels, cfg, alpha, rng))
        else:
            checks.append({"name": "answers", "skipped": f"{len(answers or [])} classification requests; need {mc.min_requests} (monitor.min_requests)"})
    if run_embed:
        checks.append(_embedding_check(texts, ref, alpha, mc.embedding_sample, rng))
    else:
        checks.append({"name": "embeddings", "skipped": "; ".join(ref.notes) or "off (monitor.embedding_sample=0)"})
    return checks


def read_labeled_requests(path: Path) -> list[tuple[list[dict], str]]:
    """(prompt messages, correct answer) per line of a file of labeled requests: records whose last message is
    the assistant's correct answer, or lines of serve/requests.jsonl with a `label` added."""
    if not path.exists():
        raise StillhouseError(f"monitor.labeled_requests: {path} not found; point it at a JSONL of labeled requests or set it to null")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StillhouseError(f"{path} line {n}: not valid JSON ({e.msg}); fix or remove that line") from None
        messages = _request_messages(row) if isinstance(row, dict) else None
        label = row.get("label") if isinstance(row, dict) and "label" in row else (response_text(row) if messages else None)
        if not messages or not isinstance(label, str) or not label.strip():
            raise StillhouseError(f"{path} line {n}: expected `messages` ending with the correct assistant answer, "
                                  "or a logged request with a `label` string")
        out.append((messages, label.strip()))
    return out


def _test_accuracy(ws: Path) -> float | None:
    """The student's classification accuracy on the test split, from eval/results.json."""
    try:
        results = json.loads((stage_dir(ws, "eval") / "results.json").read_text())
        return float(results["tasks"]["classification"]["models"]["student"]["score"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _accuracy_check(cfg: Config, student: Student | None) -> dict:
    """The current student's accuracy on requests labeled by people vs its test accuracy."""
    from stillhouse.metrics import accuracy, normalize_prediction
    from stillhouse.records import encode_prompt, generate

    path = cfg.path(cfg.monitor.labeled_requests)
    items = read_labeled_requests(path)
    if len(items) < cfg.monitor.min_requests:
        return {"name": "accuracy", "skipped": f"{len(items)} labeled requests in {path.name}; need {cfg.monitor.min_requests} (monitor.min_requests)"}
    if student is None:
        return {"name": "accuracy", "skipped": "no student yet (export/model or student/best)"}
    model, tok = student.get()
    outputs = generate(model, tok, [encode_prompt(tok, m) for m, _ in items], cfg.eval.max_new_tokens)
    acc = accuracy([label for _, label in items], [normalize_prediction(o) for o in outputs])
    test = _test_accuracy(cfg.workspace)
    detail = {"labeled_requests": len(items), "file": str(path), "model": str(student.path)}
    if test is None:
        return {"name": "accuracy", "statistic": "accuracy", "value": round(acc, 4), "drift": False, "detail": detail,
                "summary": f"accuracy on {len(items)} labeled requests {acc:.3f} (no student test accuracy in eval/results.json to compare with)"}
    drift = test - acc > cfg.monitor.accuracy_margin
    return {"name": "accuracy", "statistic": "accuracy", "value": round(acc, 4), "test_accuracy": round(test, 4),
            "threshold": round(test - cfg.monitor.accuracy_margin, 4), "drift": drift, "detail": detail,
            "summary": f"accuracy on {len(items)} labeled requests {acc:.3f} {'<' if drift else '>='} test accuracy "
                       f"{test:.3f} - margin {cfg.monitor.accuracy_margin}"}


# ------------------------------------------------------------------------------------------------ the stage


def _gate(manifest: dict, fail_on_drift: bool) -> None:
    if fail_on_drift and manifest.get("verdict") == "drift":
        raise GateError(f"monitor: production traffic drifted ({'; '.join(manifest.get('reasons', []))}); "
                        f"see {Path(manifest.get('report', 'monitor/report.md'))}")


def run(cfg: Config, *, fail_on_drift: bool = False) -> dict:
    """Compare recent production requests with the training data; write monitor/report.json, report.md and
    (on drift) redistill.jsonl. Raises GateError on drift only when `fail_on_drift`, after writing the report."""
    import numpy as np

    from stillhouse.pii import mask
    from stillhouse.ui import console

    ws, mc = cfg.workspace, cfg.monitor
    log_path = stage_dir(ws, "serve") / "requests.jsonl"
    train_path, val_path = ws / "data" / "train.jsonl", ws / "data" / "val.jsonl"
    if not train_path.exists():
        raise StillhouseError(f"{train_path} not found; run `stillhouse -w {ws} prep` first")
    if not log_path.exists():
        raise StillhouseError(f"{log_path} not found: no production requests yet; serve the model with `stillhouse -w {ws} serve` and send requests first")
    model_dir = student_dir(ws)
    inputs = [log_path, train_path] + ([val_path] if val_path.exists() else [])
    if model_dir is not None and (mc.embedding_sample > 0 or mc.labeled_requests):
        inputs.append(model_dir)
    if mc.labeled_requests:
        inputs += [p for p in (cfg.path(mc.labeled_requests), stage_dir(ws, "eval") / "results.json") if p.exists()]
    stage = StageRun(cfg, "monitor", inputs=inputs, params={"monitor": mc.model_dump(), "format": FORMAT_VERSION})
    if stage.previous:
        console.print(f"monitor: up to date ({stage.previous.get('verdict')}), skipped")
        _gate(stage.previous, fail_on_drift)
        return stage.previous

    # --- production window: answered requests only, most recent last
    rows, skipped = _read_log(log_path)
    requests = []
    for line_no, row in rows:
        messages = _request_messages(row)
        if row.get("status") == 200 and messages:
            requests.append({"line": line_no, "row": row, "messages": messages, "text": _input_text(messages)})
    requests = requests[-mc.window_requests:]

    # --- training reference: the train (and val) records of the window's task, known by its system prompt
    train = read_jsonl(train_path)
    val = read_jsonl(val_path) if val_path.exists() else []
    if not train:
        raise StillhouseError(f"{train_path} holds no records; run `stillhouse -w {ws} prep` with some sources first")
    systems = {_system_prompt(r["messages"]) for r in requests}

    def of_window_task(records: list[dict]) -> list[dict]:
        return [r for r in records if _system_prompt(prompt_messages(r)) in systems] or records

    tasks = {r.get("task", "text") for r in train}
    cls_records = [r for r in train if r.get("task") == "classification" and response_text(r) is not None]
    cls_systems = {_system_prompt(prompt_messages(r)) for r in cls_records}

    def task_of(messages: list[dict]) -> str:
        # A request belongs to a task when it carries that task's system prompt; a single-task model owns all.
        if cls_records and (_system_prompt(messages) in cls_systems or tasks == {"classification"}):
            return "classification"
        return next(iter(tasks)) if len(tasks) == 1 else "text"

    rng = np.random.default_rng(0)  # fixed: the same log gives the same verdict
    student = Student(model_dir) if model_dir is not None else None
    n = len(requests)
    checks: list[dict] = []
    if n >= mc.min_requests:
        ref_train = of_window_task(train)
        train_texts = [_input_text(prompt_messages(r)) for r in ref_train]
        labels = [response_text(r).strip() for r in ref_train if r.get("task") == "classification" and response_text(r) is not None]
        ref = build_reference(train_texts, [_input_text(prompt_messages(r)) for r in of_window_task(val)] if val else [],
                              labels, cfg, rng, embed=student.embed if student else None, model=model_dir)
        if student is None:
            ref.notes.append("no student yet (export/model or student/best) to embed requests with")
        answers = None
        if labels:
            answers = [str(r["row"].get("output", "")).strip() for r in requests if task_of(r["messages"]) == "classification"]
        checks = drift_checks([r["text"] for r in requests], answers, ref, cfg, rng)
    if mc.labeled_requests:
        checks.append(_accuracy_check(cfg, student))
    drifted = [c for c in checks if c.get("drift")]
    if drifted:
        verdict, reasons = "drift", [c["summary"] for c in drifted]
    elif n < mc.min_requests:
        verdict = "insufficient data"
        reasons = [f"{n} answered requests in serve/requests.jsonl; need at least {mc.min_requests} (monitor.min_requests)"]
    else:
        verdict, reasons = "ok", [c["summary"] for c in checks if "summary" in c]

    out = stage.dir
    redistill_path = out / "redistill.jsonl"
    train_texts_all = [_input_text(prompt_messages(r)) for r in train]
    redistill = _redistill_records(requests, checks, train_texts_all, task_of, mask) if verdict == "drift" and requests else []
    if redistill:
        write_jsonl(redistill_path, redistill)
    else:
        redistill_path.unlink(missing_ok=True)  # a stale file from an earlier drift must not be re-distilled again
    if verdict == "drift":
        next_step = (f"`stillhouse -w {ws} monitor --redistill` labels {redistill_path.relative_to(ws)} ({len(redistill)} records)"
                     + (" and monitor.labeled_requests" if mc.labeled_requests else "")
                     + " with the teacher, trains a candidate from the current student and promotes it only if eval and redteam pass")
    elif verdict == "insufficient data":
        next_step = f"send more traffic, then run `stillhouse -w {ws} monitor` again"
    else:
        next_step = "nothing to do"
    for c in checks:  # per-request scores served the selection above; the report keeps the summary
        for key in ("per_request", "per_request_threshold"):
            c.pop(key, None)
    report = {"verdict": verdict, "reasons": reasons, "requests": n, "window_requests": mc.window_requests,
              "log_lines_skipped": len(skipped), "log_lines_skipped_first": skipped[:20],
              "train_records": len(train), "val_records": len(val), "false_alarm_rate": mc.false_alarm_rate,
              "checks": checks, "redistill_records": len(redistill), "next_step": next_step}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report))

    colour = {"ok": "green", "drift": "red"}.get(verdict, "yellow")
    console.print(f"monitor: [{colour}]{verdict}[/] over {n} requests")
    for reason in reasons:
        console.print(f"  - {reason}")
    if skipped:
        console.print(f"  [yellow]{len(skipped)} corrupt line(s) of {log_path} skipped (first: line {skipped[0]})[/]")
    if verdict != "ok":
        console.print(f"  next: {next_step}")
    manifest = stage.finish(
        metrics={c["name"]: c["value"] for c in checks if "value" in c}
        | {f"{c['name']}_p_value": c["p_value"] for c in checks if "p_value" in c}
        | {"requests": n, "log_lines_skipped": len(skipped)},
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
    if report["log_lines_skipped"]:
        lines += [f"{report['log_lines_skipped']} corrupt line(s) of serve/requests.jsonl skipped "
                  f"(first: {', '.join(map(str, report['log_lines_skipped_first']))}).", ""]
    if report["checks"]:
        lines += ["| check | value | threshold | p-value | drift |", "|---|---|---|---|---|"]
        for c in report["checks"]:
            if "skipped" in c:
                lines.append(f"| {c['name']} | skipped: {c['skipped']} | | | |")
            else:
                lines.append(f"| {c['name']} | {c['value']} | {c.get('threshold', '')} | {c.get('p_value', '')} | {'yes' if c['drift'] else 'no'} |")
        lines += ["", f"Each check's p-value is against windows of this size drawn from the training data itself; a check "
                      f"fires below {report['false_alarm_rate']} / (number of checks), and the length, word and answer "
                      "checks also need an effect above their fixed floor, so neither small nor large windows raise "
                      "false alarms.", ""]
    lines += [f"Next: {report['next_step']}", ""]
    return "\n".join(lines)
