"""`stillhouse prep [SRC...]`: documents and tickets in; clean, deduplicated, PII-masked, split records out.

    extract   PDF (text layer, page by page), DOCX (paragraphs and tables), HTML (main content only),
              Markdown, .txt (encoding detected), CSV/JSONL tables mapped by `prep.tables`.
              Unreadable files are copied to data/quarantine/ with a .reason.txt; the run goes on.
    clean     NFKC, whitespace; running headers/footers and page numbers of PDFs dropped.
    records   documents -> sections of about `chunk_chars` -> "What does the <title> say about <heading>?";
              table rows -> one record each (rows without an answer -> unlabeled, for the teacher).
    dedup     exact (normalized text hash) and near (MinHash LSH, every pair verified by exact Jaccard).
    pii       masked / pseudonymized / kept per `pii_action`; originals only in data/pii_private.json.
    label     sensitivity from marks ("confidential", "internal only", ...) and PII; above max -> dropped.
    split     train/val/test, seeded, stratified by label; similar records never straddle two splits.

Outputs in data/: train.jsonl, val.jsonl, test.jsonl, review.csv, report.json, pii_private.json,
quarantine/, manifest.json; with `prep.canaries.enabled`, canaries_private.json (secrets planted in
train only). The user's files are only ever read.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from stillhouse import pii, textproc
from stillhouse.config import Config, TableMapping
from stillhouse.errors import StillhouseError
from stillhouse.records import SENSITIVITY_LEVELS
from stillhouse.textproc import Block
from stillhouse.workspace import STAGES, StageRun, atomic_write_json, atomic_write_text, stage_dir, write_jsonl

DOCUMENT_TYPES = {".pdf": "PDF", ".docx": "Word", ".html": "HTML", ".htm": "HTML", ".md": "Markdown",
                  ".markdown": "Markdown", ".txt": "text"}
TABLE_TYPES = {".csv": "CSV", ".jsonl": "JSONL"}
SUPPORTED = ", ".join(sorted({*DOCUMENT_TYPES, *TABLE_TYPES}))
# Records at least this similar (Jaccard of shingles) but below near_dup_threshold are both kept, yet always
# land in the same split: a test record that is 70% the same text as a train record would inflate scores.
SPLIT_GROUP_MARGIN = 0.2
REVIEW_TEXT_CHARS = 2000  # per review.csv row, so the sheet stays readable
REPORT_CLUSTERS = 200  # duplicate clusters listed in report.json (all are counted)

# Sensitivity marks, highest level first. They count in the forms that MARK a text -- an all-caps stamp
# ("CONFIDENTIAL" in a page header), "Classification: Restricted", "internal use only", "this report is
# confidential" -- not where prose merely uses the word ("Restricted information is never e-mailed", a list
# that defines the four classes, "a public holiday"), which would put a whole policy above max_sensitivity.
_CLASS_LABEL = r"(?:classification|classified|sensitivity|label|marking)\s*[:=]\s*"
_MARKS = [
    ("restricted", re.compile(rf"\bRESTRICTED\b|\bTOP SECRET\b|(?i:\bstrictly confidential\b|\btop secret\b|{_CLASS_LABEL}restricted\b"
                              r"|\brestricted (?:document|distribution)\b|\bdo not (?:distribute|forward)\b)")),
    ("confidential", re.compile(rf"\bCONFIDENTIAL\b|(?i:{_CLASS_LABEL}confidential\b|\b(?:is|are|be|marked|kept|remains?|"
                                r"treated as)\s+confidential\b|\bconfidential (?:document|report|memo|information|data)\b)")),
    ("internal", re.compile(rf"\bINTERNAL\b|(?i:\binternal (?:use )?only\b|\bfor internal use\b|{_CLASS_LABEL}internal\b)")),
    ("public", re.compile(rf"\bPUBLIC\b|(?i:{_CLASS_LABEL}public\b|\bfor public (?:release|distribution)\b|\bpublicly available\b)")),
]
DEFAULT_SENSITIVITY = "internal"  # an organization's unmarked text is internal until someone says otherwise


class _Quarantine(Exception):
    """This file cannot be used; the message says why (goes into its .reason.txt)."""


@dataclass
class _Item:
    """A record on its way through the steps, with what the steps need to know about it."""

    record: dict
    dedup_text: str  # the content that makes two records the same: a section, or a row's input
    labeled: bool
    doc_sensitivity: str | None = None  # marks found anywhere in its document (headers included)
    raw_text: str = ""  # its messages before PII masking (for the sensitivity marks)
    pii_kinds: list[str] = field(default_factory=list)


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
    run_ = StageRun(cfg, "prep", inputs=roots, params=pc.model_dump(mode="json"))
    if run_.previous:
        console.print(f"prep: up to date ({run_.dir}), skipped")
        return run_.previous
    out = run_.dir
    shutil.rmtree(out / "quarantine", ignore_errors=True)  # our own copies from a previous run

    t0 = time.time()
    seconds: dict[str, float] = {}
    report: dict = {"sources": [_rel(cfg, r) for r in roots]}
    files = _walk(cfg, roots)

    # 1-3: extract, clean, make records ----------------------------------------------------------------
    items: list[_Item] = []
    quarantined: list[dict] = []
    extract = {"files": len(files), "by_type": {}, "documents": 0, "pages": 0, "sections": 0, "table_rows": 0,
               "rows_skipped": {}, "rows_skipped_examples": []}
    clean = {"header_footer_lines": 0, "page_number_lines": 0, "sections_too_short": 0}
    used_stems: dict[str, str] = {}
    with progress_bar("prep: reading", total=len(files), unit="file") as advance:
        for path in files:
            rel = _rel(cfg, path)
            advance(0, info=path.name)
            stem = _id_stem(path, rel, used_stems)
            try:
                if path.suffix.lower() in TABLE_TYPES:
                    new = _table_items(path, rel, stem, pc.tables, extract)
                elif path.suffix.lower() in DOCUMENT_TYPES:
                    new = _document_items(path, rel, stem, pc.chunk_chars, pc.min_chars, extract, clean)
                else:
                    raise _Quarantine(f"unsupported file type '{path.suffix or path.name}'; supported: {SUPPORTED}")
            except _Quarantine as why:
                quarantined.append(_quarantine(out, path, rel, str(why)))
                new = []
            kind = path.suffix.lower() or "(none)"
            extract["by_type"][kind] = extract["by_type"].get(kind, 0) + 1
            items += new
            advance(1)
    seconds["extract"] = round(time.time() - t0, 2)
    extract["quarantined"] = len(quarantined)
    report.update(extract=extract, clean=clean, quarantine=quarantined)
    if not items:
        why = f"; {len(quarantined)} quarantined (reasons in {out / 'quarantine'})" if quarantined else ""
        raise StillhouseError(
            f"prep found no records in {', '.join(report['sources'])} ({len(files)} files{why}); supported file "
            f"types: {SUPPORTED} (CSV/JSONL need a prep.tables entry naming their input column)"
        )

    # 4: deduplicate -------------------------------------------------------------------------------------
    t = time.time()
    items, groups, report["dedup"] = _deduplicate(items, pc.near_dup_threshold)
    seconds["dedup"] = round(time.time() - t, 2)

    # 5-6: PII and sensitivity ---------------------------------------------------------------------------
    t = time.time()
    key = _pii_key(cfg) if pc.pii_action == "pseudonymize" else None
    private: list[dict] = []
    pii_counts: dict[str, int] = {}
    levels: dict[str, int] = {}
    kept_items, kept_groups, dropped_sensitive = [], [], 0
    max_level = SENSITIVITY_LEVELS.index(pc.max_sensitivity)
    for item, group in zip(items, groups):
        found = _apply_pii(item, pc.pii_action, key)
        level = _sensitivity(item, found)
        item.record["sensitivity"] = level
        levels[level] = levels.get(level, 0) + 1
        if SENSITIVITY_LEVELS.index(level) > max_level:
            dropped_sensitive += 1
            continue  # never written, so its PII is not anyone's to probe either
        for span in found:
            private.append({"kind": span.kind, "value": span.value, "record_id": item.record["id"]})
            pii_counts[span.kind] = pii_counts.get(span.kind, 0) + 1
        kept_items.append(item)
        kept_groups.append(group)
    items, groups = kept_items, kept_groups
    report["pii"] = {"action": pc.pii_action, "values": len(private), "by_kind": dict(sorted(pii_counts.items())),
                     "records_with_pii": sum(1 for it in items if it.pii_kinds)}
    report["sensitivity"] = {"counts": {lv: levels.get(lv, 0) for lv in SENSITIVITY_LEVELS},
                             "max": pc.max_sensitivity, "dropped_above_max": dropped_sensitive}
    seconds["pii_and_sensitivity"] = round(time.time() - t, 2)
    if not items:
        raise StillhouseError(
            f"prep: every record is above prep.max_sensitivity={pc.max_sensitivity} ({dropped_sensitive} dropped); "
            f"raise it (e.g. --set prep.max_sensitivity=restricted) if these may be used for training"
        )

    # 7: split ---------------------------------------------------------------------------------------------
    splits = _split(items, groups, pc.val_fraction, pc.test_fraction, pc.seed)
    by_split = {name: [items[i].record for i in range(len(items)) if splits[i] == name] for name in ("train", "val", "test")}
    tasks: dict[str, dict[str, int]] = {}
    for item, s in zip(items, splits):
        task = tasks.setdefault(item.record["task"], {"train": 0, "val": 0, "test": 0, "unlabeled": 0})
        task[s] += 1
        task["unlabeled"] += 0 if item.labeled else 1
    report["split"] = {name: len(recs) for name, recs in by_split.items()}
    report["split"]["unlabeled_in_train"] = sum(1 for it in items if not it.labeled)
    report["tasks"] = tasks

    # 8: canaries (train only, after the split so none can reach val/test) -------------------------------
    canaries_path = out / "canaries_private.json"
    if pc.canaries.enabled:
        canary_recs, canaries = canary_records(pc.canaries)
        by_split["train"] += canary_recs
        atomic_write_json(canaries_path, canaries)  # the secrets: only here (and in train.jsonl)
        report["canaries"] = {"canaries": len(canaries["canaries"]), "train_records": len(canary_recs)}
    else:
        canaries_path.unlink(missing_ok=True)  # a previous run's canaries are not in this train.jsonl

    # 9: outputs -------------------------------------------------------------------------------------------
    for name, recs in by_split.items():
        write_jsonl(out / f"{name}.jsonl", recs)
    atomic_write_json(out / "pii_private.json", private)  # the only place originals are written
    _write_review(out / "review.csv", items, splits, pc.review_sample_size, pc.seed)
    seconds["total"] = round(time.time() - t0, 2)
    report["seconds"] = seconds
    atomic_write_json(out / "report.json", report)

    metrics = {
        "files": len(files), "quarantined": len(quarantined), "records": len(items),
        "train": len(by_split["train"]), "val": len(by_split["val"]), "test": len(by_split["test"]),
        "unlabeled": report["split"]["unlabeled_in_train"],
        "exact_duplicates": report["dedup"]["exact_duplicates"], "near_duplicates": report["dedup"]["near_duplicates"],
        "dropped_sensitivity": dropped_sensitive, "pii": report["pii"]["by_kind"],
        "tasks": {t: sum(v[s] for s in ("train", "val", "test")) for t, v in tasks.items()},
    }
    console.print(
        f"prep: {len(files)} files ({len(quarantined)} quarantined) -> {len(items)} records "
        f"(train {metrics['train']}, val {metrics['val']}, test {metrics['test']}); duplicates dropped "
        f"{metrics['exact_duplicates']} exact + {metrics['near_duplicates']} near; PII {pc.pii_action}: "
        f"{json.dumps(metrics['pii'])}; report: {out / 'report.json'}"
    )
    return run_.finish(metrics=metrics)


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
    """Every file under the roots, sorted, once; hidden files and the workspace's own stage folders skipped."""
    ws = Path(cfg.workspace).resolve()
    own = [stage_dir(ws, s).resolve() for s in STAGES]
    out, seen = [], set()
    for root in roots:
        cands = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in cands:
            rel_parts = p.relative_to(root).parts if p != root else ()
            if any(part.startswith((".", "~$")) for part in rel_parts) or any(p.is_relative_to(d) for d in own):
                continue
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def _rel(cfg: Config, path: Path) -> str:
    try:
        return path.resolve().relative_to(Path(cfg.workspace).resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _id_stem(path: Path, rel: str, used: dict[str, str]) -> str:
    """`intents` for sources/intents.jsonl; files with the same name elsewhere get a short path hash too."""
    stem = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-") or "file"
    if used.setdefault(stem, rel) != rel:
        stem = f"{stem}-{hashlib.sha256(rel.encode()).hexdigest()[:6]}"
        used[stem] = rel
    return stem


def _quarantine(out: Path, path: Path, rel: str, reason: str) -> dict:
    """Copy the file (never move: it is the user's) to data/quarantine/ with a .reason.txt beside it."""
    qdir = out / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.\-]+", "__", rel.lstrip("/"))
    try:
        shutil.copyfile(path, qdir / name)
    except OSError as e:
        reason += f" (and it could not be copied here: {e.strerror})"
    atomic_write_text(qdir / f"{name}.reason.txt", f"{rel}: {reason}\n")
    return {"file": rel, "reason": reason}


# ============================================================================================ documents


def _document_items(path: Path, rel: str, stem: str, chunk_chars: int, min_chars: int, extract: dict, clean: dict) -> list[_Item]:
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        title, blocks, raw = _read_pdf(path, extract, clean)
    elif suffix == ".docx":
        title, blocks, raw = _read_docx(path)
    elif suffix in (".html", ".htm"):
        title, blocks, raw = _read_html(path)
    else:
        title, blocks, raw = _read_markdown(path, markdown=suffix != ".txt")
    extract["documents"] += 1
    title = _plain_title(title or _title_from_headings(blocks) or path.stem)
    doc_level = _marks_level(raw)
    items = []
    for sec in textproc.make_sections(blocks, chunk_chars):
        extract["sections"] += 1
        if len(sec.text) < min_chars:
            clean["sections_too_short"] += 1
            continue
        heading = re.sub(r"^(?:\d+(?:\.\d+)*\.?|[IVX]+\.|[A-Z]\.)\s+", "", sec.heading or "").strip()
        if heading.casefold() == title.casefold():
            heading = ""  # the title as a heading: the text under it is the document's introduction
        if heading:
            subject = heading.rstrip("?:. ") + (f" (part {sec.part} of {sec.parts})" if sec.parts > 1 else "")
        else:  # no heading: quote its first words
            subject = '"' + textproc.first_words(sec.text).rstrip("?:.,; ") + '"'
        rec = {
            "id": f"{stem}-{len(items):05d}",
            "task": "text",
            "messages": [{"role": "user", "content": f"What does the {title} say about {subject}?"},
                         {"role": "assistant", "content": sec.text}],
            "source": {"file": rel, "location": sec.location},
        }
        items.append(_Item(rec, sec.text, labeled=True, doc_sensitivity=doc_level))
    return items


def _plain_title(title: str) -> str:
    """One line, no leading "The" (the question adds its own); a file stem "hr-leave_policy" -> "hr leave policy"."""
    title = textproc.normalize(title).split("\n")[0]
    if " " not in title:
        title = re.sub(r"[_\-]+", " ", title)
    return re.sub(r"^the\s+", "", title, flags=re.I).strip()


def _title_from_headings(blocks: list[Block]) -> str | None:
    return next((b.text for b in blocks if b.heading), None)


def _read_pdf(path: Path, extract: dict, clean: dict) -> tuple[str | None, list[Block], str]:
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # corrupt files get a .reason.txt, not a log storm
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PdfReader(path)
            if reader.is_encrypted and not reader.decrypt(""):
                raise _Quarantine("encrypted PDF; save an unencrypted copy and prep that")
            pages = [page.extract_text() or "" for page in reader.pages]
            title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    except _Quarantine:
        raise
    except Exception as e:  # pypdf raises many types on damaged files; every one means "cannot read"
        raise _Quarantine(f"not a readable PDF ({type(e).__name__}: {str(e)[:200]})") from None
    if not pages:
        raise _Quarantine("PDF has no pages")
    if not any(p.strip() for p in pages):
        raise _Quarantine("PDF has no text layer (a scan?); run OCR on it (e.g. ocrmypdf) and prep the result")
    raw = "\n".join(pages)
    pages = [textproc.normalize(p) for p in pages]
    pages, counts = textproc.strip_page_furniture(pages)
    for k, v in counts.items():
        clean[k] += v
    extract["pages"] += len(pages)
    lines = [(ln, f"page {n}") for n, page in enumerate(pages, 1) for ln in page.split("\n")]
    return (str(title) if title else None), textproc.lines_to_blocks(lines), raw


def _read_docx(path: Path) -> tuple[str | None, list[Block], str]:
    import docx
    from docx.table import Table

    try:
        doc = docx.Document(str(path))
        content = list(doc.iter_inner_content())
    except Exception as e:  # a damaged zip or XML part: python-docx has no single error type
        raise _Quarantine(f"not a readable DOCX ({type(e).__name__}: {str(e)[:200]})") from None
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


def _read_html(path: Path) -> tuple[str | None, list[Block], str]:
    from bs4 import BeautifulSoup

    data = path.read_bytes()
    try:
        soup = BeautifulSoup(data, "lxml")  # lxml reads the <meta charset> itself
    except Exception as e:
        raise _Quarantine(f"not readable HTML ({type(e).__name__}: {e})") from None
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


def _read_markdown(path: Path, markdown: bool) -> tuple[str | None, list[Block], str]:
    raw, _encoding = textproc.decode_text(path.read_bytes())
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


def _table_items(path: Path, rel: str, stem: str, tables: list[TableMapping], extract: dict) -> list[_Item]:
    rows, columns = _read_table(path)
    found = _find_mapping(path, rel, tables)
    if found is None:
        raise _Quarantine(
            f"no prep.tables entry matches '{path.name}' (columns: {', '.join(columns) or 'none'}); add one, e.g. "
            f"prep.tables: [{{pattern: '{path.name}', task: classification, input: {columns[0] if columns else 'text'}, output: label}}]"
        )
    i, m = found
    # a missing input column is a mapping mistake; a missing output column just means "unlabeled" (the pool
    # the teacher labels, like intents-unlabeled.jsonl next to intents.jsonl)
    if columns and m.input not in columns:
        raise StillhouseError(
            f"{rel}: column '{m.input}' not found (prep.tables[{i}].input, pattern '{m.pattern}'); its columns are: "
            f"{', '.join(columns)}"
        )
    items = []
    for location, row in rows:
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
        items.append(_Item(rec, text, labeled=bool(answer)))
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


def _read_table(path: Path) -> tuple[list[tuple[str, dict | str]], list[str]]:
    """Rows as (location, dict) -- or (location, reason) for a row that cannot be read -- and the columns."""
    try:
        text, _encoding = textproc.decode_text(path.read_bytes())
    except OSError as e:
        raise _Quarantine(f"cannot read ({e.strerror})") from None
    text = text.lstrip("\ufeff")
    if path.suffix.lower() == ".jsonl":
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
            raise _Quarantine("no line is a JSON object; is this really JSON Lines?")
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
        raise _Quarantine(f"not a readable CSV ({e})") from None
    return rows, columns


# ========================================================================================== dedup, pii


def _deduplicate(items: list[_Item], threshold: float) -> tuple[list[_Item], list[int], dict]:
    """Drop exact and near duplicates, keeping the first of each cluster -- labeled records before unlabeled
    ones, so an utterance in both the labeled and the unlabeled file keeps its label. Returns the kept items,
    a split-group id per kept item (records at least threshold - SPLIT_GROUP_MARGIN similar share one) and
    the report."""
    n = len(items)
    rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: (not items[i].labeled, i)))}
    # exact: equal normalized text
    first: dict[str, int] = {}
    exact_of: dict[int, int] = {}  # duplicate -> the record it repeats
    for i in sorted(range(n), key=rank.get):
        exact_of_i = first.setdefault(textproc.dedup_key(items[i].dedup_text), i)
        if exact_of_i != i:
            exact_of[i] = exact_of_i
    unique = sorted(first.values())
    # near: verified similar pairs among the exact-unique records (positions in `unique`)
    sets = [textproc.shingles(items[i].dedup_text) for i in unique]
    group_threshold = max(0.3, threshold - SPLIT_GROUP_MARGIN)
    pairs = textproc.similar_pairs(sets, group_threshold)
    dup = textproc.UnionFind(len(unique))
    for a, b, sim in pairs:
        if sim >= threshold:
            dup.union(a, b)
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
        if textproc.dedup_key(items[i].dedup_text) == textproc.dedup_key(items[k].dedup_text):
            c["exact"].append(items[i].record["id"])
        else:
            sim = textproc.jaccard(textproc.shingles(items[i].dedup_text), textproc.shingles(items[k].dedup_text))
            c["near"].append({"id": items[i].record["id"], "jaccard": round(sim, 3)})
    # split groups: kept records linked by a similar pair (Jaccard >= group_threshold) stay together
    kept = [i for i in range(n) if keeper[i] == i]
    position = {i: p for p, i in enumerate(kept)}
    groups = textproc.UnionFind(len(kept))
    linked = 0
    for a, b, _sim in pairs:
        if unique[a] in position and unique[b] in position:
            groups.union(position[unique[a]], position[unique[b]])
            linked += 1
    report = {
        "input": n, "kept": len(kept), "exact_duplicates": sum(len(c["exact"]) for c in clusters.values()),
        "near_duplicates": sum(len(c["near"]) for c in clusters.values()), "near_dup_threshold": threshold,
        "split_group_threshold": round(group_threshold, 3), "similar_pairs_kept_together": linked,
        "clusters_total": len(clusters), "clusters": [clusters[k] for k in sorted(clusters)][:REPORT_CLUSTERS],
    }
    return [items[i] for i in kept], [groups.find(p) for p in range(len(kept))], report


def _apply_pii(item: _Item, action: str, key: bytes | None) -> list[pii.Span]:
    """Mask/pseudonymize every non-system message in place; returns the originals found, in message order
    (the redteam stage pairs the k-th value of a kind with the k-th mask of that kind)."""
    found: list[pii.Span] = []
    item.raw_text = "\n".join(m["content"] for m in item.record["messages"])  # for the sensitivity marks
    for msg in item.record["messages"]:
        if msg["role"] == "system":
            continue  # written by whoever configured the task, not data
        new, spans = pii.mask(msg["content"], action, key)
        msg["content"] = new
        found += spans
    item.pii_kinds = sorted({s.kind for s in found})
    return found


def _marks_level(text: str) -> str | None:
    for level, rx in _MARKS:
        if rx.search(text):
            return level
    return None


def _sensitivity(item: _Item, found: list[pii.Span]) -> str:
    """The highest of: the document's marks, the record's own marks, and "confidential" if it held PII."""
    candidates = [lv for lv in (item.doc_sensitivity, _marks_level(item.raw_text)) if lv]
    if found:
        candidates.append("confidential")
    if not candidates:
        return DEFAULT_SENSITIVITY
    return max(candidates, key=SENSITIVITY_LEVELS.index)


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


def _split(items: list[_Item], groups: list[int], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """A split name per item. Unlabeled records -> train (the teacher labels them). Labeled records are
    assigned per task by whole groups (similar records stay together), walking the groups stratum by stratum
    -- (task, label) for classification -- and sending a group to test/val whenever the running share owed to
    that split reaches one record. That keeps every label in proportion where it can be, and still gives
    val/test their share when labels have only a few examples each (per-label rounding would give none)."""
    out = ["train"] * len(items)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if items[i].labeled:
            members.setdefault(g, []).append(i)
    strata: dict[str, dict[str, list[list[int]]]] = {}  # task -> label -> groups
    for idx in members.values():
        rec = items[idx[0]].record
        label = rec["messages"][-1]["content"] if rec["task"] == "classification" else ""
        strata.setdefault(rec["task"], {}).setdefault(label, []).append(sorted(idx))
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


def _write_review(path: Path, items: list[_Item], splits: list[str], n: int, seed: int) -> None:
    """A random sample for a person to read before training: where each record came from, how sensitive it
    is, which PII kinds were replaced, and the text as it will be trained on."""
    pick = sorted(random.Random(seed).sample(range(len(items)), min(n, len(items))))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "split", "task", "file", "location", "sensitivity", "pii_kinds", "text"])
    for i in pick:
        rec = items[i].record
        text = "\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"] if m["role"] != "system")
        w.writerow([rec["id"], splits[i], rec["task"], rec["source"]["file"], rec["source"]["location"],
                    rec["sensitivity"], ";".join(items[i].pii_kinds), text[:REVIEW_TEXT_CHARS]])
    atomic_write_text(path, buf.getvalue())
