"""Re-identification risk (stillhouse.reident): quasi-identifiers, k-anonymity counts, report/generalize/drop,
and the prep outputs (report.json, data/reident.csv, review sample order) through the real CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stillhouse import reident
from stillhouse.config import ReidentConfig


def qis(text: str) -> list[tuple[str, str]]:
    return [(q.kind, q.value) for q in reident.find_quasi_identifiers(text)]


def test_quasi_identifiers_found_and_normalized():
    assert qis("Hired on 2019-03-04, she is a senior nurse, aged 34, based in Tromsø.") == [
        ("DATE", "2019-03-04"), ("JOB_TITLE", "senior nurse"), ("AGE", "34"), ("PLACE", "tromsø")]
    # one date, three spellings: the same value, so they count as one combination
    assert {v for _, v in qis("4 March 2019; March 4, 2019; 2019年3月4日")} == {"2019-03-04"}
    assert qis("a 51-year-old technician in the Oncology ward") == [
        ("AGE", "51"), ("JOB_TITLE", "technician"), ("DEPARTMENT", "oncology")]
    assert qis("post to SW1A 1AA or 〒100-0001; ZIP 94110") == [
        ("POSTCODE", "sw1a 1aa"), ("POSTCODE", "100-0001"), ("POSTCODE", "94110")]
    assert qis("the Osaka branch moved to the Finance department") == [("PLACE", "osaka"), ("DEPARTMENT", "finance")]
    # not QIs: a model number, an age over 120, "in March", a plain count of years
    assert qis("Model 2000X draws 45 W; aged 150; lives in March; 10 years of service") == []


def test_generalize_each_kind():
    assert reident.generalize("DATE", "4 March 2019", "2019-03-04") == "2019"
    assert reident.generalize("AGE", "34", "34") == "30-39"
    assert reident.generalize("POSTCODE", "94110", "94110") == "941**"
    assert reident.generalize("POSTCODE", "SW1A 1AA", "sw1a 1aa") == "SW** ***"
    assert reident.generalize("JOB_TITLE", "senior nurse", "senior nurse") == "[JOB_TITLE]"


def rec(i: int, text: str) -> dict:
    return {"id": f"r{i}", "messages": [{"role": "system", "content": "Hired 2001-01-01 as a nurse."},  # config, ignored
                                        {"role": "user", "content": text}], "source": {"file": "t.csv", "location": f"row {i}"}}


COMMON = "The senior nurse joined on 2020-01-06."  # the same combination in 6 records: k-anonymous at k=5
RARE = "Our 61-year-old pharmacist based in Hammerfest, hired 2011-09-12."  # in one record only


def corpus() -> list[dict]:
    return [rec(i, COMMON) for i in range(6)] + [rec(6, RARE), rec(7, "A nurse on 2020-01-06."),
                                                 rec(8, "Only a date: 2020-01-06.")]


def test_k_anonymity_counts_records_holding_the_whole_combination(tmp_path):
    recs = corpus()
    reasons, report = reident.assess(recs, ReidentConfig(k=5), tmp_path / "reident.csv")
    flagged = [r["id"] for r, why in zip(recs, reasons) if why]
    # r7's (date, "nurse") is in r7 alone ("senior nurse" is another title); r8 has one kind: not assessed
    assert flagged == ["r6", "r7"]
    assert report["records_assessed"] == 8 and report["records_below_k"] == 2
    assert report["by_kinds"] == {"AGE+DATE+JOB_TITLE+PLACE": 1, "DATE+JOB_TITLE": 1}
    rows = list(csv.DictReader((tmp_path / "reident.csv").open()))
    assert [(r["record_id"], r["qi_kinds"], r["records_sharing_combination"]) for r in rows] == [
        ("r6", "AGE+DATE+JOB_TITLE+PLACE", "1"), ("r7", "DATE+JOB_TITLE", "1")]
    # kinds and counts only: none of the values that identify
    written = (tmp_path / "reident.csv").read_text() + json.dumps(report) + "".join(reasons)
    assert not any(v in written.lower() for v in ("hammerfest", "pharmacist", "2011", "61"))
    # at k=7 the common combination (6 records) is a risk too
    reasons7, _ = reident.assess(corpus(), ReidentConfig(k=7))
    assert sum(bool(w) for w in reasons7) == 8


def test_generalize_rewrites_flagged_records_only_and_reassesses():
    recs = corpus()
    _, report = reident.assess(recs, ReidentConfig(k=5, action="generalize"))
    assert recs[6]["messages"][1]["content"] == "Our 60-69-year-old [JOB_TITLE] based in [PLACE], hired 2011."
    assert recs[0]["messages"][1]["content"] == COMMON  # k-anonymous: untouched
    assert recs[6]["messages"][0]["content"] == "Hired 2001-01-01 as a nurse."  # the system prompt is not data
    assert report["values_generalized"] == 6 and report["still_below_k_after_generalizing"] == 0


def cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(ws), *args], capture_output=True, text=True)


def write_table(ws: Path) -> None:
    (ws / "sources").mkdir(parents=True)
    with open(ws / "sources" / "staff.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        for i in range(12):
            w.writerow([f"Question {i}: when does the senior nurse start the late shift on ward {i}?", f"At {i} pm."])
        w.writerow(["Who approved the leave of our 61-year-old pharmacist based in Hammerfest, hired 2011-09-12?", "HR."])
    (ws / "stillhouse.yaml").write_text(
        "prep:\n  review_sample_size: 3\n  tables: [{pattern: staff.csv, task: qa, input: question, output: answer}]\n")


@pytest.mark.parametrize("action", ["report", "drop", "generalize"])
def test_prep_cli_reports_and_reviews_risky_records_first(tmp_path, action):
    write_table(tmp_path)
    res = cli(tmp_path, "prep", "--set", f"prep.reident.action={action}")
    assert res.returncode == 0, res.stderr
    data = tmp_path / "data"
    report = json.loads((data / "report.json").read_text())["reident"]
    assert report["records_below_k"] == 1 and report["action"] == action
    rows = list(csv.DictReader((data / "reident.csv").open()))
    assert [r["record_id"] for r in rows] == ["staff-00012"] and rows[0]["qi_kinds"] == "AGE+DATE+JOB_TITLE+PLACE"
    train = "".join((data / f"{s}.jsonl").read_text() for s in ("train", "val", "test"))
    review = list(csv.DictReader((data / "review.csv").open()))
    if action == "report":
        assert review[0]["id"] == "staff-00012" and "re-identification risk" in review[0]["kept_because"]
        assert len(review) in (3, 4) and "Hammerfest" in train  # then the usual 3-record sample (it may hold it too)
    elif action == "drop":
        assert "Hammerfest" not in train and report["dropped"] == 1
        assert all(r["id"] != "staff-00012" for r in review)
    else:  # prep holds its records on disk: the generalized record is the one written out
        assert "Hammerfest" not in train and "pharmacist" not in train
        assert "our 60-69-year-old [JOB_TITLE] based in [PLACE], hired 2011?" in train
        assert report["values_generalized"] == 4 and report["still_below_k_after_generalizing"] == 0


def test_bad_reident_config_names_the_key(tmp_path):
    write_table(tmp_path)
    res = cli(tmp_path, "prep", "--set", "prep.reident.action=blur")
    assert res.returncode == 2 and "prep.reident.action" in res.stderr and "Traceback" not in res.stderr
