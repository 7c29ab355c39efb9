"""prep's extraction and robustness on real files made here: XLSX, e-mail, encodings, OCR, cleaning, the review
page, bad input of every kind through the real CLI, parallel == serial, and resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from stillhouse import textproc
from stillhouse.stages import prep
from stillhouse.workspace import stage_dir
from test_prep import HTML, all_records, make_cfg, make_docx, make_pdf, report, words, written_text

OUTPUT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "review.csv", "review.html", "pii_private.json")


def cli(ws: Path, *args: str, path: str | None = None, wait: bool = True):
    env = {**os.environ, "STILLHOUSE_QUIET": "1", "COLUMNS": "200"}
    if path is not None:
        env["PATH"] = path
    cmd = [sys.executable, "-m", "stillhouse", "-w", str(ws), "prep", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def output_bytes(ws: Path) -> dict[str, bytes]:
    return {n: (stage_dir(ws, "prep") / n).read_bytes() for n in OUTPUT_FILES}


def scan_pdf(path: Path, lines: list[str]) -> Path:
    """A PDF page that is only a picture of text, as a scanner makes it: no text layer."""
    from fpdf import FPDF
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (1700, 200 + 90 * len(lines)), 255)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=56)
    for k, line in enumerate(lines):
        draw.text((100, 100 + 90 * k), line, fill=0, font=font)
    pdf = FPDF()
    pdf.add_page()
    pdf.image(img, x=10, y=10, w=190)
    pdf.output(str(path))
    return path


# ------------------------------------------------------------------------------------------- formats


def test_xlsx_sheets_become_rows(tmp_path):
    import datetime as dt

    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Tickets"
    sheet.append([None])  # a blank first row: the header is the first row with something in it
    sheet.append(["ticket", "body", "resolution", "opened"])
    sheet.append([101, "The badge reader at gate 2 rejects every card since Monday", "Reader rebooted", dt.datetime(2024, 3, 1)])
    sheet.append([None, None, None, None])
    sheet.append([102.0, "Need a second monitor for the night shift desk please", None, dt.date(2024, 3, 4)])
    more = book.create_sheet("Archive")
    more.append(["body", "resolution"])
    more.append(["Coffee machine on floor 4 leaks water onto the carpet", "Replaced the seal"])
    book.save(tmp_path / "tickets.xlsx")
    tables = [{"pattern": "*.xlsx", "task": "qa", "input": "body", "output": "resolution"}]
    prep.run(make_cfg(tmp_path, sources=["tickets.xlsx"], tables=tables, val_fraction=0, test_fraction=0))
    recs = {r["source"]["location"]: r["messages"] for r in all_records(tmp_path)}
    assert set(recs) == {"sheet Tickets row 3", "sheet Tickets row 5", "sheet Archive row 2"}
    assert recs["sheet Tickets row 3"][-1] == {"role": "assistant", "content": "Reader rebooted"}
    assert recs["sheet Tickets row 5"][-1]["role"] == "user"  # no resolution: unlabeled, for the teacher
    assert report(tmp_path)["extract"]["table_rows"] == 3
    assert prep._xlsx_cell(102.0) == "102" and prep._xlsx_cell(dt.datetime(2024, 3, 1)) == "2024-03-01"


def test_eml_body_attachments_and_html_body(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Date"] = "Anna Berg <anna.berg@acme.example>", "desk@acme.example", "Mon, 4 Mar 2024 09:00:00 +0100"
    msg["Subject"] = "Printer on floor 3"
    msg.set_content("Hello desk,\n\nThe printer on floor 3 jams whenever duplex printing is selected in the driver.\n"
                    "Could you send a technician this week?\n")
    msg.add_attachment(make_docx(tmp_path / "travel.docx").read_bytes(), maintype="application",
                       subtype="vnd.openxmlformats-officedocument.wordprocessingml.document", filename="travel.docx")
    msg.add_attachment(b"\x89PNG\r\n\x1a\n", maintype="image", subtype="png", filename="photo.png")
    (src / "printer.eml").write_bytes(bytes(msg))
    html_only = EmailMessage()
    html_only["From"], html_only["Subject"] = "wiki@acme.example", "Wiki digest"
    html_only.set_content(HTML, subtype="html")
    (src / "digest.eml").write_bytes(bytes(html_only))
    prep.run(make_cfg(tmp_path, val_fraction=0, test_fraction=0, min_chars=10))
    recs = [r for r in all_records(tmp_path) if r["source"]["file"] == "sources/printer.eml"]
    body = [r for r in recs if r["source"]["location"].startswith("body line")]
    assert len(body) == 1 and "jams whenever duplex printing" in body[0]["messages"][1]["content"]
    assert body[0]["messages"][0]["content"].startswith("What does the Printer on floor 3 say about")
    attached = {r["messages"][0]["content"]: r for r in recs if r["source"]["location"].startswith("attachment travel.docx, paragraph")}
    assert "What does the Travel Policy say about Hotels?" in attached
    assert len({r["id"] for r in recs}) == len(recs)  # body and attachment share the file's stem, not its ids
    assert "anna.berg@acme.example" not in written_text(tmp_path)  # headers are not training text
    rep = report(tmp_path)["extract"]
    assert rep["attachments"] == 1 and rep["attachments_skipped"] == ["sources/printer.eml: attachment photo.png: unsupported type"]
    digest = " ".join(r["messages"][1]["content"] for r in all_records(tmp_path) if r["source"]["file"] == "sources/digest.eml")
    assert "photo ID" in digest and "NAVLINK" not in digest and "SCRIPTSECRET" not in digest


def test_decode_text_detects_encodings_and_refuses_junk():
    ja = "会議室の予約は総務部に連絡してください。プロジェクターは三階にあります。"
    th = "กรุณาจองห้องประชุมล่วงหน้าอย่างน้อยหนึ่งวัน"
    western = "Our café serves crème brûlée on Fridays – ask the staff."
    assert textproc.decode_text(ja.encode("shift_jis"))[0] == ja
    assert textproc.decode_text(ja.encode("euc_jp"))[0] == ja
    assert textproc.decode_text(th.encode("tis_620"))[0] == th
    assert textproc.decode_text(western.encode("cp1252")) == (western, "cp1252")  # not Windows-1250's "crčme"
    assert textproc.decode_text(western.encode("utf-16-le")) == (western, "utf-16-le")  # no BOM
    with pytest.raises(textproc.UndecodableText, match="binary"):
        textproc.decode_text(random.Random(0).randbytes(3000))
    with pytest.raises(textproc.UndecodableText, match="undecodable"):
        textproc.decode_text(bytes(b for b in random.Random(1).randbytes(4000) if b))


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr is not installed")
def test_scanned_pdf_is_ocred(tmp_path):
    scan_pdf(tmp_path / "scan.pdf", ["Replace the water filter", "every month and write the", "date on the label."])
    m = prep.run(make_cfg(tmp_path, sources=["scan.pdf"], val_fraction=0, test_fraction=0))
    text = " ".join(r["messages"][1]["content"] for r in all_records(tmp_path)).casefold()
    assert all(w in text for w in ("replace", "water", "filter", "month", "label")), text
    assert report(tmp_path)["extract"]["ocr_pages"] == 1 and m["params"]["ocr_engine"].startswith("tesseract")


def test_boilerplate_noise_and_quality_filters_counted(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    topics = ["the canteen opens at noon and closes at two", "parking permits are renewed every January",
              "visitors sign in at reception and wear a badge"]
    for k, topic in enumerate(topics):
        (src / f"note{k}.md").write_text(f"# Note {k}\n\n## Details\n\nPlease remember that {topic}, as agreed.\n\n* * *\n\n"
                                         f"(c) 202{k} Acme Corp. All rights reserved.\n")
    (src / "dump.md").write_text("# Dump\n\n## Readings\n\n" + " ".join(f"{n}.{n % 7}|{n * 3}" for n in range(40)) +
                                 "\n\n## Spam\n\n" + "buy now " * 30 + "\n")
    prep.run(make_cfg(tmp_path, val_fraction=0, test_fraction=0))
    text = written_text(tmp_path)
    assert "All rights reserved" not in text and "* * *" not in text and "buy now buy now" not in text
    assert all(t in text for t in topics)
    clean = report(tmp_path)["clean"]
    assert clean["boilerplate_paragraphs"] == 3 and clean["noise_paragraphs"] == 3  # digits differ: still one line
    assert clean["sections_dropped"] == {"mostly digits and symbols": 1, "repetitive": 1}


def test_review_is_stratified_explained_and_escaped(tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    (src / "intents.jsonl").write_text("".join(json.dumps({"text": " ".join(words(6, seed=i)), "label": "L"}) + "\n"
                                               for i in range(300)))
    (src / "guide.md").write_text("# Guide\n\n## Escalation\n\nWrite to <script>alert(1)</script> help@acme.example "
                                  "when the portal is down for more than an hour.\n")
    tables = [{"pattern": "intents.jsonl", "task": "classification", "input": "text", "output": "label"}]
    prep.run(make_cfg(tmp_path, tables=tables, review_sample_size=6, val_fraction=0, test_fraction=0))
    d = stage_dir(tmp_path, "prep")
    with open(d / "review.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["task"] for r in rows} == {"classification", "text"}  # 1 of 301, still shown
    guide = next(r for r in rows if r["file"] == "sources/guide.md")
    assert guide["kept_because"].startswith("section of ") and "PII mask: EMAIL" in guide["kept_because"]
    assert "row mapped by prep.tables[0] ('intents.jsonl'), labeled" in next(r for r in rows if r["task"] == "classification")["kept_because"]
    page = (d / "review.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "<mark>[EMAIL]</mark>" in page and not any(s in page for s in ("src=", "href=", "@import", "url("))
    assert all(f'id="{r["id"]}"' in page for r in rows)


# ----------------------------------------------------------------------------------------- bad input


def test_bad_input_quarantined_through_cli(tmp_path):
    """Every kind of bad file at once: each lands in quarantine with its reason, the run finishes (exit 0)."""
    from pypdf import PdfWriter

    ws, src = tmp_path / "ws", tmp_path / "ws" / "sources"
    (src / "sub").mkdir(parents=True)
    (ws / "stillhouse.yaml").write_text("prep:\n  workers: 2\n")
    (src / "good.md").write_text("# Guide\n\nThis guide explains how to file a travel expense claim in the tool.\n")
    (src / "broken.pdf").write_bytes(b"%PDF-1.7\n" + random.Random(0).randbytes(3000))
    (src / "empty.pdf").write_bytes(b"")
    writer = PdfWriter(clone_from=make_pdf(tmp_path / "plain.pdf"))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    writer.write(src / "encrypted.pdf")
    docx_bytes = make_docx(tmp_path / "t.docx").read_bytes()
    (src / "truncated.docx").write_bytes(docx_bytes[: len(docx_bytes) // 2])
    (src / "junk.txt").write_bytes(random.Random(2).randbytes(5000))  # binary with a text extension
    (src / "garbled.md").write_bytes(bytes(b for b in random.Random(3).randbytes(5000) if b))  # no encoding fits
    subprocess.run(["truncate", "-s", "1G", str(src / "huge.txt")], check=True)  # sparse: no disk used
    os.symlink("loop-b.md", src / "loop-a.md")
    os.symlink("loop-a.md", src / "loop-b.md")
    os.symlink("..", src / "sub" / "up")  # a folder loop: not followed
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    scan_pdf(src / "scan.pdf", ["A scanned page"])
    before = {p.name: p.lstat().st_mtime_ns for p in src.iterdir()}

    p = cli(ws, path=str(Path(sys.executable).parent))  # a PATH without tesseract
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "12 files (11 quarantined) -> 1 records" in " ".join((p.stdout + p.stderr).split())  # the summary
    rep = json.loads((ws / "data" / "report.json").read_text())
    assert {q["file"]: q["kind"] for q in rep["quarantine"]} == {
        "sources/broken.pdf": "corrupt", "sources/empty.pdf": "empty", "sources/encrypted.pdf": "encrypted",
        "sources/truncated.docx": "corrupt", "sources/junk.txt": "binary", "sources/garbled.md": "undecodable",
        "sources/huge.txt": "too large", "sources/loop-a.md": "symlink loop", "sources/loop-b.md": "symlink loop",
        "sources/image.png": "unsupported type", "sources/scan.pdf": "no text layer"}
    assert rep["extract"]["quarantined_by_kind"]["corrupt"] == 2 and rep["extract"]["quarantined"] == 11
    q = ws / "data" / "quarantine"
    reason = {f.name.removesuffix(".reason.txt"): f.read_text() for f in q.glob("*.reason.txt")}
    assert "encrypted PDF" in reason["sources__encrypted.pdf"] and "not a readable DOCX" in reason["sources__truncated.docx"]
    assert "1,024 MB, above prep.max_file_mb=200" in reason["sources__huge.txt"]
    assert "symbolic link loop" in reason["sources__loop-a.md"]
    assert "install tesseract-ocr to OCR it" in reason["sources__scan.pdf"]
    assert (q / "sources__broken.pdf").read_bytes() == (src / "broken.pdf").read_bytes()  # a copy for inspection
    assert not (q / "sources__huge.txt").exists() and not (q / "sources__loop-a.md").exists()  # never opened
    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    assert "sources/huge.txt" not in manifest["inputs"] and "sources/huge.txt" in manifest["params"]["unread_files"]
    assert {p.name: p.lstat().st_mtime_ns for p in src.iterdir()} == before  # the user's files untouched
    again = cli(ws, path=str(Path(sys.executable).parent))
    assert again.returncode == 0 and "up to date" in again.stdout + again.stderr


# ----------------------------------------------------------------------------- parallel and resume


def _mixed_sources(src: Path, n_notes: int) -> None:
    src.mkdir(parents=True)
    make_pdf(src / "handbook.pdf")
    make_docx(src / "travel.docx")
    (src / "wiki.html").write_text(HTML)
    for k in range(n_notes):
        (src / f"note-{k:03d}.md").write_text(
            f"# Note {k}\n\n## Contact\n\nAsk Maria Lopez (maria{k}@acme.example) about {' '.join(words(40, seed=k))}.\n")


def _comparable_report(ws: Path) -> dict:
    rep = report(ws)
    del rep["seconds"], rep["extract"]["workers"], rep["extract"]["cached"]
    return rep


def test_two_workers_give_the_same_output_as_one(tmp_path):
    _mixed_sources(tmp_path / "sources", 12)
    for ws, workers in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        shutil.copytree(tmp_path / "sources", ws / "sources")  # the same bytes (a PDF made later has another date)
        prep.run(make_cfg(ws, workers=workers))
    assert report(tmp_path / "two")["extract"]["workers"] == 2
    assert output_bytes(tmp_path / "one") == output_bytes(tmp_path / "two")
    assert _comparable_report(tmp_path / "one") == _comparable_report(tmp_path / "two")


def test_resume_after_sigkill_reuses_finished_files(tmp_path):
    ws = tmp_path / "ws"
    _mixed_sources(ws / "sources", 60)
    (ws / "stillhouse.yaml").write_text("prep:\n  workers: 1\n")
    cache = ws / "data" / "resume" / "extract"
    proc = cli(ws, wait=False)
    deadline = time.time() + 60
    while not (cache.exists() and any(f.suffix == ".json" for f in cache.iterdir())):  # one file finished
        assert proc.poll() is None and time.time() < deadline, "prep ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ws / "data" / "manifest.json").exists()  # killed mid-run
    finished = sum(f.suffix == ".json" and not f.name.startswith(".") for f in cache.iterdir())
    assert 1 <= finished <= 63

    assert cli(ws).returncode == 0  # resumes
    assert report(ws)["extract"]["cached"] == finished
    assert not cache.exists()  # it held unmasked text; gone once the run is done
    resumed, resumed_report = output_bytes(ws), _comparable_report(ws)
    shutil.rmtree(ws / "data")
    assert cli(ws).returncode == 0  # from scratch
    assert report(ws)["extract"]["cached"] == 0
    assert output_bytes(ws) == resumed and _comparable_report(ws) == resumed_report
