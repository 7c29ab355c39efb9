"""The data-use register (prep.data_use, prep.require_legal_basis) through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stillhouse.register import covers


def cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), *args], capture_output=True, text=True)


def workspace(ws: Path, data_use: str, require: bool = False) -> Path:
    (ws / "sources" / "hr").mkdir(parents=True)
    (ws / "sources" / "hr" / "leave.md").write_text("# Leave\n\nEmployees take annual leave after asking their team lead.\n")
    (ws / "sources" / "hr" / "sick.md").write_text("# Sick days\n\nCall in before nine and send the doctor's note within three days.\n")
    (ws / "sources" / "faq.md").write_text("# FAQ\n\nThe canteen opens at half past eleven and closes at two.\n")
    (ws / "stillhouse.yaml").write_text(f"prep:\n  require_legal_basis: {str(require).lower()}\n  data_use:\n{data_use}")
    return ws


HR = "  - {pattern: sources/hr, purpose: 'HR policy questions from staff', legal_basis: legitimate_interest, reference: 'DPIA-2026-04'}\n"
FAQ = "  - {pattern: 'faq*.md', purpose: 'public FAQ', legal_basis: not_personal_data}\n"


def test_covers_name_glob_path_glob_and_folder():
    assert covers("faq*.md", "sources/faq.md") and not covers("faq*.md", "sources/hr/leave.md")
    assert covers("sources/hr", "sources/hr/leave.md") and covers("sources/hr/", "sources/hr/sub/x.md")
    assert covers("sources/hr/*.md", "sources/hr/leave.md") and not covers("sources/hr", "sources/hrx/leave.md")


def test_register_lists_every_source_with_its_basis(tmp_path):
    ws = workspace(tmp_path, HR + FAQ, require=True)
    res = cli(ws, "prep")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    rows = {r["file"]: r for r in manifest["data_use"]}
    assert set(rows) == {"sources/faq.md", "sources/hr/leave.md", "sources/hr/sick.md"}
    assert rows["sources/hr/sick.md"]["legal_basis"] == "legitimate_interest" and rows["sources/hr/sick.md"]["entry"] == "prep.data_use[0]"
    assert rows["sources/faq.md"]["legal_basis"] == "not_personal_data" and rows["sources/faq.md"]["records"] == 1
    assert rows["sources/hr/leave.md"]["sha256"] == manifest["inputs"]["sources/hr/leave.md"]
    assert json.loads((ws / "data" / "report.json").read_text())["data_use"] == manifest["data_use"]
    md = (ws / "data" / "register.md").read_text()
    assert "| sources/hr/leave.md |" in md and "HR policy questions from staff | legitimate_interest | DPIA-2026-04" in md
    assert "Undeclared files: 0 of 3." in md


def test_undeclared_source_refused_when_required_and_listed_when_not(tmp_path):
    ws = workspace(tmp_path / "a", HR, require=True)
    res = cli(ws, "prep")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "prep.require_legal_basis" in res.stderr and "sources/faq.md" in res.stderr and "leave.md" not in res.stderr
    assert not (ws / "data" / "train.jsonl").exists()
    ws = workspace(tmp_path / "b", HR, require=False)
    assert cli(ws, "prep").returncode == 0
    assert "| sources/faq.md | " in (md := (ws / "data" / "register.md").read_text()) and "NOT DECLARED" in md


def test_entry_for_a_source_that_does_not_exist_names_the_key(tmp_path):
    ws = workspace(tmp_path, HR + FAQ + "  - {pattern: sources/payroll, purpose: payroll, legal_basis: contract}\n")
    res = cli(ws, "prep")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "prep.data_use[2]" in res.stderr and "sources/payroll" in res.stderr


def test_missing_legal_basis_is_a_config_error_naming_the_key(tmp_path):
    ws = workspace(tmp_path, "  - {pattern: sources/hr, purpose: 'HR questions'}\n")
    res = cli(ws, "prep")
    assert res.returncode == 2 and "prep.data_use.0.legal_basis" in res.stderr and "Traceback" not in res.stderr
