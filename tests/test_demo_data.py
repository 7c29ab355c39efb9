"""The demo's generated sources: every file opens with the real library that prep will use, the intent task has
the promised shape, the planted PII is real (Luhn, IBAN checksums) and where the ground truth says, and a seed
always gives the same bytes."""

from __future__ import annotations

import csv
import difflib
import html
import json
import re
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import pytest

from stillhouse.config import TableMapping
from stillhouse.demo_data import COMPANY, INTENTS, demo_table_mappings, write_demo_sources


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("demo") / "sources"
    return dest, write_demo_sources(dest, quick=True, seed=0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _luhn_ok(number: str) -> bool:
    digits = [int(d) for d in reversed(number)]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(digits))
    return total % 10 == 0


def _iban_ok(iban: str) -> bool:
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _pdf_pages(path: Path) -> list[str]:
    import pypdf

    return [page.extract_text() for page in pypdf.PdfReader(path).pages]


def _docx_text(path: Path) -> str:
    import docx

    d = docx.Document(path)
    cells = [cell.text for table in d.tables for row in table.rows for cell in row.cells]
    return "\n".join([p.text for p in d.paragraphs] + cells)


def _text_of(path: Path) -> str:
    """The file's text as a reader library sees it, whitespace collapsed (PDF lines wrap inside values)."""
    if path.suffix == ".pdf":
        text = "\n".join(_pdf_pages(path))
    elif path.suffix == ".docx":
        text = _docx_text(path)
    elif path.suffix == ".html":
        text = html.unescape(path.read_text(encoding="utf-8"))
    else:
        text = path.read_text(encoding="utf-8")
    return " ".join(text.split())


def _card_numbers(text: str) -> list[str]:
    return [re.sub(r"\D", "", m) for m in re.findall(r"\b\d{4}[ -]?\d{4,6}[ -]?\d{4,5}(?:[ -]?\d{4})?\b", text)]


# ------------------------------------------------------------------------------------------------ intents


def test_intent_files_have_the_promised_shape(quick):
    dest, summary = quick
    labeled, unlabeled = _jsonl(dest / "intents.jsonl"), _jsonl(dest / "intents-unlabeled.jsonl")
    assert (len(labeled), len(unlabeled)) == (40, 60) == (summary["labeled"], summary["unlabeled"])
    assert all(set(r) == {"text", "label"} and r["text"].strip() for r in labeled)
    assert all(set(r) == {"text"} and r["text"].strip() for r in unlabeled)

    counts = Counter(r["label"] for r in labeled)
    assert len(counts) == 17 and set(counts) == set(INTENTS) == set(summary["intents"])
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced

    labeled_texts = [r["text"].lower() for r in labeled]
    unlabeled_texts = [r["text"].lower() for r in unlabeled]
    assert len(set(labeled_texts)) == len(labeled_texts) and len(set(unlabeled_texts)) == len(unlabeled_texts)
    assert not set(labeled_texts) & set(unlabeled_texts)
    # Slots were filled: no template syntax left over.
    assert not any(re.search(r"[{}<>\[\]]", t) for t in labeled_texts + unlabeled_texts)


def test_full_mode_sizes(tmp_path):
    summary = write_demo_sources(tmp_path, seed=3)
    labeled, unlabeled = _jsonl(tmp_path / "intents.jsonl"), _jsonl(tmp_path / "intents-unlabeled.jsonl")
    assert (len(labeled), len(unlabeled)) == (200, 2000)
    assert len({r["label"] for r in labeled}) == 17
    texts = [r["text"].lower() for r in labeled + unlabeled]
    assert len(set(texts)) == len(texts)
    with open(tmp_path / "tickets.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 30
    assert len(_pdf_pages(tmp_path / "hr-leave-policy.pdf")) >= 3
    assert summary["pii_planted"] > 100


# ---------------------------------------------------------------------------------------------- documents


@pytest.mark.parametrize("name", ["hr-leave-policy.pdf", "it-security-policy.pdf"])
def test_pdfs_have_a_header_and_page_numbers_on_every_page(quick, name):
    dest, _ = quick
    pages = _pdf_pages(dest / name)
    assert len(pages) >= 2  # the appendix starts a page, so even the quick demo has something to strip
    for number, text in enumerate(pages, 1):
        assert text.splitlines()[0].startswith(f"{COMPANY} |")
        assert "| INTERNAL" in text.splitlines()[0]
        assert f"Page {number} of {len(pages)}" in text
    body = " ".join(" ".join(pages).split())
    assert len(body.split()) > 200 and "Appendix A" in body


def test_docx_has_headings_paragraphs_and_tables(quick):
    import docx

    dest, _ = quick
    d = docx.Document(dest / "expense-policy.docx")
    headings = [p.text for p in d.paragraphs if p.style.name.startswith("Heading")]
    assert len(headings) >= 3
    assert sum(len(p.text.split()) for p in d.paragraphs if p.style.name == "Normal") > 100
    tables = [[[c.text for c in row.cells] for row in t.rows] for t in d.tables]
    assert [t[0][0] for t in tables] == ["Category", "Cardholder"]
    cards = [re.sub(r"\D", "", row[2]) for row in tables[1][1:]]
    assert cards and all(_luhn_ok(c) and len(c) in (15, 16) for c in cards)


def test_html_wraps_the_article_in_boilerplate(quick):
    from html.parser import HTMLParser

    dest, summary = quick
    page = (dest / "onboarding-wiki.html").read_text(encoding="utf-8")

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

    parser = Tags()
    parser.feed(page)
    assert {"nav", "footer", "aside", "main", "article", "h1", "h2"} <= set(parser.tags)
    main = page.split("<main>")[1].split("</main>")[0]
    assert "Privacy" not in main and "Recent changes" not in main  # boilerplate stays outside the article
    assert any(p["kind"] == "ssn" and "onboarding-wiki.html" in p["files"] for p in summary["pii"])


def test_markdown_faq(quick):
    dest, _ = quick
    text = (dest / "faq.md").read_text(encoding="utf-8")
    assert text.startswith("# ") and text.count("\n## ") >= 3


def test_tickets_parse_and_contain_duplicates(quick):
    dest, _ = quick
    with open(dest / "tickets.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["ticket_id", "customer", "email", "phone", "subject", "body", "resolution"]
    assert len(rows) == 10 and len({r["ticket_id"] for r in rows}) == 10
    assert all(r["body"].strip() and r["resolution"].strip() for r in rows)

    bodies = [r["body"] for r in rows]
    assert len(set(bodies)) < len(bodies)  # an exact duplicate
    distinct = sorted(set(bodies))
    near = [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:]
            if difflib.SequenceMatcher(None, a, b).ratio() > 0.8]
    assert near  # and a near duplicate
    assert any(_luhn_ok(n) for r in rows for n in _card_numbers(r["body"]))


def test_broken_pdf_does_not_open(quick):
    import pypdf

    dest, summary = quick
    assert "broken.pdf" in summary["documents"]
    with pytest.raises(Exception):
        pypdf.PdfReader(dest / "broken.pdf").pages[0].extract_text()


# ---------------------------------------------------------------------------------------------------- PII


def test_planted_pii_is_real_and_where_the_ground_truth_says(quick):
    dest, summary = quick
    pii = summary["pii"]
    assert summary["pii_planted"] == len(pii)
    kinds = Counter(p["kind"] for p in pii)
    assert {"person", "email", "phone", "credit_card", "iban", "ssn", "date_of_birth", "address"} <= set(kinds)

    texts = {name: _text_of(dest / name) for name in summary["documents"] if name != "broken.pdf"}
    for p in pii:
        for name in p["files"]:
            assert " ".join(p["value"].split()) in texts[name], (p, name)
        digits = re.sub(r"\D", "", p["value"])
        if p["kind"] == "credit_card":
            assert len(digits) in (15, 16) and _luhn_ok(digits), p
        if p["kind"] == "iban":
            assert _iban_ok(p["value"]), p
        if p["kind"] == "ssn":
            assert re.fullmatch(r"\d{3}-\d{2}-\d{4}", p["value"]), p

    everything = "\n".join(texts.values())
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", everything)  # Japanese names
    assert re.search(r"[\u0e00-\u0e7f]", everything)  # Thai names and addresses
    # Independent of the ground truth: the files themselves hold Luhn-valid card numbers.
    assert sum(_luhn_ok(n) for n in _card_numbers(everything)) >= 3


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_data(quick, tmp_path):
    dest, summary = quick
    again = write_demo_sources(tmp_path / "again", quick=True, seed=0)
    assert again == summary
    for path in sorted(dest.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name

    write_demo_sources(tmp_path / "other", quick=True, seed=1)
    for name in ["intents.jsonl", "intents-unlabeled.jsonl", "tickets.csv", "faq.md"]:
        assert (tmp_path / "other" / name).read_bytes() != (dest / name).read_bytes(), name


# ------------------------------------------------------------------------------------------ table mappings


def test_table_mappings_validate_and_match_the_files(quick):
    dest, _ = quick
    mappings = [TableMapping.model_validate(m) for m in demo_table_mappings()]
    assert {m.task for m in mappings} == {"classification", "qa"}
    for m in mappings:
        matched = [p for p in dest.iterdir() if fnmatch(p.name, m.pattern)]
        assert matched, m.pattern
        assert m.system_prompt and len(m.system_prompt) < 120  # short prompts keep training fast
        for path in matched:
            if path.suffix == ".jsonl":
                assert all(m.input in r for r in _jsonl(path))
            else:
                with open(path, newline="", encoding="utf-8") as f:
                    header = next(csv.reader(f))
                assert m.input in header and m.output in header
    intents = next(m for m in mappings if m.pattern == "intents*.jsonl")
    assert {p.name for p in dest.iterdir() if fnmatch(p.name, intents.pattern)} == {"intents.jsonl",
                                                                                    "intents-unlabeled.jsonl"}
