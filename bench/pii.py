"""Benchmark: quality and speed of `stillhouse.pii.find_pii` (no model, no download).

    .venv/bin/python bench/pii.py [--no-append] [--misses KIND]

Three sets:

1. presidio-research's synthetic set v2 (../shared/benchmarks/pii, 1,500 English sentences, the set Microsoft
   scores Presidio on). Split by template: records whose `template_id` is even are the development half (looked
   at while writing the detectors), odd ones are held out (never looked at record by record); both are reported,
   and the whole set.
2. Our multilingual gold set (en/ja/th, Faker's locales + templates, tests/pii_gold.py, seed fixed).
3. Our hard negatives (log lines, product codes, ALL-CAPS headings, version strings, tests/pii_gold.py): no PII at
   all, so every PERSON found there is a false positive.

Scoring is span-level, as presidio-research's `SpanEvaluator` does it: a prediction is a true positive when it
overlaps a not-yet-matched gold span of the same type with IoU (characters, after trimming whitespace and
punctuation at both ends) >= 0.7 (and, reported alongside, >= 0.9); unmatched predictions are false positives,
unmatched gold spans false negatives. Token-level scores (each word token labeled by the span it lies in, as
presidio-research's older `Evaluator` does) are printed in the summary. F2 weighs recall 4x precision (beta = 2), as the presidio-research
notebooks do. Types are mapped to ours (MAPPING below); gold types we do not mask on purpose (cities and countries,
organizations, job titles, ages, nationalities, dates that are not birth dates, zip codes alone, company web
sites, driver licenses) are not scored, and a prediction lying on such a gold span is ignored rather than counted
as a false positive (e.g. our DOB on a DATE_TIME, our ADDRESS on a lone ZIP_CODE).

Which number compares with Presidio's published ones (0.618 with its default spaCy model at IoU >= 0.9, 0.845
with a transformer NER model at IoU >= 0.7; presidio-research notebooks 4/5, `SpanEvaluator`): the
"SpanEvaluator-rules F2" line, `score_presidio` below. It follows that evaluator's rules: adjacent same-type spans
joined across whitespace and punctuation (gold and predicted), several predictions may together cover one gold
span, the overall count ignores the type, and towns and postcodes next to a street belong to the address (the
notebooks map STREET_ADDRESS, GPE and ZIP_CODE all to LOCATION). Still not identical: Presidio's number also
scores the types we leave alone on purpose (lone towns and countries, organizations, dates, titles, ages), and
splits on spaCy tokens and stop words where we trim characters. The per-kind tables are stricter (no merging,
same type, one prediction per gold span) and are what the earlier sections of docs/benchmarks.md report.

Speed: characters per second of `find_pii` over the presidio texts, best of 3 (one process, one core).
Prints tables and appends them to docs/benchmarks.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

from _docs import append_to_docs  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
PRESIDIO = ROOT.parent / "shared" / "benchmarks" / "pii" / "presidio-research-synth_dataset_v2.json"

# presidio-research entity type -> stillhouse kind
MAPPING = {
    "PERSON": "PERSON", "STREET_ADDRESS": "ADDRESS", "CREDIT_CARD": "CARD", "PHONE_NUMBER": "PHONE",
    "EMAIL_ADDRESS": "EMAIL", "IBAN_CODE": "IBAN", "US_SSN": "SSN", "IP_ADDRESS": "IP",
}
STRUCTURED = ("CARD", "EMAIL", "IBAN", "SSN", "IP", "PHONE", "MY_NUMBER", "THAI_ID")
_TRIM = " \t\n\r.,;:!?\"'()[]{}"


def load_presidio(path: Path = PRESIDIO) -> list[dict]:
    """Records as {"text", "spans": [(start, end, kind)], "ignore": [(start, end)], "places": [(start, end)],
    "template": int}; places are the (unscored) GPE and ZIP_CODE spans, a subset of ignore."""
    docs = []
    for r in json.loads(path.read_text(encoding="utf-8")):
        spans, ignore, places = [], [], []
        for s in r["spans"]:
            span = (s["start_position"], s["end_position"])
            if s["entity_type"] in MAPPING:
                spans.append((*span, MAPPING[s["entity_type"]]))
            else:
                ignore.append(span)
                if s["entity_type"] in ("GPE", "ZIP_CODE"):
                    places.append(span)
        docs.append({"text": r["full_text"], "spans": spans, "ignore": ignore, "places": places,
                     "template": r["template_id"]})
    return docs


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start] in _TRIM:
        start += 1
    while end > start and text[end - 1] in _TRIM:
        end -= 1
    return start, end


def _iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = min(a[1], b[1]) - max(a[0], b[0])
    return max(0, inter) / (max(a[1], b[1]) - min(a[0], b[0]) or 1)


def score(docs: list[dict], predictions: list[list], iou: float) -> dict[str, Counter]:
    """Per kind Counter(tp=, fp=, fn=) at the given IoU threshold; predictions[i] are Spans for docs[i]."""
    by_kind: dict[str, Counter] = {}
    for doc, pred in zip(docs, predictions):
        text = doc["text"]
        gold = [(*_trim(text, s, e), k) for s, e, k in doc["spans"]]
        matched = [False] * len(gold)
        for p in pred:
            ps, pe = _trim(text, p.start, p.end)
            c = by_kind.setdefault(p.kind, Counter())
            best, best_iou = None, 0.0
            for i, (gs, ge, gk) in enumerate(gold):
                if not matched[i] and gk == p.kind and _iou((ps, pe), (gs, ge)) > best_iou:
                    best, best_iou = i, _iou((ps, pe), (gs, ge))
            if best is not None and best_iou >= iou:
                matched[best] = True
                c["tp"] += 1
            elif not any(_iou((ps, pe), ig) > 0 for ig in doc.get("ignore", [])):
                c["fp"] += 1
        for (_, _, gk), m in zip(gold, matched):
            if not m:
                by_kind.setdefault(gk, Counter())["fn"] += 1
    return by_kind


def _merge_adjacent(text: str, spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Join same-kind spans separated only by whitespace and punctuation, as presidio-research's SpanEvaluator
    merges adjacent spans ("4 Main St" + ", " + "Suite 501" is one address there)."""
    merged: list[tuple[int, int, str]] = []
    for s, e, k in sorted(spans):
        if merged and merged[-1][2] == k and all(ch in _TRIM for ch in text[merged[-1][1] : s]):
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]), k)
        else:
            merged.append((s, e, k))
    return merged


def _cover_iou(gold: tuple[int, int], preds: list[tuple[int, int, str]]) -> float:
    """Character IoU between one gold span and the union of several (disjoint) predicted spans."""
    inter = sum(max(0, min(e, gold[1]) - max(s, gold[0])) for s, e, _ in preds)
    union = max([gold[1]] + [e for _, e, _ in preds]) - min([gold[0]] + [s for s, _, _ in preds])
    return inter / (union or 1)


def score_presidio(docs: list[dict], predictions: list[list], iou: float) -> tuple[Counter, dict[str, Counter]]:
    """The rules of presidio-research's `SpanEvaluator` (the one behind Presidio's published 0.618 / 0.845):
    same-kind spans separated only by whitespace or punctuation are merged (gold and predicted alike); for each
    gold span, overlapping predictions are added left to right while they raise the IoU of their union, and the
    gold span is found when that IoU >= `iou`, counting the group as one prediction; leftover predictions are
    false positives. The overall count ignores the kind (a name found as an address still counts, as there);
    the per-kind counts need the same kind. Presidio's notebooks map STREET_ADDRESS, GPE and ZIP_CODE all to
    LOCATION, so a town or postcode next to a street is part of that address there: it is here too ("places");
    a town on its own stays unscored (we do not mask places by design, and Presidio's number includes them).
    Returns (overall Counter(tp, fp, fn), per-kind Counters)."""
    overall, by_kind = Counter(), {}
    for doc, pred in zip(docs, predictions):
        text = doc["text"]
        places = [(*_trim(text, s, e), "place") for s, e in doc.get("places", [])]
        gold = _merge_adjacent(text, [(*_trim(text, s, e), "ADDRESS" if k == "ADDRESS" else k)
                                      for s, e, k in doc["spans"]] + [(s, e, "ADDRESS") for s, e, _ in places])
        # a merged run made of places only is a lone town or postcode: not scored
        gold = [g for g in gold if g[2] != "ADDRESS" or any(
            g[0] <= s and e <= g[1] and k == "ADDRESS" for s, e, k in doc["spans"])]
        got = _merge_adjacent(text, [(*_trim(text, p.start, p.end), p.kind) for p in pred])
        for counter, same_kind in ((overall, False), (None, True)):
            used: set[int] = set()
            for gs, ge, gk in gold:
                c = counter if counter is not None else by_kind.setdefault(gk, Counter())
                group, best = [], 0.0
                for i, p in enumerate(got):
                    if i in used or p[1] <= gs or p[0] >= ge or (same_kind and p[2] != gk):
                        continue
                    if _cover_iou((gs, ge), [got[j] for j in group] + [p]) > best:
                        group.append(i)
                        best = _cover_iou((gs, ge), [got[j] for j in group])
                if group and best >= iou:
                    used.update(group)
                    c["tp"] += 1
                else:
                    c["fn"] += 1
            for i, (ps, pe, pk) in enumerate(got):  # as in `score`: one lying on an unscored gold span is ignored
                if i not in used and not any(_iou((ps, pe), ig) > 0 for ig in doc.get("ignore", [])):
                    (counter if counter is not None else by_kind.setdefault(pk, Counter()))["fp"] += 1
    return overall, by_kind


def score_tokens(docs: list[dict], predictions: list[list]) -> dict[str, Counter]:
    """Token-level counts, as presidio-research's older `Evaluator` scores: every word token (regex \\w+) gets the
    kind of the gold span and of the predicted span it lies in; a token on an unscored gold span counts for nothing."""
    by_kind: dict[str, Counter] = {}
    for doc, pred in zip(docs, predictions):
        for t in re.finditer(r"\w+", doc["text"]):
            def kind_at(spans):
                return next((k for s, e, k in spans if s < t.end() and t.start() < e), None)
            gold = kind_at(doc["spans"]) or kind_at([(s, e, "-") for s, e in doc.get("ignore", [])])
            got = kind_at([(p.start, p.end, p.kind) for p in pred])
            if got and got == gold:
                by_kind.setdefault(got, Counter())["tp"] += 1
                continue
            if got and gold != "-":
                by_kind.setdefault(got, Counter())["fp"] += 1
            if gold and gold != "-":
                by_kind.setdefault(gold, Counter())["fn"] += 1
    return by_kind


def prf(c: Counter, beta: float = 2.0) -> tuple[float, float, float]:
    p = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    r = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    f = (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0
    return p, r, f


def table(title: str, by_kind: dict[str, Counter], by_kind_09: dict[str, Counter] | None = None) -> list[str]:
    """Markdown rows: per kind and overall (micro-averaged) P / R / F2 at IoU 0.7 (and F2 at 0.9)."""
    head = "| kind | gold | P | R | F2 |" + (" F2 @ IoU 0.9 |" if by_kind_09 else "")
    lines = [f"{title}", "", head, "|---" * (head.count("|") - 1) + "|"]
    total, total_09 = Counter(), Counter()
    for kind in sorted(by_kind, key=lambda k: -(by_kind[k]["tp"] + by_kind[k]["fn"])):
        c = by_kind[kind]
        total.update(c)
        p, r, f = prf(c)
        row = f"| {kind} | {c['tp'] + c['fn']} | {p:.3f} | {r:.3f} | {f:.3f} |"
        if by_kind_09:
            total_09.update(by_kind_09.get(kind, Counter()))
            row += f" {prf(by_kind_09.get(kind, Counter()))[2]:.3f} |"
        lines.append(row)
    p, r, f = prf(total)
    row = f"| **overall** | {total['tp'] + total['fn']} | **{p:.3f}** | **{r:.3f}** | **{f:.3f}** |"
    lines.append(row + (f" {prf(total_09)[2]:.3f} |" if by_kind_09 else ""))
    return lines + [""]


def show_errors(docs: list[dict], predictions: list[list], kind: str, limit: int = 40) -> None:
    """Print missed gold spans and false positives of one kind (development half only: used while tuning)."""
    shown = 0
    for doc, pred in zip(docs, predictions):
        gold = {(s, e) for s, e, k in doc["spans"] if k == kind}
        got = {(p.start, p.end) for p in pred if p.kind == kind}
        miss, extra = gold - got, got - gold
        if (miss or extra) and shown < limit:
            shown += 1
            print(repr(doc["text"][:300]))
            print("   missed:", [doc["text"][s:e] for s, e in miss], " extra:", [doc["text"][s:e] for s, e in extra])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    ap.add_argument("--misses", "--errors", metavar="KIND", dest="misses",
                    help="print the development half's missed and false spans of one kind and stop")
    args = ap.parse_args()
    from pii_gold import hard_negatives, multilingual_gold
    from stillhouse.pii import find_pii

    docs = load_presidio()
    dev = [d for d in docs if d["template"] % 2 == 0]
    held = [d for d in docs if d["template"] % 2 == 1]
    if args.misses:
        show_errors(dev, [find_pii(d["text"]) for d in dev], args.misses)
        return

    chars = sum(len(d["text"]) for d in docs)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        predictions = [find_pii(d["text"]) for d in docs]
        best = min(best, time.perf_counter() - t)
    pred = dict(zip(map(id, docs), predictions))

    lines = ["### PII detection quality (`find_pii`, no model) and speed", "",
             f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"Python {platform.python_version()}",
             "- command: `.venv/bin/python bench/pii.py` (span-level, IoU >= 0.7 unless noted; F2 = F-beta, beta 2; "
             "mapping and ignored types in the script's docstring)",
             f"- speed: {chars / best:,.0f} chars/s ({len(docs)} presidio texts, {chars:,} chars, best of 3, one core)", ""]
    summary = []
    for name, part in (("all 1,500", docs), ("development half (even template_id)", dev),
                       ("held-out half (odd template_id)", held)):
        p = [pred[id(d)] for d in part]
        k7, k9 = score(part, p, 0.7), score(part, p, 0.9)
        lines += table(f"presidio-research synth v2, {name}:", k7, k9)
        total = sum(k7.values(), Counter())
        structured = sum((k7[k] for k in STRUCTURED if k in k7), Counter())
        tokens = sum(score_tokens(part, p).values(), Counter())
        (ps7, _), (ps9, _) = score_presidio(part, p, 0.7), score_presidio(part, p, 0.9)
        summary.append(f"- presidio {name}: **SpanEvaluator-rules F2 {prf(ps7)[2]:.3f}** at IoU 0.7 (P {prf(ps7)[0]:.3f} "
                       f"R {prf(ps7)[1]:.3f}; comparable to Presidio's 0.845), {prf(ps9)[2]:.3f} at IoU 0.9 "
                       f"(comparable to 0.618); strict per-kind F2 {prf(total)[2]:.3f} (tables above); token-level "
                       f"P {prf(tokens)[0]:.3f} R {prf(tokens)[1]:.3f} F2 {prf(tokens)[2]:.3f}; structured "
                       f"identifiers recall {prf(structured)[1]:.3f}")

    fragments = sum(1 for d in docs for s, e, k in d["spans"]
                    if k == "ADDRESS" and re.fullmatch(r"[\d\s\-]+|(?:Suite|Apt\.) \d+", d["text"][s:e]))
    summary.append(f"- note: {fragments} of the {sum(k == 'ADDRESS' for d in docs for *_, k in d['spans'])} gold "
                   "STREET_ADDRESS spans are a lone house number, postcode or unit (the set splits some addresses "
                   "into pieces); a whole-address prediction cannot match those at IoU >= 0.7")
    gold = multilingual_gold()
    g_pred = [find_pii(d["text"]) for d in gold]
    lines += table(f"multilingual gold set ({len(gold)} texts: "
                   + ", ".join(f"{n} {lang}" for lang, n in sorted(Counter(d['lang'] for d in gold).items())) + "):",
                   score(gold, g_pred, 0.7))
    for lang in sorted({d["lang"] for d in gold}):
        part = [(d, p) for d, p in zip(gold, g_pred) if d["lang"] == lang]
        k = score([d for d, _ in part], [p for _, p in part], 0.7)
        person = prf(k.get("PERSON", Counter()))
        summary.append(f"- multilingual {lang}: overall F2 {prf(sum(k.values(), Counter()))[2]:.3f}, "
                       f"PERSON P {person[0]:.3f} R {person[1]:.3f}")
    negs = hard_negatives()
    found = Counter(s.kind for t in negs for s in find_pii(t))
    gold_persons = sum(1 for d in gold for s in d["spans"] if s[2] == "PERSON")
    person_all = score(gold + [{"text": t, "spans": []} for t in negs],
                       g_pred + [find_pii(t) for t in negs], 0.7).get("PERSON", Counter())
    summary.append(f"- hard negatives ({len(negs)} lines, no PII): false positives by kind {dict(found) or 'none'}")
    summary.append(f"- PERSON precision on multilingual gold + hard negatives: {prf(person_all)[0]:.3f} "
                   f"({person_all['tp']} right, {person_all['fp']} wrong, {gold_persons} gold names)")
    lines += summary + [""]
    print("\n".join(lines))
    if not args.no_append:
        append_to_docs("\n".join(lines))


if __name__ == "__main__":
    main()
