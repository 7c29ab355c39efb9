"""Re-identification risk in masked records: quasi-identifiers that single a person out in combination.

Masking names and e-mails is not enough: "a 34-year-old nurse in the Tromsø office, hired 2019-03-04" names
one person without any PII pattern. This module finds quasi-identifiers (QIs) in the text a record will be
trained on, counts how many records contain the same combination (k-anonymity, Sweeney 2002: a combination
shared by fewer than k records is a risk), and per `prep.reident.action` reports, generalizes or drops the
records below k.

    kind        found by                                                  generalized to
    DATE        2024-03-15, 15/03/2024, 15 March 2024, March 15, 2024, 2024年3月15日     the year
    AGE         "aged 34", "34 years old", "34-year-old", "age: 34", 34歳                  the decade: 30-39
    POSTCODE    UK postcodes; after "postcode", "ZIP", "postal code", 〒, รหัสไปรษณีย์      the first 2-3 characters
    JOB_TITLE   a list of job nouns with their seniority ("senior nurse", "head of payroll")   [JOB_TITLE]
    DEPARTMENT  "the Oncology ward", "Finance department", "department of Radiology"          [DEPARTMENT]
    PLACE       "based in X", "lives in X", "the X office/branch/plant/site/clinic"           [PLACE]

Only records with at least `min_kinds` different kinds are assessed: a date alone is everywhere. The outputs
name the QI *kinds* of a flagged record, never their values, which may be the very fragments that identify.
Patterns, not a model, for the same reasons as stillhouse.pii (offline, fast, explainable); they favour
precision and English, with the Japanese and Thai forms listed above.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stillhouse.workspace import atomic_write_text

KINDS = ["DATE", "AGE", "POSTCODE", "JOB_TITLE", "DEPARTMENT", "PLACE"]

_MONTHS = {m: i for i, m in enumerate(["january", "february", "march", "april", "may", "june", "july", "august",
                                       "september", "october", "november", "december"], 1)}
_MONTH = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
_YEAR = r"(?:19|20)\d{2}"
_JOBS = (r"nurse|midwife|physician|doctor|surgeon|radiologist|pharmacist|dentist|therapist|paramedic|engineer|"
         r"developer|programmer|accountant|auditor|controller|analyst|manager|director|supervisor|foreman|"
         r"technician|mechanic|electrician|welder|machinist|operator|driver|clerk|cashier|secretary|receptionist|"
         r"administrator|coordinator|consultant|specialist|inspector|architect|designer|lawyer|attorney|paralegal|"
         r"teacher|professor|lecturer|researcher|scientist|officer|intern|trainee|CEO|CFO|CTO|COO|CIO|CISO")
_CAP = r"[A-Z][\w'&-]+"  # a capitalized name word
_NOT_PLACE = {"the", "a", "an", "our", "this", "that", "which", "order", "case", "general", "particular", "total",
              "time", "person", "writing", "advance", "english", "japanese", "thai", *_MONTHS}

# (kind, pattern); group "v" (else the whole match) is the value
_PATTERNS = [
    ("DATE", re.compile(rf"\b(?P<y>{_YEAR})-(?P<m>\d{{1,2}})-(?P<d>\d{{1,2}})\b")),
    ("DATE", re.compile(rf"(?P<y>{_YEAR})年(?P<m>\d{{1,2}})月(?P<d>\d{{1,2}})日")),
    ("DATE", re.compile(rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)? (?P<mn>{_MONTH})\.?,? (?P<y>{_YEAR})\b", re.I)),
    ("DATE", re.compile(rf"\b(?P<mn>{_MONTH})\.? (?P<d>\d{{1,2}})(?:st|nd|rd|th)?,? (?P<y>{_YEAR})\b", re.I)),
    ("DATE", re.compile(rf"\b\d{{1,2}}[/.]\d{{1,2}}[/.](?P<y>{_YEAR})\b")),
    ("AGE", re.compile(r"\b(?:aged|age[d:]?|age of)\s*(?P<v>\d{1,3})\b", re.I)),
    ("AGE", re.compile(r"\b(?P<v>\d{1,3})[- ](?:years?|yrs?)[- ]old\b", re.I)),
    ("AGE", re.compile(r"(?P<v>\d{1,3})\s?歳")),
    ("POSTCODE", re.compile(r"\b(?P<v>[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2})\b")),  # UK: SW1A 1AA
    ("POSTCODE", re.compile(r"(?:\b(?:post ?code|postal code|zip(?: code)?)\b\s*:?\s*|〒\s?|รหัสไปรษณีย์\s*)"
                            r"(?P<v>\d{3}-\d{4}|\d{5}(?:-\d{4})?|[A-Z0-9]{3,4} ?[A-Z0-9]{3})", re.I)),
    ("JOB_TITLE", re.compile(rf"\b(?P<v>(?:(?:senior|junior|chief|lead|principal|assistant|deputy|staff|head) )?(?:{_JOBS})"
                             rf"|head of (?:the )?[a-z]+)s?\b", re.I)),
    ("JOB_TITLE", re.compile(r"(?P<v>看護師|医師|薬剤師|部長|課長|係長|主任|エンジニア|พยาบาล|แพทย์|วิศวกร|ผู้จัดการ)")),
    ("DEPARTMENT", re.compile(rf"\b(?P<v>{_CAP}(?: {_CAP}){{0,2}}) (?:department|dept\.?|division|ward|unit|team)\b")),
    ("DEPARTMENT", re.compile(rf"\b(?:department|division) of (?P<v>{_CAP}(?: {_CAP}){{0,2}})")),
    ("PLACE", re.compile(rf"\b(?:lives|lived|living|based|born|resides|residing|located|moved|relocated) (?:in|to|at) "
                         rf"(?P<v>{_CAP}(?:[ -]{_CAP}){{0,2}})")),
    ("PLACE", re.compile(rf"\b(?:the|our|its) (?P<v>{_CAP}(?: {_CAP}){{0,2}}) (?:office|branch|plant|site|clinic|hospital|"
                         rf"store|warehouse|factory|depot)\b")),
]


@dataclass(frozen=True)
class QuasiIdentifier:
    kind: str  # one of KINDS
    value: str  # normalized, for counting: "2024-03-15", "34", "sw1a 1aa", "senior nurse"
    start: int
    end: int


def find_quasi_identifiers(text: str, kinds: list[str] | None = None) -> list[QuasiIdentifier]:
    """QIs in `text`, in text order, overlaps resolved in favour of the earlier (then longer) match."""
    kinds = set(kinds or KINDS)
    found = []
    for kind, rx in _PATTERNS:
        if kind not in kinds:
            continue
        for m in rx.finditer(text):
            value = _normalize(kind, m)
            if value is not None:
                g = "v" if "v" in rx.groupindex else 0
                found.append(QuasiIdentifier(kind, value, m.start(g), m.end(g)))
    found.sort(key=lambda q: (q.start, -(q.end - q.start)))
    out: list[QuasiIdentifier] = []
    for q in found:
        if not out or q.start >= out[-1].end:
            out.append(q)
    return out


def _normalize(kind: str, m: re.Match) -> str | None:
    if kind == "DATE":
        g = m.groupdict()
        month = g.get("m") or (_month(g["mn"]) if g.get("mn") else None)
        if month is None or g.get("d") is None:
            return m.group(0)  # 15/03/2024: day and month order unknown; the text itself
        return f"{g['y']}-{int(month):02d}-{int(g['d']):02d}"
    value = " ".join(m.group("v").split()).casefold().rstrip(".")
    if kind == "AGE" and not 0 < int(value) < 120:
        return None
    if kind == "PLACE" and value.split()[0] in _NOT_PLACE:
        return None
    if kind == "JOB_TITLE" and value.endswith("s") and not value.endswith(("ss", "is")):
        value = value[:-1]  # "nurses" and "nurse" are one title
    return value


def _month(name: str) -> int:
    return next(i for m, i in _MONTHS.items() if m.startswith(name.lower()[:3]))


def generalize(kind: str, original: str, value: str) -> str:
    """What a QI becomes under action=generalize: a date its year, an age its decade, a postcode its first
    characters; titles, departments and places their kind in brackets (as pii.mask writes PII)."""
    if kind == "DATE":
        year = re.search(_YEAR, original)
        return year.group(0) if year else "[DATE]"
    if kind == "AGE":
        decade = int(value) // 10 * 10
        return f"{decade}-{decade + 9}"
    if kind == "POSTCODE":
        keep = 3 if value[:3].isdigit() else 2
        return original[:keep] + re.sub(r"[A-Za-z0-9]", "*", original[keep:])
    return f"[{kind}]"


# -------------------------------------------------------------------------------------------- the check


def _texts(record: dict) -> list[dict]:
    return [m for m in record["messages"] if m["role"] != "system"]  # the system prompt is configuration


def assess(records: Sequence[dict], rc, csv_path: Path | None = None) -> tuple[list[str], dict]:
    """Find the records whose QI combination is shared by fewer than `rc.k` records; with action=generalize
    their QIs are generalized and the records assigned back (`records[i] = ...`; a list or prep's disk spool). Returns, per record, "" or a one-line reason for the
    review sheet (kinds and counts only), and the report section. Writes the flagged ids and their QI kinds to
    `csv_path` (no values)."""
    qis = [[q for m in _texts(r) for q in find_quasi_identifiers(m["content"], rc.quasi_identifiers)] for r in records]
    flagged = _below_k(qis, rc.k, rc.min_kinds)
    reasons = [""] * len(records)
    by_kinds: dict[str, int] = {}
    rows = []
    for i, sharing in flagged.items():
        kinds = "+".join(sorted({q.kind for q in qis[i]}))
        by_kinds[kinds] = by_kinds.get(kinds, 0) + 1
        reasons[i] = f"re-identification risk: {kinds} combination in {sharing} record(s) < prep.reident.k={rc.k} ({rc.action})"
        src = records[i].get("source", {})
        rows.append([records[i]["id"], src.get("file", ""), src.get("location", ""), kinds, sharing, rc.action])
    report = {"k": rc.k, "min_kinds": rc.min_kinds, "action": rc.action, "quasi_identifiers": list(rc.quasi_identifiers),
              "records_with_qis": sum(1 for q in qis if q),
              "records_assessed": sum(1 for q in qis if len({x.kind for x in q}) >= rc.min_kinds),
              "records_below_k": len(flagged), "by_kinds": dict(sorted(by_kinds.items(), key=lambda kv: -kv[1])),
              "qis_by_kind": {k: sum(1 for q in qis for x in q if x.kind == k) for k in rc.quasi_identifiers}}
    if rc.action == "generalize":
        changed = 0
        for i in flagged:
            record = records[i]
            for m in _texts(record):
                found = find_quasi_identifiers(m["content"], rc.quasi_identifiers)
                for q in reversed(found):  # right to left: earlier offsets stay valid
                    m["content"] = m["content"][: q.start] + generalize(q.kind, m["content"][q.start : q.end], q.value) + m["content"][q.end :]
                changed += len(found)
            records[i] = record  # a sequence read from disk (prep's spool) keeps the change only when given it back
        after = [[q for m in _texts(r) for q in find_quasi_identifiers(m["content"], rc.quasi_identifiers)] for r in records]
        report.update(values_generalized=changed, still_below_k_after_generalizing=len(_below_k(after, rc.k, rc.min_kinds)))
    if csv_path is not None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["record_id", "file", "location", "qi_kinds", "records_sharing_combination", "action"])
        w.writerows(rows)
        atomic_write_text(csv_path, buf.getvalue())
        report["csv"] = csv_path.name
    return reasons, report


def _below_k(qis: list[list[QuasiIdentifier]], k: int, min_kinds: int) -> dict[int, int]:
    """{record index: records sharing its combination} for combinations shared by fewer than k records. A
    record shares the combination of record i when it contains every (kind, value) that record i contains."""
    holders: dict[tuple[str, str], set[int]] = {}
    for i, found in enumerate(qis):
        for q in found:
            holders.setdefault((q.kind, q.value), set()).add(i)
    out = {}
    for i, found in enumerate(qis):
        if len({q.kind for q in found}) < min_kinds:
            continue
        keys = sorted({(q.kind, q.value) for q in found}, key=lambda key: len(holders[key]))
        sharing = set(holders[keys[0]])
        for key in keys[1:]:
            sharing &= holders[key]
        if len(sharing) < k:
            out[i] = len(sharing)
    return out
