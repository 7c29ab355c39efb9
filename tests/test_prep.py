"""The prep stage on real files made here: PDF (fpdf2), DOCX (python-docx), HTML, Markdown, text, CSV, JSONL."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import pytest

from stillhouse import textproc
from stillhouse.config import validate
from stillhouse.errors import StillhouseError
from stillhouse.stages import prep
from stillhouse.workspace import read_jsonl, stage_dir

SPLITS = ("train", "val", "test")


def make_cfg(ws: Path, **prep_cfg):
    """workers=1 unless given: a process pool costs a second per run; tests of the pool ask for one."""
    return validate({"prep": {"workers": 1, **prep_cfg}}, workspace=ws, source="test")


def outputs(ws: Path) -> dict[str, list[dict]]:
    return {s: read_jsonl(stage_dir(ws, "prep") / f"{s}.jsonl") for s in SPLITS}


def all_records(ws: Path) -> list[dict]:
    return [r for recs in outputs(ws).values() for r in recs]


def report(ws: Path) -> dict:
    return json.loads((stage_dir(ws, "prep") / "report.json").read_text())


def written_text(ws: Path) -> str:
    """Everything prep wrote that a trainer or a reviewer reads (pii_private.json excluded on purpose)."""
    d = stage_dir(ws, "prep")
    return "".join((d / n).read_text(encoding="utf-8") for n in ("train.jsonl", "val.jsonl", "test.jsonl", "review.csv", "report.json"))


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- file makers

HEADER = "Acme Widgets | Field Service Handbook | INTERNAL"
PAGES = [
    ("1. Safety first", ["Always disconnect the widget from mains power before opening the housing. Wear the supplied "
                         "gloves, because the heat sink stays hot for ten minutes after shutdown."] * 2),
    ("2. Replacing the filter", ["The filter sits behind the lower panel. Remove the two screws, slide the cartridge out "
                                 "and insert the new one until it clicks. Reset the filter counter in the service menu."]),
    ("3. Escalation", ["If the widget still reports fault E42, contact Mr. Jonas Berger on +49 30 1234 5678 or write "
                       "to jonas.berger@acme.example with the serial number."]),
]


def make_pdf(path: Path, pages=PAGES, title="Field Service Handbook") -> Path:
    from fpdf import FPDF

    class PDF(FPDF):
        def header(self):
            self.set_font("Helvetica", size=8)
            self.cell(0, 6, HEADER, new_x="LMARGIN", new_y="NEXT")

        def footer(self):
            self.set_y(-15)
            self.set_font("Helvetica", size=8)
            self.cell(0, 6, f"Page {self.page_no()} of {{nb}}", align="C")

    pdf = PDF()
    pdf.set_title(title)
    for heading, paras in pages:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 13)
        pdf.cell(0, 9, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=10)
        for p in paras:
            pdf.multi_cell(0, 5, p, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
    pdf.output(str(path))
    return path


def make_docx(path: Path) -> Path:
    import docx

    d = docx.Document()
    d.core_properties.title = "Travel Policy"
    d.add_heading("Travel Policy", level=0)
    d.add_heading("Hotels", level=1)
    d.add_paragraph("Book hotels through the travel desk. Rooms above the nightly limit need approval in advance.")
    d.add_heading("Limits", level=1)
    d.add_paragraph("The following limits apply per person and night.")
    t = d.add_table(rows=3, cols=2)
    for r, (city, limit) in enumerate([("City", "Limit (EUR)"), ("Berlin", "180"), ("Lisbon", "140")]):
        t.cell(r, 0).text, t.cell(r, 1).text = city, limit
    d.save(str(path))
    return path


HTML = """<!doctype html><html><head><title>Onboarding - Acme Wiki</title><style>body{color:red}</style>
<script>var tracking = "SCRIPTSECRET";</script></head><body>
<header><a href="/">Acme Wiki</a><nav><a href="/a">NAVLINK Home</a> <a href="/b">NAVLINK Teams</a></nav></header>
<div class="sidebar">SIDEBAR recent changes</div>
<main><h1>Onboarding</h1>
<h2>Your first day</h2><p>Come to reception at nine. Bring a photo ID so security can print your badge on the spot.</p>
<h2>Laptops</h2><ul><li>Laptops are handed out by IT on the first morning.</li><li>Lock your screen whenever you leave the desk.</li></ul>
</main><footer>FOOTERTEXT Privacy | Terms</footer></body></html>"""


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    return [rng.choice(vocab) for _ in range(n)]


def with_jaccard(base: list[str], target: float, seed: int) -> tuple[str, float]:
    """A variant of `base` whose word-5-gram Jaccard with it is the first value >= target reached by swapping
    words at the end (each swap changes the last shingles only: fine-grained steps)."""
    rng = random.Random(seed)
    variant = list(base)
    best = None
    for k in range(1, len(base)):
        variant[-k] = f"x{rng.randrange(10**9)}"
        sim = textproc.jaccard(textproc.shingles(" ".join(base)), textproc.shingles(" ".join(variant)))
        if sim < target:
            break
        best = (" ".join(variant), sim)
    return best


# ------------------------------------------------------------------------------------------ extraction


def test_pdf_headers_footers_dropped_and_pages_located(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    make_pdf(src / "handbook.pdf")
    m = prep.run(make_cfg(tmp_path, val_fraction=0, test_fraction=0))
    recs = all_records(tmp_path)
    text = written_text(tmp_path)
    assert "Field Service Handbook |" not in text and "Page 1 of 3" not in text  # running header, page footer
    assert report(tmp_path)["clean"] == {"header_footer_lines": 3, "page_number_lines": 3, "boilerplate_paragraphs": 0,
                                         "noise_paragraphs": 0, "sections_dropped": {}}
    by_q = {r["messages"][0]["content"]: r for r in recs}
    assert set(by_q) == {f"What does the Field Service Handbook say about {h}?" for h in ("Safety first", "Replacing the filter", "Escalation")}
    assert by_q["What does the Field Service Handbook say about Replacing the filter?"]["source"] == {"file": "sources/handbook.pdf", "location": "page 2"}
    esc = by_q["What does the Field Service Handbook say about Escalation?"]
    assert esc["source"]["location"] == "page 3"
    assert "[PERSON]" in esc["messages"][1]["content"] and "[PHONE]" in esc["messages"][1]["content"] and "[EMAIL]" in esc["messages"][1]["content"]
    assert esc["sensitivity"] == "confidential"  # held PII
    assert by_q["What does the Field Service Handbook say about Safety first?"]["sensitivity"] == "internal"  # header mark
    assert m["metrics"]["records"] == 3 and m["metrics"]["files"] == 1


def test_docx_paragraphs_and_table(tmp_path):
    make_docx(tmp_path / "travel.docx")
    prep.run(make_cfg(tmp_path, sources=["travel.docx"], val_fraction=0, test_fraction=0, min_chars=10))
    recs = {r["messages"][0]["content"]: r for r in all_records(tmp_path)}
    limits = recs["What does the Travel Policy say about Limits?"]["messages"][1]["content"]
    assert "City | Limit (EUR)\nBerlin | 180\nLisbon | 140" in limits  # the table, row by row, under its heading
    hotels = recs["What does the Travel Policy say about Hotels?"]
    assert hotels["source"]["file"] == "travel.docx" and hotels["source"]["location"].startswith("paragraph ")


def test_html_main_content_only(tmp_path):
    (tmp_path / "wiki.html").write_text(HTML, encoding="utf-8")
    prep.run(make_cfg(tmp_path, sources=["wiki.html"], val_fraction=0, test_fraction=0))
    text = written_text(tmp_path)
    for boilerplate in ("SCRIPTSECRET", "NAVLINK", "SIDEBAR", "FOOTERTEXT", "color:red"):
        assert boilerplate not in text
    recs = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in all_records(tmp_path)}
    assert "photo ID" in recs["What does the Onboarding say about Your first day?"]
    assert recs["What does the Onboarding say about Laptops?"] == (
        "- Laptops are handed out by IT on the first morning.\n- Lock your screen whenever you leave the desk.")


def test_markdown_and_text_encodings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "faq.md").write_text("---\ntitle: Cafe FAQ\n---\n# Cafe FAQ\n\n## Opening hours\n\nThe **café** opens at "
                                "[seven](https://x.example) every weekday morning.\n", encoding="utf-8")
    (src / "menu.txt").write_bytes("Our café serves crème brûlée on Fridays – ask the staff.\n".encode("cp1252"))
    (src / "notes.txt").write_bytes("Wide text: the café’s Wi-Fi is slow in the afternoon.\n".encode("utf-16"))  # BOM
    prep.run(make_cfg(tmp_path, sources=["src"], val_fraction=0, test_fraction=0))
    answers = {r["source"]["file"]: r["messages"][1]["content"] for r in all_records(tmp_path)}
    assert answers["src/faq.md"] == "The café opens at seven every weekday morning."  # markup stripped
    assert answers["src/menu.txt"] == "Our café serves crème brûlée on Fridays – ask the staff."
    assert answers["src/notes.txt"] == "Wide text: the café’s Wi-Fi is slow in the afternoon."
    q = {r["source"]["file"]: r["messages"][0]["content"] for r in all_records(tmp_path)}
    assert q["src/faq.md"] == "What does the Cafe FAQ say about Opening hours?"


def test_page_furniture_unit():
    # "42" in the middle of a page is content, not a page number
    bodies = ["\n".join(f"{w} {x}" for x in ("one", "two", "three", "42", "four", "five")).replace(f"{w} 42", "42")
              for w in ("alpha", "beta", "gamma")]
    footers = ["Page 1 of 3", "Page 2 of 3", "- 3 -"]
    pages = [f"ACME | Manual\n{b}\n{f}" for b, f in zip(bodies, footers)]
    cleaned, counts = textproc.strip_page_furniture(pages)
    assert cleaned == bodies
    assert counts == {"header_footer_lines": 3, "page_number_lines": 3}
    # one page: nothing "repeats", body lines stay
    assert textproc.strip_page_furniture(["ACME | Manual\nBody"])[0] == ["ACME | Manual\nBody"]


def test_headings_guessed_in_plain_text():
    lines = ["Widget care", "Clean the filter every month.", "Replace it every", "year or when it smells.",
             "", "Short final line"]
    blocks = textproc.lines_to_blocks([(ln, f"line {n}") for n, ln in enumerate(lines, 1)])
    assert [(b.text, b.location, b.heading) for b in blocks] == [
        ("Widget care", "line 1", True),
        ("Clean the filter every month. Replace it every year or when it smells.", "line 2", False),  # wrapped lines joined
        ("Short final line", "line 6", False),  # looks like a heading, but nothing follows it: text
    ]
    # paragraphs under one heading fill a section up to chunk_chars, then a new part starts
    assert [(s.heading, s.text, s.location, s.part, s.parts) for s in textproc.make_sections(blocks, chunk_chars=100)] == [
        ("Widget care", f"{blocks[1].text}\nShort final line", "line 2", 1, 1)]
    assert [(s.location, s.part, s.parts) for s in textproc.make_sections(blocks, chunk_chars=80)] == [
        ("line 2", 1, 2), ("line 6", 2, 2)]


def test_tables_mapped_unmapped_and_bad_rows(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    labeled = [{"text": f"turn on the {room} light", "label": "HassTurnOn"} for room in ("kitchen", "hall", "attic")]
    lines = [json.dumps(r) for r in labeled] + ["{not json", json.dumps({"text": "", "label": "HassTurnOn"})]
    (src / "intents.jsonl").write_text("\n".join(lines) + "\n")
    (src / "intents-unlabeled.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                                          ("dim the porch light", "turn on the kitchen light")) + "\n")
    with open(src / "orders.csv", "w", newline="") as f:
        csv.writer(f).writerows([["order", "note"], ["1", "late"]])
    cfg = make_cfg(tmp_path, tables=[{"pattern": "intents*.jsonl", "task": "classification", "input": "text",
                                      "output": "label", "system_prompt": "Classify."}], val_fraction=0, test_fraction=0)
    m = prep.run(cfg)
    recs = {r["id"]: r for r in all_records(tmp_path)}
    assert recs["intents-00000"]["messages"] == [{"role": "system", "content": "Classify."},
                                                 {"role": "user", "content": "turn on the kitchen light"},
                                                 {"role": "assistant", "content": "HassTurnOn"}]
    assert recs["intents-00000"]["source"] == {"file": "sources/intents.jsonl", "location": "line 1"}
    # unlabeled rows have no assistant turn; the one that repeats a labeled utterance is dropped, the label kept
    assert recs["intents-unlabeled-00000"]["messages"][-1] == {"role": "user", "content": "dim the porch light"}
    assert "intents-unlabeled-00001" not in recs and m["metrics"]["exact_duplicates"] == 1
    rep = report(tmp_path)
    assert rep["extract"]["rows_skipped"] == {"not valid JSON (Expecting property name enclosed in double quotes)": 1, "empty 'text'": 1}
    assert "sources/intents.jsonl line 4: not valid JSON" in rep["extract"]["rows_skipped_examples"][0]
    # a table without a mapping is quarantined, with the fix in its reason
    reason = (stage_dir(tmp_path, "prep") / "quarantine" / "sources__orders.csv.reason.txt").read_text()
    assert "no prep.tables entry matches 'orders.csv'" in reason and "columns: order, note" in reason


def test_table_mapping_with_wrong_column_names_the_key(tmp_path):
    (tmp_path / "t.csv").write_text("question,answer\nhow?,so.\n")
    cfg = make_cfg(tmp_path, sources=["t.csv"], tables=[{"pattern": "*.csv", "task": "qa", "input": "body", "output": "answer"}])
    with pytest.raises(StillhouseError, match=r"t.csv: column 'body' not found \(prep.tables\[0\].input.*question, answer"):
        prep.run(cfg)


# --------------------------------------------------------------------------------------------- dedup


def test_near_duplicates_verified_and_a_pair_below_threshold_stays():
    base = words(60, seed=1)
    near, j_near = with_jaccard(base, 0.85, seed=2)
    below, j_below = with_jaccard(base, 0.70, seed=3)
    assert 0.85 <= j_near < 0.9 and 0.70 <= j_below < 0.8
    texts = [" ".join(base), near, below, " ".join(words(60, seed=4))]
    pairs = textproc.similar_pairs([textproc.shingles(t) for t in texts], 0.6)
    sims = {(a, b): s for a, b, s in pairs}
    assert set(sims) == {(0, 1), (0, 2), (1, 2)}  # the unrelated text pairs with nothing
    assert sims[(0, 1)] == pytest.approx(j_near) and sims[(0, 2)] == pytest.approx(j_below)
    # character shingles for text without spaces
    assert len(textproc.shingles("東京都千代田区の会議室で打ち合わせをします")) > 10
    assert textproc.dedup_key("Turn on the LIGHT!") == textproc.dedup_key("turn on   the light")


def test_dedup_in_prep_exact_near_and_below(tmp_path):
    base = words(60, seed=11)
    near, _ = with_jaccard(base, 0.85, seed=12)
    below, _ = with_jaccard(base, 0.70, seed=13)
    rows = [("base", " ".join(base)), ("exact", " ".join(base).upper() + " !"), ("near", near), ("below", below),
            ("other", " ".join(words(60, seed=14)))]
    with open(tmp_path / "q.csv", "w", newline="") as f:
        csv.writer(f).writerows([["name", "question", "answer"], *[(n, q, f"answer {n}") for n, q in rows]])
    cfg = make_cfg(tmp_path, sources=["q.csv"], tables=[{"pattern": "q.csv", "task": "qa", "input": "question", "output": "answer"}])
    m = prep.run(cfg)
    kept = {r["messages"][-1]["content"] for r in all_records(tmp_path)}
    assert kept == {"answer base", "answer below", "answer other"}
    assert m["metrics"]["exact_duplicates"] == 1 and m["metrics"]["near_duplicates"] == 1
    cluster = report(tmp_path)["dedup"]["clusters"][0]
    assert cluster["kept"] == "q-00000" and cluster["exact"] == ["q-00001"] and cluster["near"][0]["id"] == "q-00002"
    # "below" is similar to "base" (J ~0.7): kept, but in base's split
    splits = {r["messages"][-1]["content"]: s for s, recs in outputs(tmp_path).items() for r in recs}
    assert splits["answer below"] == splits["answer base"]


# --------------------------------------------------------------------------------------------- split


def test_split_is_leak_free_stratified_and_seeded(tmp_path):
    rows = []
    for c in range(40):  # 40 clusters of 1-3 similar texts (J 0.6-0.8: similar, not duplicates)
        base = words(40, seed=100 + c)
        rows.append({"text": " ".join(base), "label": f"L{c % 4}"})
        for k in range(c % 3):
            rows.append({"text": with_jaccard(base, 0.62 + 0.05 * k, seed=1000 * c + k)[0], "label": f"L{c % 4}"})
    rows += [{"text": " ".join(words(30, seed=5000 + i))} for i in range(15)]  # unlabeled
    random.Random(0).shuffle(rows)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tables = [{"pattern": "data.jsonl", "task": "classification", "input": "text", "output": "label"}]
    prep.run(make_cfg(tmp_path, sources=["data.jsonl"], tables=tables, val_fraction=0.15, test_fraction=0.25, seed=7))
    out = outputs(tmp_path)
    assert sum(map(len, out.values())) == len(rows)  # nothing was a duplicate at 0.8
    threshold = report(tmp_path)["dedup"]["split_group_threshold"]
    shingled = {s: [textproc.shingles(r["messages"][0]["content"]) for r in recs] for s, recs in out.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                worst = max((textproc.jaccard(x, y) for x in shingled[a] for y in shingled[b]), default=0)
                assert worst < threshold, f"similar records in {a} and {b}: Jaccard {worst:.2f}"
    assert all(len(r["messages"]) == 2 for s in ("val", "test") for r in out[s])  # unlabeled only in train
    assert sum(len(r["messages"]) == 1 for r in out["train"]) == 15
    n_labeled = len(rows) - 15
    assert abs(len(out["test"]) - 0.25 * n_labeled) <= 3 and abs(len(out["val"]) - 0.15 * n_labeled) <= 3
    assert {r["messages"][-1]["content"] for r in out["test"]} == {"L0", "L1", "L2", "L3"}  # stratified
    first = {s: [r["id"] for r in recs] for s, recs in out.items()}
    # another seed, another split (a new manifest, not a skip)
    prep.run(make_cfg(tmp_path, sources=["data.jsonl"], tables=tables, val_fraction=0.15, test_fraction=0.25, seed=8))
    assert {s: [r["id"] for r in recs] for s, recs in outputs(tmp_path).items()} != first


# ----------------------------------------------------------------------------- pii, sensitivity, files


def test_pii_private_only_and_sensitivity_drop(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    (src / "contacts.md").write_text(
        "# Contacts\n\n## Payroll\n\nQuestions go to Ms. Maria Lopez, maria.lopez@acme.example, phone +1 415-555-0134. "
        "Her SSN 123-45-6789 is on file.\n\n## Canteen\n\nThe canteen opens at noon and closes at two in the afternoon.\n")
    (src / "board.md").write_text("# Board minutes\n\nRESTRICTED - board members only.\n\nThe board approved the "
                                  "acquisition of a smaller competitor for an undisclosed sum.\n")
    m = prep.run(make_cfg(tmp_path, val_fraction=0, test_fraction=0))
    private = json.loads((stage_dir(tmp_path, "prep") / "pii_private.json").read_text())
    originals = {(p["kind"], p["value"]) for p in private}
    assert originals == {("PERSON", "Maria Lopez"), ("EMAIL", "maria.lopez@acme.example"),
                         ("PHONE", "+1 415-555-0134"), ("SSN", "123-45-6789")}
    assert {p["record_id"] for p in private} == {"contacts-00000"}
    text = written_text(tmp_path)
    for _, value in originals:
        assert value not in text
    recs = {r["id"]: r for r in all_records(tmp_path)}
    assert recs["contacts-00000"]["sensitivity"] == "confidential" and recs["contacts-00001"]["sensitivity"] == "internal"
    assert "acquisition" not in text and m["metrics"]["dropped_sensitivity"] == 1  # restricted > confidential
    with open(stage_dir(tmp_path, "prep") / "review.csv", newline="") as f:
        review = {row["id"]: row for row in csv.DictReader(f)}
    assert review["contacts-00000"]["pii_kinds"] == "EMAIL;PERSON;PHONE;SSN"
    assert review["contacts-00000"]["file"] == "sources/contacts.md" and review["contacts-00000"]["location"] == "line 5"
    assert report(tmp_path)["pii"]["by_kind"] == {"EMAIL": 1, "PERSON": 1, "PHONE": 1, "SSN": 1}


def test_pseudonymize_is_consistent_across_records(tmp_path):
    (tmp_path / "t.csv").write_text("q,a\nPlease call Maria Lopez back about the invoice,Done\n"
                                    "Maria Lopez asked again about the refund today,Refunded\n")
    cfg = make_cfg(tmp_path, sources=["t.csv"], pii_action="pseudonymize", val_fraction=0, test_fraction=0,
                   tables=[{"pattern": "t.csv", "task": "qa", "input": "q", "output": "a"}])
    prep.run(cfg)
    users = [r["messages"][0]["content"] for r in all_records(tmp_path)]
    assert "Maria Lopez" not in " ".join(users)
    fake = users[0].removeprefix("Please call ").removesuffix(" back about the invoice")
    assert users[1] == f"{fake} asked again about the refund today"
    assert (tmp_path / ".stillhouse" / "pii-key").stat().st_size == 32


def test_corrupt_file_quarantined_and_run_completes(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    (src / "broken.pdf").write_bytes(b"%PDF-1.7\n" + random.Random(0).randbytes(3000))
    (src / "empty.pdf").write_bytes(b"")
    (src / "image.png").write_bytes(b"\x89PNG\r\n")
    (src / "ok.md").write_text("# Guide\n\nThis guide explains how to file a travel expense claim in the tool.\n")
    m = prep.run(make_cfg(tmp_path, val_fraction=0, test_fraction=0))
    q = stage_dir(tmp_path, "prep") / "quarantine"
    assert (q / "sources__broken.pdf").read_bytes() == (src / "broken.pdf").read_bytes()  # a copy, not a move
    assert (src / "broken.pdf").exists()
    assert "not a readable PDF" in (q / "sources__broken.pdf.reason.txt").read_text()
    assert "unsupported file type '.png'" in (q / "sources__image.png.reason.txt").read_text()
    assert m["metrics"]["quarantined"] == 3 and m["metrics"]["records"] == 1
    assert {e["file"] for e in report(tmp_path)["quarantine"]} == {"sources/broken.pdf", "sources/empty.pdf", "sources/image.png"}


def test_no_records_is_an_error_naming_sources_and_types(tmp_path):
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(StillhouseError, match=r"no records in sources .*1 quarantined.*supported file types: .*\.docx.*\.pdf"):
        prep.run(make_cfg(tmp_path))
    with pytest.raises(StillhouseError, match=r"source \S*nope \(given in prep.sources\) not found"):
        prep.run(make_cfg(tmp_path, sources=["nope"]))


def test_rerun_skipped_change_reruns_user_files_untouched(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    make_pdf(src / "handbook.pdf")
    make_docx(src / "travel.docx")
    (src / "wiki.html").write_text(HTML)
    before = tree_digest(src)
    cfg = make_cfg(tmp_path)
    first = prep.run(cfg)
    outs = tree_digest(stage_dir(tmp_path, "prep"))
    again = prep.run(cfg)
    assert again == first  # the same manifest: skipped
    assert tree_digest(stage_dir(tmp_path, "prep")) == outs  # nothing rewritten
    (src / "notes.md").write_text("# Notes\n\nThe widget warranty lasts two years from the date of delivery.\n")
    third = prep.run(cfg)
    assert third["fingerprint"] != first["fingerprint"] and third["metrics"]["files"] == 4
    assert any(r["source"]["file"] == "sources/notes.md" for r in all_records(tmp_path))
    changed = prep.run(make_cfg(tmp_path, chunk_chars=200))  # a setting changed: re-run as well
    assert changed["fingerprint"] != third["fingerprint"]
    before["notes.md"] = tree_digest(src)["notes.md"]
    assert tree_digest(src) == before  # the user's files: same bytes, same mtimes


def test_demo_sources_quick(tmp_path):
    """The demo's own sample data: planted PII never reaches the training files; the broken PDF is quarantined."""
    from stillhouse.demo_data import demo_table_mappings, write_demo_sources

    summary = write_demo_sources(tmp_path / "sources", quick=True)
    m = prep.run(make_cfg(tmp_path, tables=demo_table_mappings()))
    assert m["metrics"]["quarantined"] == 1 and set(m["metrics"]["tasks"]) == {"text", "classification", "qa"}
    collapsed = " ".join(written_text(tmp_path).split())
    leaked = [p for p in summary["pii"] if " ".join(p["value"].split()) in collapsed]
    assert not leaked, leaked
    assert m["metrics"]["exact_duplicates"] >= 1 and m["metrics"]["near_duplicates"] >= 1  # the duplicated tickets
