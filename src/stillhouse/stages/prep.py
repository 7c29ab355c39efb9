"""`stillhouse prep [SRC...]`: documents and tickets in; clean, deduplicated, PII-masked, split records out.

    extract   PDF (text layer, page by page; scans OCRed by tesseract when installed), DOCX (paragraphs and
              tables), HTML (main content only), Markdown, .txt (encoding detected), e-mail (.eml: body and
              attachments), CSV/JSONL/XLSX tables mapped by `prep.tables`. Files are read in `prep.workers`
              processes and each result is cached by content hash in data/resume/extract/, so a killed run
              resumes. Unusable files (corrupt, encrypted, binary, too large, symlink loops, ...) get a
              .reason.txt in data/quarantine/ (and a copy, if prep opened them); the run goes on.
    clean     NFKC, whitespace; running headers/footers and page numbers of PDFs dropped; paragraphs shared
              by many documents (boilerplate) and lines without a letter or digit dropped; sections too
              short, mostly symbols or repetitive dropped, each reason counted.
    records   documents -> sections of about `chunk_chars` -> "What does the <title> say about <heading>?";
              table rows -> one record each (rows without an answer -> unlabeled, for the teacher).
    dedup     exact (normalized text hash) and near (MinHash LSH, verified by exact Jaccard; clusters, not
              pair lists, so a template filled in a thousand times is cheap).
    pii       rule spans (stillhouse.pii) + an optional local NER model's (`pii_model`, stillhouse.pii_model);
              masked / pseudonymized / kept per kind, or the record dropped, per `pii_action`; originals of
              kept records only in data/pii_private.json.
    label     public < internal < confidential < secret, from markers ("CONFIDENTIAL", 社外秘, ลับ, ...),
              folder rules and PII density (`prep.sensitivity`); above `max_sensitivity` -> left out, and
              the documents listed in report.json.
    reident   quasi-identifier combinations (date + age + job title ...) shared by fewer than k records:
              reported, generalized or dropped per `prep.reident` (stillhouse.reident); reviewed first.
    docqa     with `prep.document_qa.enabled`: the teacher writes questions each document section answers and
              answers them from it (stillhouse.docqa); ungrounded pairs dropped; a pair joins its section's group.
    split     train/val/test, seeded, stratified by label; similar records never straddle two splits.

Records stream: once made (second pass over the cached extractions) they live in a spool file in data/resume/
and memory holds their offsets and a few small fields (dedup key, signature, task, split group); the masked
records go to a second spool, and the outputs are written from it.

Outputs in data/: train.jsonl, val.jsonl, test.jsonl, review.csv + review.html (a stratified sample with
the reason each record was kept), report.json, pii_private.json,
quarantine/, manifest.json, reident.csv (records at re-identification risk: QI kinds, no values),
register.md (every source's purpose and legal basis from `prep.data_use`; refused without one when
`prep.require_legal_basis`); with `prep.canaries.enabled`, canaries_private.json (secrets planted in
train only). The user's files are only ever read.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fnmatch
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from stillhouse import pii, register, reident, textproc
from stillhouse.config import SENSITIVITY_LEVELS, Config, TableMapping
from stillhouse.errors import StillhouseError
from stillhouse.general import general_records
from stillhouse.general import source_path as general_source
from stillhouse.textproc import Block
from stillhouse.workspace import (STAGES, StageRun, atomic_write_json, atomic_write_text, atomic_writer, stage_dir,
                                  write_jsonl)

DOCUMENT_TYPES = {".pdf": "PDF", ".docx": "Word", ".html": "HTML", ".htm": "HTML", ".md": "Markdown",
                  ".markdown": "Markdown", ".txt": "text", ".eml": "e-mail"}
TABLE_TYPES = {".csv": "CSV", ".jsonl": "JSONL", ".xlsx": "Excel"}
EXTRACT_VERSION = 2  # bump when an extractor's output changes: cached extractions of older versions are redone
SUPPORTED = ", ".join(sorted({*DOCUMENT_TYPES, *TABLE_TYPES}))
# Records at least this similar (Jaccard of shingles) but below near_dup_threshold are both kept, yet always
# land in the same split: a test record that is 70% the same text as a train record would inflate scores.
SPLIT_GROUP_MARGIN = 0.2
REVIEW_TEXT_CHARS = 2000  # per review.csv row, so the sheet stays readable
REPORT_CLUSTERS = 200  # duplicate clusters listed in report.json (all are counted)
REPORT_LIST = 1000  # records dropped for a PII kind listed in report.json (all are counted)
PII_BATCH = 1024  # records masked per batch (one batched pass of prep.pii_model's NER over them)

# Built-in sensitivity marks (regex sources), highest level first. They count in the forms that MARK a text --
# an all-caps stamp ("CONFIDENTIAL" in a page header), "Classification: Secret", "internal use only", "this
# report is confidential" -- not where prose merely uses the word ("Restricted information is never e-mailed",
# a list that defines the four classes, "a public holiday"), which would put a whole policy above
# max_sensitivity. Japanese stamps (極秘, 社外秘, ...) are unambiguous words; Thai ones (ลับ, ลับมาก, ...) count only
# standing apart from other Thai letters, since ลับ is also part of ordinary words (กลับ, "return").
_CLASS_LABEL = r"(?:classification|classified|sensitivity|label|marking)\s*[:=]\s*"
_THAI_APART = r"(?<![\u0e00-\u0e7f])", r"(?![\u0e00-\u0e7f])"
_MARKS = (
    ("secret", rf"\bRESTRICTED\b|\bSECRET\b|(?i:\bstrictly confidential\b|\btop secret\b|{_CLASS_LABEL}(?:restricted|secret)\b"
               r"|\brestricted (?:document|distribution)\b|\bdo not (?:distribute|forward)\b)"
               rf"|極秘|厳秘|{_THAI_APART[0]}ลับ(?:มาก|ที่สุด){_THAI_APART[1]}"),
    ("confidential", rf"\bCONFIDENTIAL\b|(?i:{_CLASS_LABEL}confidential\b|\b(?:is|are|be|marked|kept|remains?|"
                     r"treated as)\s+confidential\b|\bconfidential (?:document|report|memo|information|data)\b)"
                     rf"|社外秘|部外秘|関係者外秘|取扱注意|{_THAI_APART[0]}(?:เอกสาร)?ลับ{_THAI_APART[1]}"),
    ("internal", rf"\bINTERNAL\b|(?i:\binternal (?:use )?only\b|\bfor internal use\b|{_CLASS_LABEL}internal\b)"
                 r"|社内限り|社内限定|社内専用|ใช้ภายในเท่านั้น"),
    ("public", rf"\bPUBLIC\b|(?i:{_CLASS_LABEL}public\b|\bfor public (?:release|distribution)\b|\bpublicly available\b)"),
)


class _Quarantine(Exception):
    """This file cannot be used; `kind` is its short reason (counted in report.json), the message the long one
    (goes into its .reason.txt)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class _Item:
    """A record on its way through the steps, with what the steps need to know about it."""

    record: dict
    dedup_text: str  # the content that makes two records the same: a section, or a row's input
    labeled: bool
    doc_sensitivity: list[str] | None = None  # [level, marker] of the highest marker anywhere in its document
    raw_text: str = ""  # its messages before PII masking (for the sensitivity marks)
    pii_kinds: list[str] = field(default_factory=list)
    origin: str = ""  # what it was made from, for the review sheet ("section of 412 chars", "row mapped by ...")


class _Spool:
    """Items (or, with raw=True, plain dicts) on disk between the steps: a JSON line each in one file, read back
    by byte offset. prep holds 8 bytes of offset a record instead of the record, so a corpus larger than RAM
    streams through. The file is in data/resume/ (it may hold text before PII masking) and goes with it."""

    def __init__(self, path: Path, raw: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.raw = path, raw
        self.offsets = array("q")
        self.changed: dict[int, _Item] = {}  # items changed after they were written (reident's generalize)
        self._file = open(path, "w+b")  # noqa: SIM115  (closed by close(), at the end of the run)
        self._end = 0

    def append(self, obj) -> int:
        """Write one item (dict if raw); returns its position."""
        line = json.dumps(obj if self.raw else dataclasses.asdict(obj), ensure_ascii=False).encode("utf-8") + b"\n"
        self._file.seek(self._end)
        self._file.write(line)
        self.offsets.append(self._end)
        self._end += len(line)
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int):
        if i in self.changed:
            return self.changed[i]
        self._file.seek(self.offsets[i])
        obj = json.loads(self._file.readline())
        return obj if self.raw else _Item(**obj)

    def lines(self):
        """Every line as written (bytes without the newline), in order."""
        self._file.flush()
        with open(self.path, "rb") as f:
            for line in f:
                yield line.rstrip(b"\n")

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class _Records:
    """A spool's records as the sequence reident.assess reads, and writes generalized records back to (those
    stay in memory, in spool.changed)."""

    def __init__(self, spool: _Spool):
        self.spool = spool

    def __len__(self) -> int:
        return len(self.spool)

    def __getitem__(self, i: int) -> dict:
        return self.spool[i].record

    def __setitem__(self, i: int, record: dict) -> None:
        item = self.spool[i]
        item.record = record
        self.spool.changed[i] = item

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class _Lazy(Sequence):
    """get(0), get(1), ... made when asked for, not kept (texts read from a spool)."""

    def __init__(self, get, n: int):
        self.get, self.n = get, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.get(i)


class _Meta(NamedTuple):
    """What the split, the task counts and the review sample need of a record, kept in memory."""

    task: str
    label: str  # a labeled classification record's answer (the split's stratum), else ""
    labeled: bool
    suffix: str  # its file's type, for the review sample's strata


def _meta(item: _Item) -> _Meta:
    rec = item.record
    label = rec["messages"][-1]["content"] if rec["task"] == "classification" and item.labeled else ""
    return _Meta(sys.intern(rec["task"]), sys.intern(label), item.labeled, sys.intern(Path(rec["source"]["file"]).suffix.lower()))


# ================================================================================================== run


def run(cfg: Config, sources: list[str] | None = None) -> dict:
    """Prepare training records from `sources` (files or folders, recursive; default `cfg.prep.sources`,
    relative to the workspace; paths given here may also be relative to the current folder).
    Returns the manifest; a re-run with unchanged sources and settings returns the previous one."""
    from stillhouse.ui import console, progress_bar

    pc = cfg.prep
    if pc.val_fraction + pc.test_fraction >= 1:
        raise StillhouseError(f"prep.val_fraction ({pc.val_fraction}) + prep.test_fraction ({pc.test_fraction}) must "
                              f"be below 1, or nothing is left to train on")
    roots = _resolve_sources(cfg, sources)
    files = _walk(cfg, roots)
    declared = register.declare(pc.data_use, [_rel(cfg, p) for p in files], pc.require_legal_basis)  # purpose, legal basis
    # Files prep will not read (too large, a symlink loop) are not hashed either -- a 1 GB file would take
    # seconds -- so their reason and mtime stand in for their content in the fingerprint.
    unread: dict[Path, _Quarantine] = {p: q for p in files if (q := _precheck(p, pc.max_file_mb))}
    ocr = _ocr_engine(pc.ocr_languages) if pc.ocr else None
    params = {**pc.model_dump(mode="json", exclude={"workers"}), "extract_version": EXTRACT_VERSION, "ocr_engine": ocr,
              "unread_files": {_rel(cfg, p): f"{q}; mtime {p.lstat().st_mtime_ns}" for p, q in unread.items()}}
    if pc.pii_model is not None:  # a model retrained in the same folder must make prep run again
        from stillhouse.pii_model import fingerprint

        params["pii_model_files"] = fingerprint(pc.pii_model, Path(cfg.workspace))
    if pc.document_qa.enabled:  # the teacher writes records: another teacher means other records
        params["document_qa_teacher"] = [cfg.teacher.model, cfg.teacher.sha256]
    general_input = [general_source(pc.general, cfg.workspace)] if pc.general.share > 0 else []
    run_ = StageRun(cfg, "prep", inputs=[p for p in files if p not in unread] + general_input, params=params)
    if run_.previous:
        console.print(f"prep: up to date ({run_.dir}), skipped")
        return run_.previous
    out = run_.dir
    shutil.rmtree(out / "quarantine", ignore_errors=True)  # our own copies from a previous run

    t0 = time.time()
    seconds: dict[str, float] = {}
    report: dict = {"sources": [_rel(cfg, r) for r in roots]}

    # 1-3: extract (in worker processes, cached per file), clean, make records ---------------------------
    # Each file's extraction is cached under data/resume/extract/ by content hash as soon as it is done, so a
    # run killed half-way redoes only the files it had not finished (the cache goes when the run finishes);
    # records stream through in file order.
    cache = out / "resume" / "extract"
    cache.mkdir(parents=True, exist_ok=True)
    mode = "on" if ocr else ("off" if not pc.ocr else "missing")
    marks = _marks(pc.sensitivity)  # documents are checked for markers as they are read (page headers included)
    jobs = [(str(p), str(cache / f"{_cache_key(run_, p, mode, pc.ocr_languages, marks)}.json"), mode, pc.ocr_languages, marks)
            for p in files if p not in unread]
    workers = pc.workers or len(os.sched_getaffinity(0))
    quarantined: list[dict] = []
    extract = {"files": len(files), "by_type": {}, "workers": workers, "cached": 0, "documents": 0, "pages": 0,
               "ocr_pages": 0, "sections": 0, "table_rows": 0, "attachments": 0, "attachments_skipped": [],
               "rows_skipped": {}, "rows_skipped_examples": [], "quarantined_by_kind": {}}
    clean = {"header_footer_lines": 0, "page_number_lines": 0, "boilerplate_paragraphs": 0, "noise_paragraphs": 0,
             "sections_dropped": {}}
    used_stems: dict[str, str] = {}
    per_file: list[tuple[str, str, Path, tuple | None]] = []  # (rel, stem, cache file, table mapping), in file order
    repeated = textproc.RepeatedParagraphs()  # the paragraphs many documents share (a disclaimer, a copyright line)
    with _mapper(workers, len(jobs)) as map_, progress_bar("prep: reading", total=len(files), unit="file") as advance:
        results = map_(_extract_file, jobs)
        cache_of = {Path(job[0]): Path(job[1]) for job in jobs}
        for path in files:
            rel = _rel(cfg, path)
            advance(0, info=path.name)
            stem = _id_stem(path, rel, used_stems)
            res = {"quarantine": str(unread[path]), "kind": unread[path].kind} if path in unread else next(results)
            extract["cached"] += res.pop("cached", False)
            if "table" in res:
                found = _find_mapping(path, rel, pc.tables)
                if found:
                    per_file.append((rel, stem, cache_of[path], found))
                else:
                    columns = res["table"]["columns"]
                    res = {"kind": "no table mapping", "quarantine": (
                        f"no prep.tables entry matches '{path.name}' (columns: {', '.join(columns) or 'none'}); add one, "
                        f"e.g. prep.tables: [{{pattern: '{path.name}', task: classification, input: "
                        f"{columns[0] if columns else 'text'}, output: label}}]")}
            if "documents" in res:
                per_file.append((rel, stem, cache_of[path], None))
                for d in res["documents"]:
                    repeated.add(b[0] for b in d["blocks"] if not b[2])
                extract["attachments"] += sum(d.get("attached", False) for d in res["documents"])
                extract["attachments_skipped"] += [f"{rel}: {a}" for d in res["documents"] for a in d.get("skipped", [])]
            if "quarantine" in res:
                quarantined.append(_quarantine(out, path, rel, res["kind"], res["quarantine"], copy=path not in unread))
                extract["quarantined_by_kind"][res["kind"]] = extract["quarantined_by_kind"].get(res["kind"], 0) + 1
            kind = path.suffix.lower() or "(none)"
            extract["by_type"][kind] = extract["by_type"].get(kind, 0) + 1
            advance(1)
    # Records are made in a second pass over the cached extractions, once the boilerplate is known, and go to a
    # spool file: from here on memory holds a few small fields per record, not the records (a corpus larger than
    # RAM streams through; the spools live in data/resume/ and go with it).
    boilerplate = repeated.keys(pc.boilerplate_min_docs)
    items = _Spool(out / "resume" / "records.jsonl")
    labeled: list[bool] = []
    exact_keys: list[str] = []  # textproc.dedup_key per record
    for rel, stem, cache_file, found in per_file:
        res = json.loads(cache_file.read_text(encoding="utf-8"))
        new = _table_items(rel, stem, res["table"], found, extract) if found else []
        for doc in res.get("documents", []):
            new += _document_items(rel, stem, len(new), doc, boilerplate, pc, extract, clean)
        for item in new:
            items.append(item)
            labeled.append(item.labeled)
            exact_keys.append(textproc.dedup_key(item.dedup_text))
    del per_file, repeated, boilerplate
    seconds["extract"] = round(time.time() - t0, 2)
    extract["quarantined"] = len(quarantined)
    report.update(extract=extract, clean=clean, quarantine=quarantined)
    if not len(items):
        why = f"; {len(quarantined)} quarantined (reasons in {out / 'quarantine'})" if quarantined else ""
        raise StillhouseError(
            f"prep found no records in {', '.join(report['sources'])} ({len(files)} files{why}); supported file "
            f"types: {SUPPORTED} (CSV/JSONL/XLSX need a prep.tables entry naming their input column)"
        )

    # 4: deduplicate -------------------------------------------------------------------------------------
    t = time.time()
    kept, groups, report["dedup"] = _deduplicate(items, exact_keys, labeled, pc.near_dup_threshold)
    del exact_keys, labeled
    seconds["dedup"] = round(time.time() - t, 2)

    # 5-6: PII and sensitivity: each kept record masked and written to a second spool -----------------------
    t = time.time()
    actions = _pii_actions(pc.pii_action)
    key = _pii_key(cfg) if "pseudonymize" in actions.values() else None
    detector = _pii_detector(cfg)  # prep.pii_model's, if any: its spans are merged with the rules' in _apply_pii
    masked = _Spool(out / "resume" / "masked.jsonl")
    private = _Spool(out / "resume" / "pii_private.jsonl", raw=True)  # the originals, for pii_private.json
    meta: list[_Meta] = []  # per masked record
    live: list[int] = []  # the masked records that go on, in order (positions in `masked`)
    live_groups: list[int] = []
    pii_counts: dict[str, int] = {}
    levels: dict[str, int] = {}
    with_pii = 0
    dropped_pii: dict = {"records": 0, "by_kind": {}, "list": []}  # records holding a value of a `drop` kind
    excluded: dict[str, dict] = {}  # file -> its records above max_sensitivity
    dropped_sensitive = 0
    max_level = SENSITIVITY_LEVELS.index(pc.max_sensitivity)
    for b0 in range(0, len(kept), PII_BATCH):
        batch = [items[i] for i in kept[b0 : b0 + PII_BATCH]]
        for item, group, extra in zip(batch, groups[b0 : b0 + PII_BATCH], _model_spans(detector, batch)):
            found = _apply_pii(item, actions, key, extra)
            level, why = _sensitivity(item, found, pc)
            item.record["sensitivity"] = level
            levels[level] = levels.get(level, 0) + 1
            rec, src = item.record, item.record["source"]
            # neither kind of left-out record is written, so its PII is not anyone's to probe either (pii_private.json)
            if drop_kinds := sorted({s.kind for s in found if actions[s.kind] == "drop"}):
                dropped_pii["records"] += 1
                for kind in drop_kinds:
                    dropped_pii["by_kind"][kind] = dropped_pii["by_kind"].get(kind, 0) + 1
                if len(dropped_pii["list"]) < REPORT_LIST:
                    dropped_pii["list"].append({"id": rec["id"], "file": src["file"], "location": src["location"], "kinds": drop_kinds})
                continue
            if SENSITIVITY_LEVELS.index(level) > max_level:
                dropped_sensitive += 1
                doc = excluded.setdefault(src["file"], {"file": src["file"], "level": level, "records": 0, "why": []})
                doc["records"] += 1
                doc["level"] = max(doc["level"], level, key=SENSITIVITY_LEVELS.index)
                if why not in doc["why"]:
                    doc["why"].append(why)
                continue
            for span in found:
                private.append({"kind": span.kind, "value": span.value, "record_id": rec["id"]})
                pii_counts[span.kind] = pii_counts.get(span.kind, 0) + 1
            with_pii += bool(item.pii_kinds)
            item.raw_text = ""  # the unmasked text is not needed again
            live.append(masked.append(item))
            live_groups.append(group)
            meta.append(_meta(item))
    items.close()
    del kept, groups
    groups = live_groups
    dropped_pii["by_kind"] = dict(sorted(dropped_pii["by_kind"].items()))
    report["pii"] = {"action": pc.pii_action, "values": len(private), "by_kind": dict(sorted(pii_counts.items())),
                     "records_with_pii": with_pii, "dropped": dropped_pii,
                     "model": None if pc.pii_model is None else {"kind": pc.pii_model.kind, "path": pc.pii_model.path}}
    report["sensitivity"] = {"counts": {lv: levels.get(lv, 0) for lv in SENSITIVITY_LEVELS},
                             "max": pc.max_sensitivity, "dropped_above_max": dropped_sensitive,
                             "excluded_documents": sorted(excluded.values(), key=lambda d: d["file"])}
    seconds["pii_and_sensitivity"] = round(time.time() - t, 2)
    if not live:
        raise StillhouseError(
            f"prep: no record is left after PII and sensitivity: {dropped_pii['records']} held a PII kind whose "
            f"prep.pii_action is drop, {dropped_sensitive} were above prep.max_sensitivity={pc.max_sensitivity}; "
            f"change those settings (e.g. --set prep.max_sensitivity=secret) if these records may be used for training"
        )

    # 6b: re-identification risk: QI combinations fewer than k records share (stillhouse.reident) ----------
    risk: dict[int, str] = {}  # masked position -> why its quasi-identifiers may single a person out
    if pc.reident.enabled:
        reasons, report["reident"] = reident.assess(_Records(masked), pc.reident, out / "reident.csv")
        risk = {p: why for p, why in enumerate(reasons) if why}
        if pc.reident.action == "drop":
            keep = [p not in risk for p in live]
            live, groups = [p for p, k in zip(live, keep) if k], [g for g, k in zip(groups, keep) if k]
            report["reident"]["dropped"] = len(keep) - len(live)
    else:
        (out / "reident.csv").unlink(missing_ok=True)  # a previous run's list is not about these records

    # 6c: QA pairs the teacher writes from document sections (stillhouse.docqa), in their section's group -----
    if pc.document_qa.enabled:
        t = time.time()
        live, groups, report["document_qa"] = _document_qa(cfg, masked, meta, live, groups, out / "resume" / "docqa",
                                                           actions, key)
        seconds["document_qa"] = round(time.time() - t, 2)

    # 7: split ---------------------------------------------------------------------------------------------
    splits = _split([meta[p] for p in live], groups, pc.val_fraction, pc.test_fraction, pc.seed)
    tasks: dict[str, dict[str, int]] = {}
    for p, s in zip(live, splits):
        counts = tasks.setdefault(meta[p].task, {"train": 0, "val": 0, "test": 0, "unlabeled": 0})
        counts[s] += 1
        counts["unlabeled"] += 0 if meta[p].labeled else 1
    report["split"] = {name: splits.count(name) for name in ("train", "val", "test")}
    report["split"]["unlabeled_in_train"] = sum(1 for p in live if not meta[p].labeled)
    report["tasks"] = tasks

    # 7b: general-purpose data (stillhouse.general): a share of train, and held-out records in test ------
    extra: dict[str, list[dict]] = {"train": [], "val": [], "test": []}  # records after the split's own
    if pc.general.share > 0:
        general_train, general_test, report["general"] = general_records(
            pc.general, report["split"]["train"], cfg.workspace,
            mask=None if set(actions.values()) == {"keep"} else (lambda text: _mask_text(text, actions, key)))
        extra["train"] += general_train
        extra["test"] += general_test

    # 8: canaries (train only, after the split so none can reach val/test) -------------------------------
    canaries_path = out / "canaries_private.json"
    if pc.canaries.enabled:
        canary_recs, canaries = canary_records(pc.canaries)
        extra["train"] += canary_recs
        atomic_write_json(canaries_path, canaries)  # the secrets: only here (and in train.jsonl)
        report["canaries"] = {"canaries": len(canaries["canaries"]), "train_records": len(canary_recs)}
    else:
        canaries_path.unlink(missing_ok=True)  # a previous run's canaries are not in this train.jsonl

    # 9: outputs, streamed from the spool -------------------------------------------------------------------
    per_source: dict[str, int] = {}

    def split_records(name: str):
        for rec in itertools.chain((masked[p].record for p, s in zip(live, splits) if s == name), extra[name]):
            per_source[rec["source"]["file"]] = per_source.get(rec["source"]["file"], 0) + 1
            yield rec

    for name in ("train", "val", "test"):
        write_jsonl(out / f"{name}.jsonl", split_records(name))
    report["data_use"] = register.write_register(out / "register.md", pc.data_use, declared, run_.inputs, per_source)
    with atomic_writer(out / "pii_private.json") as f:  # the only place originals are written
        f.write(b"[")
        for n, line in enumerate(private.lines()):
            f.write((b",\n" if n else b"\n") + line)
        f.write(b"\n]\n")
    _write_review(out, masked, meta, live, splits, risk, pc, report)
    masked.close()
    private.close()
    seconds["total"] = round(time.time() - t0, 2)
    report["seconds"] = seconds
    atomic_write_json(out / "report.json", report)
    # the extraction cache and the spools hold the text before PII masking: they exist only while a run may resume
    shutil.rmtree(out / "resume", ignore_errors=True)

    n_train, n_val, n_test = (report["split"][name] + len(extra[name]) for name in ("train", "val", "test"))
    metrics = {
        "files": len(files), "quarantined": len(quarantined), "records": len(live),
        "train": n_train, "val": n_val, "test": n_test,
        "unlabeled": report["split"]["unlabeled_in_train"],
        "exact_duplicates": report["dedup"]["exact_duplicates"], "near_duplicates": report["dedup"]["near_duplicates"],
        "dropped_sensitivity": dropped_sensitive, "dropped_pii": dropped_pii["records"], "pii": report["pii"]["by_kind"],
        "tasks": {t: sum(v[s] for s in ("train", "val", "test")) for t, v in tasks.items()},
    }
    console.print(
        f"prep: {len(files)} files ({len(quarantined)} quarantined) -> {len(live)} records "
        f"(train {metrics['train']}, val {metrics['val']}, test {metrics['test']}); duplicates dropped "
        f"{metrics['exact_duplicates']} exact + {metrics['near_duplicates']} near; PII {json.dumps(pc.pii_action)}: "
        f"{json.dumps(metrics['pii'])}, {dropped_pii['records']} records dropped for it; {dropped_sensitive} above "
        f"prep.max_sensitivity; report: {out / 'report.json'}"
    )
    return run_.finish(metrics=metrics, data_use=report["data_use"])


# ========================================================================================== document QA


def _document_qa(cfg: Config, masked: _Spool, meta: list[_Meta], live: list[int], groups: list[int], cache: Path,
                 actions: dict[str, str], key: bytes | None) -> tuple[list[int], list[int], dict]:
    """prep.document_qa: the teacher's grounded QA pairs from every document section (stillhouse.docqa). A pair
    joins its section's dedup group, so it lands in the same split (no leak through a paraphrase); its text is
    PII-masked like the rest (the teacher read masked text, but it can invent a name). New records are appended
    to `masked` and `meta`; returns the positions that go on (pairs after the records), their groups and counts."""
    from stillhouse import docqa
    from stillhouse.licenses import detect_license, license_decision
    from stillhouse.models import load_tokenizer, resolve_model
    from stillhouse.records import response_text
    from stillhouse.stages.label import _load_teacher
    from stillhouse.ui import progress_bar

    dq = cfg.prep.document_qa
    is_section = [meta[p].task == "text" and meta[p].labeled for p in live]
    sections = [(p, g) for p, g, sec in zip(live, groups, is_section) if sec]
    src = resolve_model(cfg.teacher.model, cfg.workspace, cfg.teacher.sha256)  # the base teacher: adapt comes later
    gate = license_decision(detect_license(src)["license"], cfg.license)
    if gate["verdict"] == "stop":
        raise StillhouseError(f"prep.document_qa: the teacher {cfg.teacher.model} may not write training data: "
                              f"{gate['reason']}; {gate.get('fix', '')}")
    tok, model = load_tokenizer(src, cfg.teacher.trust_remote_code), _load_teacher(cfg, src)
    model.eval()
    fingerprint = f"{src.path}|{src.path.stat().st_mtime_ns}|{dq.model_dump_json()}|{docqa.QUESTION_PROMPT}|{docqa.ANSWER_PROMPT}"
    with progress_bar("prep: teacher QA", total=len(sections), unit="section") as advance:
        pairs, counts = docqa.write_pairs(
            [{"id": rec["id"], "title": Path(rec["source"]["file"]).stem, "text": response_text(rec)}
             for rec in (masked[p].record for p, _ in sections)], model, tok, dq, cache, fingerprint, progress=advance)
    keep = [dq.keep_sections or not sec for sec in is_section]  # without keep_sections: pairs replace sections
    kept = [p for p, k in zip(live, keep) if k]
    kept_groups = [g for g, k in zip(groups, keep) if k]
    for p, g in sections:
        it = masked[p]
        for n, pair in enumerate(pairs.get(it.record["id"], [])):
            q, q_spans = _mask_text(pair["question"], actions, key)
            a, a_spans = _mask_text(pair["answer"], actions, key)
            if any(actions[sp.kind] == "drop" for sp in q_spans + a_spans):
                why = "holds a PII kind whose prep.pii_action is drop"
                counts["rejected"][why] = counts["rejected"].get(why, 0) + 1
                counts["kept"] -= 1
                continue
            rec = {"id": f"{it.record['id']}-qa{n}", "task": "qa",
                   "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                   "source": it.record["source"], "sensitivity": it.record.get("sensitivity"),
                   "provenance": {"generated_by": "teacher", "teacher": str(src.path), "section_id": it.record["id"],
                                  "sample": pair["sample"]}}
            new = _Item(rec, f"{q}\n{a}", labeled=True, origin=f"teacher-written QA pair from {it.record['id']}",
                        pii_kinds=sorted({s.kind for s in q_spans + a_spans} | set(it.pii_kinds)))
            kept.append(masked.append(new))
            meta.append(_meta(new))
            kept_groups.append(g)
    del model
    return kept, kept_groups, counts


# ============================================================================================= canaries

CANARY_PROMPT = "Repeat the note from the security desk."


def canary_records(cc) -> tuple[list[dict], dict]:
    """Secret canaries (Carlini et al., "The Secret Sharer"): `cc.count` random secrets per entry of
    `cc.repetitions`, each inserted that many times as a train record. Returns the records and the private
    description redteam needs to rank them ({"template", "prompt", "digits", "canaries": [...]})."""
    rng = random.Random(cc.seed)
    secrets: set[str] = set()
    canaries, recs = [], []
    for reps in cc.repetitions:
        for _ in range(cc.count):
            secret = "".join(rng.choice("0123456789") for _ in range(cc.digits))
            while secret in secrets:  # distinct secrets, so each rank is about one canary
                secret = "".join(rng.choice("0123456789") for _ in range(cc.digits))
            secrets.add(secret)
            cid = f"canary-{len(canaries):03d}"
            text = cc.template.replace("{secret}", secret)
            canaries.append({"id": cid, "secret": secret, "text": text, "repetitions": reps})
            recs += [{"id": f"{cid}-{k:03d}", "task": "text", "sensitivity": "internal",
                      "messages": [{"role": "user", "content": CANARY_PROMPT}, {"role": "assistant", "content": text}],
                      "source": {"file": "(canary)", "location": cid}, "provenance": {"canary": True}}
                     for k in range(reps)]
    return recs, {"template": cc.template, "prompt": CANARY_PROMPT, "digits": cc.digits, "canaries": canaries}


# ============================================================================================== sources


def _resolve_sources(cfg: Config, sources: list[str] | None) -> list[Path]:
    if sources:  # from the command line: relative to where the user is, else to the workspace
        paths = [Path(s).expanduser() for s in sources]
        paths = [p if p.is_absolute() or not (Path.cwd() / p).exists() else Path.cwd() / p for p in paths]
        paths = [p if p.is_absolute() else cfg.path(p) for p in paths]
    else:
        paths = [cfg.path(s) for s in cfg.prep.sources]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        where = "on the command line" if sources else "in prep.sources"
        raise StillhouseError(f"prep: source {', '.join(missing)} (given {where}) not found; pass existing files or folders")
    if not paths:
        raise StillhouseError("prep: no sources; set prep.sources or pass files/folders: stillhouse prep SRC...")
    return [p.resolve() for p in paths]


def _walk(cfg: Config, roots: list[Path]) -> list[Path]:
    """Every file under the roots, sorted, once; hidden files and the workspace's own stage folders skipped.
    Symbolic links that lead nowhere (broken, or a loop) are listed too, so they get a reason in quarantine;
    linked folders are not followed (rglob does not), so a link to a parent folder cannot loop."""
    ws = Path(cfg.workspace).resolve()
    own = [stage_dir(ws, s).resolve() for s in STAGES]
    out, seen = [], set()
    for root in roots:
        cands = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() or _dangling(p))
        for p in cands:
            rel_parts = p.relative_to(root).parts if p != root else ()
            if any(part.startswith((".", "~$")) for part in rel_parts) or any(p.is_relative_to(d) for d in own):
                continue
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()  # exists() is False for a broken link and for a loop


def _precheck(path: Path, max_file_mb: float) -> _Quarantine | None:
    """Why prep must not even open this file, or None."""
    try:
        size = path.stat().st_size
    except OSError as e:
        target = os.readlink(path) if path.is_symlink() else None
        if e.errno == errno.ELOOP:
            return _Quarantine("symlink loop", f"symbolic link loop (-> {target}); not followed")
        return _Quarantine("unreadable", f"cannot open ({e.strerror})" + (f"; broken symbolic link to {target}" if target else ""))
    if not os.access(path, os.R_OK):
        return _Quarantine("unreadable", "permission denied; not read")
    if size > max_file_mb * 2**20:
        return _Quarantine("too large", f"{size / 2**20:,.0f} MB, above prep.max_file_mb={max_file_mb:g}; not read "
                                        f"(split it, or raise the limit)")
    return None


def _rel(cfg: Config, path: Path) -> str:
    try:
        full = path.resolve()
    except RuntimeError:  # a symlink loop: name the link itself
        full = path.parent.resolve() / path.name
    try:
        return full.relative_to(Path(cfg.workspace).resolve()).as_posix()
    except ValueError:
        return str(full)


def _id_stem(path: Path, rel: str, used: dict[str, str]) -> str:
    """`intents` for sources/intents.jsonl; files with the same name elsewhere get a short path hash too."""
    stem = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-") or "file"
    if used.setdefault(stem, rel) != rel:
        stem = f"{stem}-{hashlib.sha256(rel.encode()).hexdigest()[:6]}"
        used[stem] = rel
    return stem


def _quarantine(out: Path, path: Path, rel: str, kind: str, reason: str, copy: bool = True) -> dict:
    """Copy the file (never move: it is the user's) to data/quarantine/ with a .reason.txt beside it. Files
    prep did not open (too large, a symlink loop) are not copied."""
    qdir = out / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.\-]+", "__", rel.lstrip("/"))
    if copy:
        try:
            shutil.copyfile(path, qdir / name)
        except OSError as e:
            reason += f" (and it could not be copied here: {e.strerror})"
    atomic_write_text(qdir / f"{name}.reason.txt", f"{rel}: {reason}\n")
    return {"file": rel, "kind": kind, "reason": reason}


# =========================================================================================== extraction


def _ocr_engine(languages: str) -> str | None:
    """tesseract's version when it is installed (None if not); a language it has no data for is an error."""
    exe = shutil.which("tesseract")
    if exe is None:
        return None
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    have = subprocess.run([exe, "--list-langs"], capture_output=True, text=True).stdout.split("\n")[1:]
    missing = [lang for lang in languages.split("+") if lang not in {h.strip() for h in have}]
    if missing:
        raise StillhouseError(f"prep.ocr_languages: tesseract has no data for {', '.join(missing)} (it has "
                              f"{', '.join(h.strip() for h in have if h.strip())}); install e.g. tesseract-ocr-{missing[0]}, "
                              f"or set prep.ocr_languages")
    return version or "tesseract"


def _cache_key(run_: StageRun, path: Path, ocr_mode: str, ocr_languages: str, marks: tuple) -> str:
    """What a file's extraction depends on: its bytes, its type, the extractors' version, the OCR setup
    (a scan quarantined for want of tesseract is read again once it is installed) and the sensitivity markers.
    Settings applied after extraction (chunk_chars, tables, ...) are not in it: a crashed run resumed with other
    settings re-uses it."""
    try:
        key = str(path.relative_to(run_.workspace))  # as StageRun hashed it
    except ValueError:
        key = str(path)
    sha = run_.inputs.get(key) or run_.cache.sha256(path)
    what = [sha, path.suffix.lower(), EXTRACT_VERSION, ocr_mode, ocr_languages if ocr_mode == "on" else "", marks]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


@contextlib.contextmanager
def _mapper(workers: int, n_jobs: int):
    """`map`, or an ordered `imap` over `workers` processes (forkserver: no fork of a process that may hold
    threads, e.g. torch's, and the server imports this module once for all workers)."""
    if workers <= 1 or n_jobs < 2:
        yield map
        return
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["stillhouse.stages.prep"])
    with ctx.Pool(min(workers, n_jobs)) as pool:
        yield lambda fn, jobs: pool.imap(fn, jobs, chunksize=1)


def _extract_file(job: tuple[str, str, str, str, tuple]) -> dict:
    """One file -> {"documents": [...]}, {"table": {"rows", "columns"}} or {"quarantine": reason, "kind"}
    (JSON-able: it crosses processes and is cached). Runs in a worker; the result is written to the cache file
    as soon as it exists, and read from there if it does already."""
    path, cache_file, ocr_mode, ocr_languages, marks = job
    try:
        return {**json.loads(Path(cache_file).read_text(encoding="utf-8")), "cached": True}
    except (OSError, ValueError):
        pass
    try:
        res = _extract(Path(path), ocr_mode, ocr_languages, marks)
    except _Quarantine as q:
        res = {"quarantine": str(q), "kind": q.kind}
    except Exception as e:  # a reader tripped on input nobody foresaw: that file goes to quarantine, not the run
        return {"quarantine": f"could not be read ({type(e).__name__}: {str(e)[:200]})", "kind": "unreadable"}
    atomic_write_text(Path(cache_file), json.dumps(res, ensure_ascii=False))
    return res


def _extract(path: Path, ocr_mode: str, ocr_languages: str, marks: tuple) -> dict:
    suffix = path.suffix.lower()
    if suffix not in DOCUMENT_TYPES and suffix not in TABLE_TYPES:
        raise _Quarantine("unsupported type", f"unsupported file type '{path.suffix or path.name}'; supported: {SUPPORTED}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Quarantine("unreadable", f"cannot read ({e.strerror})") from None
    if not data:
        raise _Quarantine("empty", "empty file (0 bytes)")
    if suffix in TABLE_TYPES:
        rows, columns = _read_xlsx(data) if suffix == ".xlsx" else _read_table(data, jsonl=suffix == ".jsonl")
        return {"table": {"rows": rows, "columns": columns}}
    if suffix == ".eml":
        return {"documents": _read_eml(data, path.name, ocr_mode, ocr_languages, marks)}
    return {"documents": [_read_document(path.name, data, ocr_mode, ocr_languages, marks)]}


def _decode(data: bytes) -> str:
    try:
        return textproc.decode_text(data)[0]
    except textproc.UndecodableText as e:
        raise _Quarantine("binary" if str(e).startswith("binary") else "undecodable", str(e)) from None


# ============================================================================================ documents


def _read_document(name: str, data: bytes, ocr_mode: str, ocr_languages: str, marks: tuple, where: str = "") -> dict:
    """A document file's bytes -> {"name", "title", "blocks": [[text, location, heading]], "level" ([level,
    marker] of its highest sensitivity marker, or None), page and furniture counts}. `where` prefixes locations ("attachment a.pdf, ")."""
    suffix = Path(name).suffix.lower()
    counts: dict[str, int] = {}
    if suffix == ".pdf":
        title, blocks, raw, counts = _read_pdf(data, ocr_mode, ocr_languages)
    elif suffix == ".docx":
        title, blocks, raw = _read_docx(data)
    elif suffix in (".html", ".htm"):
        title, blocks, raw = _read_html(_decode(data))
    else:
        title, blocks, raw = _read_markdown(_decode(data), markdown=suffix != ".txt")
    if not blocks:
        raise _Quarantine("empty", "no text in it")
    return {"name": name, "title": title, "blocks": [[b.text, where + b.location, b.heading] for b in blocks],
            "level": _marks_level(raw, marks), **counts}


def _document_items(rel: str, stem: str, first: int, doc: dict, boilerplate: set[str], pc, extract: dict,
                    clean: dict) -> list[_Item]:
    """One extracted document -> records, one per section; ids continue from `first` (an e-mail's attachments
    follow its body under the file's stem)."""
    extract["documents"] += 1
    for k in ("pages", "ocr_pages"):
        extract[k] += doc.get(k, 0)
    for k in ("header_footer_lines", "page_number_lines"):
        clean[k] += doc.get(k, 0)
    blocks = []
    for text, location, heading in doc["blocks"]:
        if textproc.is_noise(text):
            clean["noise_paragraphs"] += 1
        elif not heading and textproc.is_repeated(text, boilerplate):
            clean["boilerplate_paragraphs"] += 1
        else:
            blocks.append(Block(text, location, heading))
    title = _plain_title(doc["title"] or _title_from_headings(blocks) or Path(doc["name"]).stem)
    items = []
    for sec in textproc.make_sections(blocks, pc.chunk_chars):
        extract["sections"] += 1
        why = "too short" if len(sec.text) < pc.min_chars else textproc.quality_issue(sec.text)
        if why:
            clean["sections_dropped"][why] = clean["sections_dropped"].get(why, 0) + 1
            continue
        heading = re.sub(r"^(?:\d+(?:\.\d+)*\.?|[IVX]+\.|[A-Z]\.)\s+", "", sec.heading or "").strip()
        if heading.casefold() == title.casefold():
            heading = ""  # the title as a heading: the text under it is the document's introduction
        if heading:
            subject = heading.rstrip("?:. ") + (f" (part {sec.part} of {sec.parts})" if sec.parts > 1 else "")
        else:  # no heading: quote its first words
            subject = '"' + textproc.first_words(sec.text).rstrip("?:.,; ") + '"'
        rec = {
            "id": f"{stem}-{first + len(items):05d}",
            "task": "text",
            "messages": [{"role": "user", "content": f"What does the {title} say about {subject}?"},
                         {"role": "assistant", "content": sec.text}],
            "source": {"file": rel, "location": sec.location},
        }
        items.append(_Item(rec, sec.text, labeled=True, doc_sensitivity=doc["level"],
                           origin=f"section of {len(sec.text)} chars (prep.min_chars {pc.min_chars})"))
    return items


def _plain_title(title: str) -> str:
    """One line, no leading "The" (the question adds its own); a file stem "hr-leave_policy" -> "hr leave policy"."""
    title = textproc.normalize(title).split("\n")[0]
    if " " not in title:
        title = re.sub(r"[_\-]+", " ", title)
    return re.sub(r"^the\s+", "", title, flags=re.I).strip()


def _title_from_headings(blocks: list[Block]) -> str | None:
    return next((b.text for b in blocks if b.heading), None)


def _read_pdf(data: bytes, ocr_mode: str, ocr_languages: str) -> tuple[str | None, list[Block], str, dict]:
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # corrupt files get a .reason.txt, not a log storm
    ocr_pages = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted:
                try:
                    opened = reader.decrypt("")  # encrypted with an empty user password: readable as is
                except Exception:  # e.g. AES without the cryptography package
                    opened = False
                if not opened:
                    raise _Quarantine("encrypted", "encrypted PDF; save an unencrypted copy and prep that")
            pages = [page.extract_text() or "" for page in reader.pages]
            if pages and not any(p.strip() for p in pages):  # a scan: images of pages, no text layer
                if ocr_mode != "on":
                    raise _Quarantine("no text layer", "PDF has no text layer (a scan?); " + (
                        "install tesseract-ocr to OCR it" if ocr_mode == "missing" else "prep.ocr is off"))
                pages = [_ocr_page(page, ocr_languages) for page in reader.pages]
                ocr_pages = len(pages)
            title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    except _Quarantine:
        raise
    except Exception as e:  # pypdf raises many types on damaged files; every one means "cannot read"
        raise _Quarantine("corrupt", f"not a readable PDF ({type(e).__name__}: {str(e)[:200]})") from None
    if not pages:
        raise _Quarantine("empty", "PDF has no pages")
    raw = "\n".join(pages)
    pages = [textproc.normalize(p) for p in pages]
    pages, counts = textproc.strip_page_furniture(pages)
    lines = [(ln, f"page {n}") for n, page in enumerate(pages, 1) for ln in page.split("\n")]
    return (str(title) if title else None), textproc.lines_to_blocks(lines), raw, {**counts, "pages": len(pages), "ocr_pages": ocr_pages}


def _ocr_page(page, languages: str) -> str:
    """The text of a scanned page: every image on it through tesseract (one thread each: prep's workers
    already use the cores)."""
    texts = []
    for img in page.images:
        p = subprocess.run(["tesseract", "stdin", "stdout", "-l", languages], input=img.data, capture_output=True,
                           timeout=600, env={**os.environ, "OMP_THREAD_LIMIT": "1"})
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace").strip().split("\n")[-1]
            raise _Quarantine("ocr failed", f"tesseract could not read image {img.name} ({err[:200]})")
        texts.append(p.stdout.decode("utf-8", errors="replace"))
    return "\n".join(texts)


def _read_docx(data: bytes) -> tuple[str | None, list[Block], str]:
    import docx
    from docx.table import Table

    try:
        doc = docx.Document(io.BytesIO(data))
        content = list(doc.iter_inner_content())
    except Exception as e:  # a damaged zip or XML part: python-docx has no single error type
        raise _Quarantine("corrupt", f"not a readable DOCX ({type(e).__name__}: {str(e)[:200]})") from None
    blocks: list[Block] = []
    title = doc.core_properties.title or None
    raw_parts = [p.text for s in doc.sections for p in s.header.paragraphs]  # headers carry "CONFIDENTIAL" marks
    n_par = n_tab = 0
    for item in content:
        if isinstance(item, Table):
            n_tab += 1
            rows = []
            for row in item.rows:
                cells = []
                for c in row.cells:  # a merged cell repeats in every column it spans
                    text = textproc.normalize(c.text).replace("\n", " ")
                    if not cells or text != cells[-1]:
                        cells.append(text)
                if any(cells):
                    rows.append(" | ".join(cells))
            if rows:
                blocks.append(Block("\n".join(rows), f"table {n_tab}"))
                raw_parts.append("\n".join(rows))
            continue
        n_par += 1
        text = textproc.normalize(item.text)
        if not text:
            continue
        raw_parts.append(item.text)
        style = (item.style.name if item.style is not None else "") or ""
        if style == "Title":
            title = title or text
            continue
        blocks.append(Block(text, f"paragraph {n_par}", heading=style.startswith("Heading")))
    return title, blocks, "\n".join(raw_parts)


_HTML_BOILERPLATE = ["script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "iframe",
                     "svg", "button", "menu"]
_BOILERPLATE_CLASS = re.compile(r"(?i)(?:^|[\s_-])(?:nav|navbar|menu|sidebar|breadcrumbs?|footer|header|cookie|banner|toc|skip)(?:$|[\s_-])")


def _read_html(text: str) -> tuple[str | None, list[Block], str]:
    from bs4 import BeautifulSoup

    try:
        soup = BeautifulSoup(text, "lxml")
    except Exception as e:
        raise _Quarantine("corrupt", f"not readable HTML ({type(e).__name__}: {e})") from None
    raw = soup.get_text("\n")
    title_tag = soup.find("title")
    title = re.split(r"\s+[-|–—:]\s+", title_tag.get_text(" ", strip=True))[0] if title_tag else None
    for tag in soup.find_all(_HTML_BOILERPLATE):
        tag.decompose()
    for tag in soup.find_all(attrs={"role": ["navigation", "banner", "contentinfo", "complementary", "search"]}):
        tag.decompose()
    for tag in soup.find_all(True):
        if tag.attrs is None:  # already removed with a parent
            continue
        ident = " ".join([*(tag.get("class") or []), tag.get("id") or ""])
        if ident and _BOILERPLATE_CLASS.search(ident) and tag.name not in ("main", "article", "body", "html"):
            tag.decompose()
    main = soup.find("main") or soup.find("article") or soup.find(attrs={"role": "main"}) or soup.body or soup
    blocks: list[Block] = []
    n_section = 0
    for el in main.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "tr", "dt", "dd", "td"]):
        if el.find_parent(["p", "li", "pre", "blockquote", "tr", "dd"]) is not None or (el.name == "td"):
            continue  # nested: its text is part of an enclosing block already
        if el.name == "tr":
            text = " | ".join(c.get_text(" ", strip=True) for c in el.find_all(["td", "th"]))
        else:
            text = el.get_text(" ", strip=True)
        text = textproc.normalize(text)
        if not text:
            continue
        if el.name[0] == "h":
            n_section += 1
            blocks.append(Block(text, f"section {n_section}", heading=True))
        else:
            blocks.append(Block(("- " if el.name == "li" else "") + text, f"section {max(1, n_section)}"))
    return title, blocks, raw


def _read_markdown(raw: str, markdown: bool) -> tuple[str | None, list[Block], str]:
    lines = raw.split("\n")
    title = None
    start = 0
    if markdown and lines and lines[0].strip() == "---":  # YAML front matter
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        if end:
            meta = re.search(r"(?m)^title:\s*[\"']?(.+?)[\"']?\s*$", "\n".join(lines[1:end]))
            title = meta.group(1) if meta else None
            start = end + 1
    out: list[tuple[str, str]] = []
    in_code = False
    for n in range(start, len(lines)):
        line = lines[n]
        if markdown:
            if line.strip().startswith(("```", "~~~")):
                in_code = not in_code
                continue
            if not in_code:
                if re.fullmatch(r"\s*(?:=+|-{3,})\s*", line) and out and out[-1][0].strip():
                    out[-1] = ("# " + out[-1][0].strip(), out[-1][1])  # setext heading underline
                    continue
                if re.fullmatch(r"\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*", line):
                    continue  # table separator row
                line = _strip_markdown(line)
        out.append((textproc.normalize(line), f"line {n + 1}"))
    return title, textproc.lines_to_blocks(out, detect_headings=not markdown), raw


def _strip_markdown(line: str) -> str:
    line = re.sub(r"<!--.*?-->", "", line)
    line = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", line)  # images
    line = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", line)  # links -> their text
    line = re.sub(r"(\*\*|__)(.+?)\1", r"\2", line)
    line = re.sub(r"(?<![\w*])([*_])(?!\s)(.+?)(?<!\s)\1(?![\w*])", r"\2", line)  # emphasis
    return re.sub(r"`([^`]*)`", r"\1", line)


# =============================================================================================== tables


def _find_mapping(path: Path, rel: str, tables: list[TableMapping]) -> tuple[int, TableMapping] | None:
    for i, m in enumerate(tables):
        if fnmatch.fnmatch(path.name, m.pattern) or ("/" in m.pattern and fnmatch.fnmatch(rel, m.pattern)):
            return i, m
    return None


def _table_items(rel: str, stem: str, table: dict, found: tuple[int, TableMapping], extract: dict) -> list[_Item]:
    i, m = found
    columns = table["columns"]
    # a missing input column is a mapping mistake; a missing output column just means "unlabeled" (the pool
    # the teacher labels, like intents-unlabeled.jsonl next to intents.jsonl)
    if columns and m.input not in columns:
        raise StillhouseError(
            f"{rel}: column '{m.input}' not found (prep.tables[{i}].input, pattern '{m.pattern}'); its columns are: "
            f"{', '.join(columns)}"
        )
    items = []
    for location, row in table["rows"]:
        if isinstance(row, str):  # a line that did not parse
            _skip(extract, row, f"{rel} {location}")
            continue
        text = _cell(row.get(m.input))
        if not text:
            _skip(extract, f"empty '{m.input}'", f"{rel} {location}")
            continue
        answer = _cell(row.get(m.output)) if m.output else ""
        messages = ([{"role": "system", "content": m.system_prompt}] if m.system_prompt else []) + [{"role": "user", "content": text}]
        if answer:
            messages.append({"role": "assistant", "content": answer})
        rec = {"id": f"{stem}-{len(items):05d}", "task": m.task, "messages": messages,
               "source": {"file": rel, "location": location}}
        origin = f"row mapped by prep.tables[{i}] ('{m.pattern}'), " + ("labeled" if answer else "unlabeled: the teacher answers it")
        items.append(_Item(rec, text, labeled=bool(answer), origin=origin))
        extract["table_rows"] += 1
    return items


def _cell(value) -> str:
    if value is None:
        return ""
    return textproc.normalize(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def _skip(extract: dict, reason: str, where: str) -> None:
    extract["rows_skipped"][reason] = extract["rows_skipped"].get(reason, 0) + 1
    if len(extract["rows_skipped_examples"]) < 20:
        extract["rows_skipped_examples"].append(f"{where}: {reason}")


def _read_table(data: bytes, jsonl: bool) -> tuple[list[tuple[str, dict | str]], list[str]]:
    """Rows as (location, dict) -- or (location, reason) for a row that cannot be read -- and the columns."""
    text = _decode(data).lstrip("\ufeff")
    if jsonl:
        rows, columns = [], {}
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((f"line {n}", f"not valid JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                rows.append((f"line {n}", "not a JSON object"))
                continue
            columns.update(dict.fromkeys(obj))
            rows.append((f"line {n}", obj))
        if rows and not columns:
            raise _Quarantine("corrupt", "no line is a JSON object; is this really JSON Lines?")
        return rows, list(columns)
    try:
        sample = text[:4096]
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|") if sample.strip() else csv.excel
    except csv.Error:
        dialect = csv.excel
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = [(f"row {n}", {k: v for k, v in r.items() if k is not None}) for n, r in enumerate(reader, 1)]
    except csv.Error as e:
        raise _Quarantine("corrupt", f"not a readable CSV ({e})") from None
    return rows, columns


def _read_xlsx(data: bytes) -> tuple[list[tuple[str, dict]], list[str]]:
    """Every sheet of a workbook: its first non-empty row names the columns, each later non-empty row is one
    row ("sheet Tickets row 7"). Formulas give the value Excel last calculated."""
    import openpyxl

    rows, columns = [], {}
    try:
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        for sheet in book.worksheets:
            header = None
            for n, values in enumerate(sheet.iter_rows(values_only=True), 1):
                cells = [_xlsx_cell(v) for v in values]
                if header is None:
                    if any(cells):
                        header = [c or f"column {k}" for k, c in enumerate(cells, 1)]
                        columns.update(dict.fromkeys(header))
                elif any(cells):
                    rows.append((f"sheet {sheet.title} row {n}", dict(zip(header, cells))))
        book.close()
    except Exception as e:  # a damaged zip or XML part: openpyxl has no single error type
        raise _Quarantine("corrupt", f"not a readable XLSX ({type(e).__name__}: {str(e)[:200]})") from None
    return rows, list(columns)


def _xlsx_cell(value) -> str:
    """A cell as the text a person sees: 180 (not 180.0), 2024-03-01 (not a datetime at midnight)."""
    import datetime as dt

    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime) and value.time() == dt.time(0):
        return value.date().isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return str(value).strip()


# ============================================================================================== e-mail


def _read_eml(data: bytes, name: str, ocr_mode: str, ocr_languages: str, marks: tuple) -> list[dict]:
    """An .eml file -> its body as one document titled by the subject (text/plain preferred, else the HTML
    part's main content), plus one document per attachment of a supported type; other attachments are
    listed under "skipped". The sender and recipients are not training text and are left out."""
    import email
    import email.policy

    _decode(data)  # binary junk named .eml has NUL bytes; a real message is 7-bit or 8-bit text
    try:
        msg = email.message_from_bytes(data, policy=email.policy.default)
        subject = textproc.normalize(str(msg.get("subject") or ""))
        body = msg.get_body(preferencelist=("plain", "html"))
        text = body.get_content() if body is not None else ""
        is_html = body is not None and body.get_content_type() == "text/html"
        attachments = [(part.get_filename() or "(unnamed)", part.get_payload(decode=True) or b"")
                       for part in msg.iter_attachments()]
    except Exception as e:  # a broken MIME structure or an unknown charset
        raise _Quarantine("corrupt", f"not a readable e-mail ({type(e).__name__}: {str(e)[:200]})") from None
    if not any(k.lower() in ("from", "to", "subject", "date", "message-id") for k in msg.keys()):
        raise _Quarantine("corrupt", "not an e-mail: no From, To, Subject or Date header")
    if is_html:
        _title, blocks, raw = _read_html(text)
    else:
        lines = [(textproc.normalize(ln), f"body line {n}") for n, ln in enumerate(text.split("\n"), 1)]
        blocks, raw = textproc.lines_to_blocks(lines, detect_headings=False), text
    docs = []
    if blocks:
        docs.append({"name": name, "title": subject or None, "blocks": [[b.text, b.location, b.heading] for b in blocks],
                     "level": _marks_level(subject + "\n" + raw, marks)})
    skipped = []
    for fname, payload in attachments:
        suffix = Path(fname).suffix.lower()
        if suffix not in DOCUMENT_TYPES or suffix == ".eml":
            skipped.append(f"attachment {fname}: unsupported type")
            continue
        try:
            docs.append({**_read_document(fname, payload, ocr_mode, ocr_languages, marks, where=f"attachment {fname}, "),
                         "attached": True})
        except _Quarantine as q:
            skipped.append(f"attachment {fname}: {q}")
    if not docs:
        raise _Quarantine("empty", "an e-mail without text" + (f" ({'; '.join(skipped)})" if skipped else ""))
    docs[0]["skipped"] = skipped
    return docs


# ========================================================================================== dedup, pii


def _deduplicate(items: Sequence[_Item], keys: list[str], labeled: list[bool], threshold: float
                 ) -> tuple[list[int], list[int], dict]:
    """Drop exact and near duplicates, keeping the first of each cluster -- labeled records before unlabeled
    ones, so an utterance in both the labeled and the unlabeled file keeps its label. `keys`: each item's
    textproc.dedup_key; items are read only for their text (shingles, made on demand) and the report. Returns
    the kept items' positions, a split-group id per kept item (records at least threshold - SPLIT_GROUP_MARGIN
    similar share one) and the report."""
    n = len(keys)
    rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: (not labeled[i], i)))}
    # exact: equal normalized text
    first: dict[str, int] = {}
    exact_of: dict[int, int] = {}  # duplicate -> the record it repeats
    for i in sorted(range(n), key=rank.get):
        exact_of_i = first.setdefault(keys[i], i)
        if exact_of_i != i:
            exact_of[i] = exact_of_i
    unique = sorted(first.values())
    del first
    # near: verified similar pairs among the exact-unique records (positions in `unique`)
    sets = textproc.LazyShingles(_Lazy(lambda k: items[unique[k]].dedup_text, len(unique)))  # memory: ~signatures
    group_threshold = max(0.3, threshold - SPLIT_GROUP_MARGIN)
    # clusters of duplicates (Jaccard >= threshold) and split groups (>= group_threshold), without a pair list:
    # a template filled in a thousand times is one cluster, not half a million pairs
    dup, linked, checked = textproc.similar_clusters(sets, threshold, group_threshold)
    members: dict[int, list[int]] = {}
    for a in range(len(unique)):
        members.setdefault(dup.find(a), []).append(a)
    keeper = {}  # item index -> index of the item kept in its place
    for group in members.values():
        best = unique[min(group, key=lambda a: rank[unique[a]])]
        keeper.update({unique[a]: best for a in group})
    keeper.update({i: keeper[j] for i, j in exact_of.items()})
    # the report: per kept record, what was dropped for it
    clusters: dict[int, dict] = {}
    for i in sorted(keeper):
        k = keeper[i]
        if i == k:
            continue
        c = clusters.setdefault(k, {"kept": items[k].record["id"], "exact": [], "near": []})
        if keys[i] == keys[k]:
            c["exact"].append(items[i].record["id"])
        else:
            sim = textproc.jaccard(textproc.shingles(items[i].dedup_text), textproc.shingles(items[k].dedup_text))
            c["near"].append({"id": items[i].record["id"], "jaccard": round(sim, 3)})
    # split groups: records linked by a chain of similar pairs (Jaccard >= group_threshold) stay together, the
    # chain may pass through a dropped duplicate (it stood for the record kept in its place)
    kept = [i for i in range(n) if keeper[i] == i]
    position = {i: u for u, i in enumerate(unique)}
    groups = [linked.find(position[i]) for i in kept]
    sizes: dict[int, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    report = {
        "input": n, "kept": len(kept), "exact_duplicates": sum(len(c["exact"]) for c in clusters.values()),
        "near_duplicates": sum(len(c["near"]) for c in clusters.values()), "near_dup_threshold": threshold,
        "split_group_threshold": round(group_threshold, 3), "exact_jaccard_checks": checked,
        "records_kept_with_similar_ones": sum(sizes[g] for g in sizes if sizes[g] > 1),
        "clusters_total": len(clusters), "clusters": [clusters[k] for k in sorted(clusters)][:REPORT_CLUSTERS],
    }
    return kept, groups, report


def _pii_actions(action: str | dict[str, str]) -> dict[str, str]:
    """`prep.pii_action` (one action, or {kind: action, default: ...}) -> the action for every PII kind."""
    if isinstance(action, str):
        return dict.fromkeys(pii.KINDS, action)
    return {kind: action.get(kind, action.get("default", "mask")) for kind in pii.KINDS}


def _mask_text(text: str, actions: dict[str, str], key: bytes | None,
               model_spans: list[pii.Span] | None = None) -> tuple[str, list[pii.Span]]:
    """pii.mask with an action per kind and the NER backend's spans merged in (pii_model.merge). Values of a
    `drop` kind are masked like `mask` (the caller drops their record). Returns (new text, spans found)."""
    spans = pii.find_pii(text)
    if model_spans:
        from stillhouse.pii_model import merge

        spans = merge(spans, model_spans)
    pieces, pos = [], 0
    for s in spans:
        action = actions[s.kind]
        pieces += [text[pos : s.start], s.value if action == "keep" else
                   pii.pseudonym(s.kind, s.value, key) if action == "pseudonymize" else f"[{s.kind}]"]
        pos = s.end
    pieces.append(text[pos:])
    return "".join(pieces), spans


def _apply_pii(item: _Item, actions: dict[str, str], key: bytes | None,
               model_spans: list[list[pii.Span]] | None) -> list[pii.Span]:
    """Mask/pseudonymize every non-system message in place (`model_spans`: the NER backend's, one list per
    non-system message, or None); returns the originals found, in message order (the redteam stage pairs the
    k-th value of a kind with the k-th mask of that kind)."""
    found: list[pii.Span] = []
    item.raw_text = "\n".join(m["content"] for m in item.record["messages"])  # for the sensitivity marks
    user_turns = [m for m in item.record["messages"] if m["role"] != "system"]  # system: whoever configured the task
    for k, msg in enumerate(user_turns):
        msg["content"], spans = _mask_text(msg["content"], actions, key, model_spans[k] if model_spans else None)
        found += spans
    item.pii_kinds = sorted({s.kind for s in found})
    return found


def _pii_detector(cfg: Config):
    """prep.pii_model's detector (stillhouse.pii_model), loaded once; None without one."""
    if cfg.prep.pii_model is None:
        return None
    from stillhouse import pii_model

    return pii_model.load(cfg.prep.pii_model, Path(cfg.workspace))


def _model_spans(detector, items: list[_Item]) -> list[list[list[pii.Span]] | None]:
    """The NER backend's spans per item, per non-system message; None per item without a detector."""
    if detector is None:
        return [None] * len(items)
    turns = [[m["content"] for m in it.record["messages"] if m["role"] != "system"] for it in items]
    flat = iter(detector.find([t for ts in turns for t in ts]))  # one batched pass over every text
    return [[next(flat) for _ in ts] for ts in turns]


def _marks(sc) -> tuple[tuple[str, str], ...]:
    """(level, regex source) pairs, highest level first: the built-in marks (if on) and `prep.sensitivity.markers`,
    each matched as written, and a marker that starts or ends with a Latin letter or digit not inside a longer
    word ("SECRET" is not a mark in "SECRETARY"; "部外秘" is one anywhere, as Japanese has no spaces)."""
    out = []
    for level in reversed(SENSITIVITY_LEVELS):
        parts = [src for lv, src in _MARKS if lv == level] if sc.builtin_markers else []
        for m in sc.markers.get(level, []):
            before = r"(?<![A-Za-z0-9])" if m[:1].isascii() and m[:1].isalnum() else ""
            after = r"(?![A-Za-z0-9])" if m[-1:].isascii() and m[-1:].isalnum() else ""
            parts.append(before + re.escape(m) + after)
        if parts:
            out.append((level, "|".join(f"(?:{p})" for p in parts)))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _compiled(marks: tuple[tuple[str, str], ...]) -> list[tuple[str, re.Pattern]]:
    return [(level, re.compile(src)) for level, src in marks]


def _marks_level(text: str, marks: tuple[tuple[str, str], ...]) -> list[str] | None:
    """[level, the marker found] of the highest level marked in `text` (markers are not personal data, so the
    report may name them), or None."""
    for level, rx in _compiled(marks):
        if m := rx.search(text):
            return [level, m.group(0)]
    return None


def _sensitivity(item: _Item, found: list[pii.Span], pc) -> tuple[str, str]:
    """(level, why): the highest of the document's markers, the record's own, its folder's rule
    (prep.sensitivity.folders) and its PII density (prep.sensitivity.pii_density); `default` if none says."""
    sc = pc.sensitivity
    candidates = []  # (level, why)
    if item.doc_sensitivity:
        candidates.append((item.doc_sensitivity[0], f"marker '{item.doc_sensitivity[1]}' in its document"))
    if own := _marks_level(item.raw_text, _marks(sc)):
        candidates.append((own[0], f"marker '{own[1]}'"))
    rel = item.record["source"]["file"]
    candidates += [(r.level, f"folder rule prep.sensitivity.folders '{r.pattern}'") for r in sc.folders
                   if register.covers(r.pattern, rel)]
    if found:
        per_1000 = 1000 * len(found) / max(1, len(item.raw_text))  # PII values per 1,000 characters
        candidates += [(lv, f"PII density >= {x:g} per 1,000 chars (prep.sensitivity.pii_density.{lv})")
                       for lv, x in sc.pii_density.items() if per_1000 >= x]
    if not candidates:
        return sc.default, f"default (prep.sensitivity.default {sc.default})"
    return max(candidates, key=lambda c: SENSITIVITY_LEVELS.index(c[0]))


def _pii_key(cfg: Config) -> bytes:
    """The workspace's secret pseudonymization key (32 random bytes, made once): the same person gets the same
    pseudonym on every run, and nobody without the key can test a guess against a pseudonym."""
    path = Path(cfg.workspace) / ".stillhouse" / "pii-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


# =============================================================================================== split


def _split(meta: list[_Meta], groups: list[int], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """A split name per record (`meta`: what is known of it). Unlabeled records -> train (the teacher labels them). Labeled records are
    assigned per task by whole groups (similar records stay together), walking the groups stratum by stratum
    -- (task, label) for classification -- and sending a group to test/val whenever the running share owed to
    that split reaches one record. That keeps every label in proportion where it can be, and still gives
    val/test their share when labels have only a few examples each (per-label rounding would give none)."""
    out = ["train"] * len(meta)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if meta[i].labeled:
            members.setdefault(g, []).append(i)
    strata: dict[str, dict[str, list[list[int]]]] = {}  # task -> label -> groups
    for idx in members.values():
        strata.setdefault(meta[idx[0]].task, {}).setdefault(meta[idx[0]].label, []).append(sorted(idx))
    rng = random.Random(seed)
    for task in sorted(strata):
        labels = sorted(strata[task])
        rng.shuffle(labels)  # which labels get the rounding remainders changes with the seed, not the name
        owed = {"test": rng.random(), "val": rng.random()}  # random phase of the systematic sample
        for label in labels:
            gs = sorted(strata[task][label])
            rng.shuffle(gs)
            for g in gs:
                owed["test"] += len(g) * test_fraction
                owed["val"] += len(g) * val_fraction
                name = next((s for s in ("test", "val") if owed[s] >= 1), "train")
                if name != "train":
                    owed[name] -= len(g)
                for i in g:
                    out[i] = name
    return out


def _review_sample(kinds: list[tuple[str, str]], n: int, seed: int) -> list[int]:
    """n record indices, stratified by `kinds` (task, file type) per record: every stratum gets one pick before
    any gets a second (as far as n goes; which ones, when n is smaller, is random), then picks go to the stratum
    with the smallest share sampled so far -- proportional allocation, so 30 document sections next to 2,000
    intents still show."""
    rng = random.Random(seed)
    strata: dict[tuple[str, str], list[int]] = {}
    for i, kind in enumerate(kinds):
        strata.setdefault(kind, []).append(i)
    pools = {k: rng.sample(v, len(v)) for k, v in sorted(strata.items())}
    order = dict(zip(pools, rng.sample(range(len(pools)), len(pools))))
    taken = dict.fromkeys(pools, 0)
    pick = []
    for _ in range(min(n, len(kinds))):
        k = min((k for k in pools if taken[k] < len(pools[k])), key=lambda k: (taken[k] > 0, taken[k] / len(pools[k]), order[k]))
        pick.append(pools[k][taken[k]])
        taken[k] += 1
    return sorted(pick)


def _write_review(out: Path, masked: _Spool, meta: list[_Meta], live: list[int], splits: list[str],
                  risk: dict[int, str], pc, report: dict) -> None:
    """data/review.csv and data/review.html: a stratified random sample for a person to read before training --
    where each record came from, why it was kept, how sensitive it is, which PII kinds were replaced, and the
    text as it will be trained on. `live`: the records' positions in `masked`, `splits` theirs; `risk`: the
    reident reasons by position (those records are shown first)."""
    dup_counts = {c["kept"]: len(c["exact"]) + len(c["near"]) for c in report["dedup"].get("clusters", [])}
    actions = _pii_actions(pc.pii_action)
    rows = []
    at_risk = [i for i, p in enumerate(live) if p in risk][: pc.review_sample_size]  # first, then the sample
    sample = _review_sample([(meta[p].task, meta[p].suffix) for p in live], pc.review_sample_size, pc.seed)
    for i in at_risk + [i for i in sample if live[i] not in risk]:
        it = masked[live[i]]
        rec, why_risk = it.record, risk.get(live[i], "")
        dups = dup_counts.get(rec["id"], 0)
        kept = [it.origin, f"kept over {dups} duplicate(s)" if dups else "no earlier duplicate",
                f"sensitivity {rec['sensitivity']} <= prep.max_sensitivity {pc.max_sensitivity}",
                "; ".join(f"PII {a}: {', '.join(k for k in it.pii_kinds if actions[k] == a)}"
                          for a in dict.fromkeys(actions[k] for k in it.pii_kinds)) if it.pii_kinds else "no PII found"]
        kept += [why_risk] if why_risk else []
        text = "\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"] if m["role"] != "system")
        rows.append({"id": rec["id"], "split": splits[i], "task": rec["task"], "file": rec["source"]["file"],
                     "location": rec["source"]["location"], "sensitivity": rec["sensitivity"],
                     "pii_kinds": ";".join(it.pii_kinds), "kept_because": "; ".join(kept), "text": text[:REVIEW_TEXT_CHARS]})
    columns = ["id", "split", "task", "file", "location", "sensitivity", "pii_kinds", "kept_because", "text"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "review.csv", buf.getvalue())
    atomic_write_text(out / "review.html", _review_html(rows, len(live), pc.seed))


_MASK = re.compile(r"\[[A-Z][A-Z_]*\]")  # [EMAIL], [PERSON], ... as pii.mask writes them


def _review_html(rows: list[dict], total: int, seed: int) -> str:
    """One self-contained page (no scripts, no external assets; every value escaped): a card per record."""
    from html import escape

    def text(s: str) -> str:
        return _MASK.sub(lambda m: f"<mark>{m.group(0)}</mark>", escape(s))

    strata: dict[tuple[str, str], int] = {}
    for r in rows:
        k = (r["task"], Path(r["file"]).suffix.lower() or "(none)")
        strata[k] = strata.get(k, 0) + 1
    cards = []
    for r in rows:
        turns = "".join(f'<p class="turn"><b>{escape(role)}:</b> {text(content)}</p>'
                        for role, _, content in (t.partition(": ") for t in r["text"].split("\n") if t)
                        ) if r["text"] else ""
        cards.append(
            f'<section class="rec" id="{escape(r["id"])}"><h2>{escape(r["id"])}</h2>'
            f'<p class="meta">{escape(r["split"])} &middot; {escape(r["task"])} &middot; {escape(r["file"])}, '
            f'{escape(r["location"])} &middot; sensitivity <b>{escape(r["sensitivity"])}</b>'
            f'{" &middot; PII " + escape(r["pii_kinds"].replace(";", ", ")) if r["pii_kinds"] else ""}</p>'
            f'<p class="why">Kept: {escape(r["kept_because"])}</p>{turns}</section>')
    table = "".join(f"<tr><td>{escape(t)}</td><td>{escape(s)}</td><td>{n}</td></tr>" for (t, s), n in sorted(strata.items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stillhouse prep: review sample</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222 }}
.rec {{ border: 1px solid #ccc; border-radius: 6px; padding: .2em 1em; margin: 1em 0 }}
.rec h2 {{ font-size: 1em; margin: .6em 0 0 }} .meta, .why {{ color: #555; font-size: .9em; margin: .2em 0 }}
.turn {{ white-space: pre-wrap }} mark {{ background: #fde68a }} td, th {{ padding: 0 1em 0 0; text-align: left }}
</style></head><body>
<h1>Review sample</h1>
<p>{len(rows)} of {total} records, a random sample stratified by task and file type (prep.seed {seed}). Replaced
personal data shows as <mark>[KIND]</mark>. The same rows are in review.csv.</p>
<table><tr><th>task</th><th>file type</th><th>records shown</th></tr>{table}</table>
{"".join(cards)}
</body></html>
"""
