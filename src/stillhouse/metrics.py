"""Task metrics and bootstrap confidence intervals: pure functions, no models, no files.

Used by `eval` (scores per task, "% of teacher retained") and `redteam` (verbatim overlap). Everything here is
written by hand on purpose: the usual packages (rouge-score, evaluate, sklearn) download resources or pull in
large dependencies, and each metric is a few lines that the tests pin against hand-computed values.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Callable

# Scripts written without spaces between words: each character is one token, so ROUGE and token F1 still mean
# something for Japanese, Chinese and Thai (a run of them would otherwise be a single "word").
_NO_SPACE = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_NO_SPACE}]|[^\\W{_NO_SPACE}]+")


def words(text: str) -> list[str]:
    """Lowercased word tokens (punctuation dropped; CJK and Thai split into characters)."""
    return _TOKEN.findall((text or "").lower())


# ------------------------------------------------------------------------------------------- classification


def normalize_prediction(text: str) -> str:
    """A generated answer as a label: its first non-empty line, stripped."""
    for line in (text or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def accuracy(gold: list[str], pred: list[str]) -> float:
    """Fraction of exact matches (after stripping both sides)."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} items, pred {len(pred)}")
    if not gold:
        return float("nan")
    return sum(g.strip() == p.strip() for g, p in zip(gold, pred)) / len(gold)


def per_class_prf(gold: list[str], pred: list[str], labels: list[str] | None = None) -> dict[str, tuple[float, float, float, int]]:
    """{label: (precision, recall, f1, support)}. Classes are `labels` (default: the gold labels); a prediction
    outside them (free text from a generative model) is simply wrong: it costs its gold class recall but adds
    no class of its own, so one odd output cannot drag macro-F1 down by a whole class."""
    gold = [g.strip() for g in gold]
    pred = [p.strip() for p in pred]
    classes = sorted(set(gold)) if labels is None else list(labels)
    out = {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        out[c] = (*prf1(tp, fp, fn), tp + fn)
    return out


def macro_f1(gold: list[str], pred: list[str], labels: list[str] | None = None) -> float:
    """Unweighted mean of per-class F1. A class that is neither in `gold` nor predicted says nothing about the
    model and is left out; a gold class that is never predicted counts as F1 = 0."""
    gold_set, pred_set = {g.strip() for g in gold}, {p.strip() for p in pred}
    f1s = [f for c, (_, _, f, _) in per_class_prf(gold, pred, labels).items() if c in gold_set or c in pred_set]
    return sum(f1s) / len(f1s) if f1s else float("nan")


OTHER = "(other)"


def confusion_matrix(gold: list[str], pred: list[str], labels: list[str]) -> list[list[int]]:
    """Counts, rows = gold label, columns = predicted label; the last column counts predictions outside
    `labels` (shown as "(other)")."""
    index = {c: i for i, c in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for g, p in zip(gold, pred):
        g, p = g.strip(), p.strip()
        if g in index:
            matrix[index[g]][index.get(p, len(labels))] += 1
    return matrix


# ----------------------------------------------------------------------------------------- text similarity


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (not necessarily contiguous). O(len(a) * len(b)) time,
    O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def longest_common_substring(a: list, b: list) -> int:
    """Length of the longest contiguous run shared by `a` and `b` (a verbatim copy signal)."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on word tokens: LCS-based precision and recall, F-measure with beta = 1.
    Two empty texts agree (1.0); one empty text scores 0."""
    p, r = words(prediction), words(reference)
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 (each word counted as often as it occurs in both). No English article
    stripping: the data may be in any language."""
    p, r = words(prediction), words(reference)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------------ extraction


def prf1(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts; 0 where a denominator is 0."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in `text` (models often wrap it in prose or code fences), or None."""
    text = text or ""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            obj, _ = decoder.raw_decode(text[start:])
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _field_pairs(obj, prefix: str = "") -> set[tuple[str, str]]:
    """Flatten to (dotted key, normalized value); a list is a multi-valued field, one pair per element."""
    pairs: set[tuple[str, str]] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            pairs |= _field_pairs(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for v in obj:
            pairs |= _field_pairs(v, prefix)
    elif obj is not None and str(obj).strip() != "":
        pairs.add((prefix, " ".join(str(obj).lower().split())))
    return pairs


def field_counts(prediction: str, reference: str) -> tuple[int, int, int]:
    """(tp, fp, fn) over (field, value) pairs of the JSON in `prediction` vs `reference`. Values compare
    case- and whitespace-insensitively; output that is not JSON predicts no fields (every gold field missed)."""
    gold = _field_pairs(parse_json_object(reference) or {})
    pred = _field_pairs(parse_json_object(prediction) or {})
    return len(gold & pred), len(pred - gold), len(gold - pred)


# ------------------------------------------------------------------------------------------------ perplexity


def perplexity(nll_sum_nats: float, n_tokens: float) -> float:
    """exp(mean negative log-likelihood per token)."""
    return math.exp(nll_sum_nats / n_tokens) if n_tokens else float("nan")


# ---------------------------------------------------------------------------------------------- uncertainty


def bootstrap_ci(
    n: int, statistic: Callable, *, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(indices)` over resamples (with replacement) of n examples.

    `statistic` receives an int array of n indices and computes everything from those examples, so a ratio of
    two models' scores evaluated on the same indices is a *paired* bootstrap. The same seed gives the same
    resamples. Resamples where the statistic is undefined (NaN, e.g. a zero denominator) are dropped; None
    when there is nothing to resample or every resample was undefined.
    """
    import numpy as np

    if n <= 0 or samples <= 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(samples)], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------- memorization


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """Area under the ROC curve of a score that should be higher for `positive`: the probability that a random
    positive outscores a random negative, ties counting half (the Mann-Whitney U statistic). 0.5 = no signal."""
    import numpy as np

    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    # ranks of the pooled scores (ties get their average rank): U = sum of positive ranks - n_pos (n_pos + 1) / 2
    pooled = np.concatenate([pos, neg])
    order = pooled.argsort(kind="mergesort")
    ranks = np.empty(pooled.size)
    ranks[order] = np.arange(1, pooled.size + 1)
    for value in np.unique(pooled):  # average the ranks of tied scores
        tied = pooled == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def exposure(canary_log_ppl: float, candidate_log_ppl: list[float]) -> float:
    """Exposure of a secret canary in bits (Carlini et al. 2019, "The Secret Sharer"): log2 |R| - log2 rank,
    where R is the canary plus the random candidates of the same format and rank is the canary's 1-based
    position when R is sorted by log-perplexity (lowest = most likely first). A canary the model did not learn
    ranks uniformly at random (expected exposure about 1.4 bits); one it reproduces ranks first and gets the
    maximum, log2 |R| (13.3 bits for 10,000 candidates). Ties with candidates count against the canary."""
    import numpy as np

    cands = np.asarray(candidate_log_ppl, dtype=float)
    rank = 1 + int((cands <= canary_log_ppl).sum())
    return float(math.log2(cands.size + 1) - math.log2(rank))
