"""prep: PII actions per kind (incl. dropping the record) and confidentiality levels (markers, folders, PII
density), on real files through the real stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stillhouse import pii
from stillhouse.config import validate
from stillhouse.errors import StillhouseError
from stillhouse.stages import prep
from stillhouse.workspace import read_jsonl, stage_dir

CARD = "4111 1111 1111 1111"  # Luhn-valid test card number
EMAIL = "maria.lopez@acme.example"
PHONE = "+1 415-555-0134"
ROWS = [  # (question, answer); every row a different PII kind
    (f"My card {CARD} was charged twice this month", "Refunded"),
    (f"Please write to {EMAIL} about the delivery date", "Sent"),
    (f"Call me back on {PHONE} about the broken lamp", "Called"),
    ("The printer on the third floor is out of toner again", "Refilled"),
]


def make_cfg(ws: Path, **prep_cfg):
    return validate({"prep": {"workers": 1, "val_fraction": 0, "test_fraction": 0, **prep_cfg}}, workspace=ws, source="test")


def tickets(ws: Path, rows=ROWS, name="tickets.csv") -> dict:
    import csv

    path = ws / "sources" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["q", "a"])
        w.writerows(rows)
    return {"pattern": name, "task": "qa", "input": "q", "output": "a"}


def records(ws: Path) -> dict[str, dict]:
    return {r["id"]: r for s in ("train", "val", "test") for r in read_jsonl(stage_dir(ws, "prep") / f"{s}.jsonl")}


def everything_written(ws: Path) -> str:
    """What a trainer, a reviewer or an auditor reads (pii_private.json excluded on purpose)."""
    d = stage_dir(ws, "prep")
    return "".join((d / n).read_text(encoding="utf-8") for n in
                   ("train.jsonl", "val.jsonl", "test.jsonl", "review.csv", "review.html", "report.json", "manifest.json"))


def report(ws: Path) -> dict:
    return json.loads((stage_dir(ws, "prep") / "report.json").read_text())


# ------------------------------------------------------------------------------------------ PII actions


def test_actions_per_kind_and_drop(tmp_path, capsys):
    table = tickets(tmp_path)
    m = prep.run(make_cfg(tmp_path, tables=[table], pii_action={"default": "mask", "EMAIL": "pseudonymize", "CARD": "drop"}))
    recs = records(tmp_path)
    user = {rid: r["messages"][0]["content"] for rid, r in recs.items()}
    assert "tickets-00000" not in recs and len(recs) == 3  # the card's record is gone, whole
    assert user["tickets-00002"] == "Call me back on [PHONE] about the broken lamp"  # default: mask
    pseudo = user["tickets-00001"].removeprefix("Please write to ").removesuffix(" about the delivery date")
    assert "@" in pseudo and pseudo != EMAIL and "[EMAIL]" not in pseudo  # pseudonymized, keyed by the workspace secret
    assert (tmp_path / ".stillhouse" / "pii-key").stat().st_mode & 0o777 == 0o600
    dropped = report(tmp_path)["pii"]["dropped"]
    assert dropped["records"] == 1 and dropped["by_kind"] == {"CARD": 1}
    assert dropped["list"] == [{"id": "tickets-00000", "file": "sources/tickets.csv", "location": "row 1", "kinds": ["CARD"]}]
    assert m["metrics"]["dropped_pii"] == 1
    # no value anywhere a person reads, nor on the console; a dropped record's values not even in pii_private.json
    console = capsys.readouterr()
    written = everything_written(tmp_path) + console.out + console.err
    for value in (CARD, EMAIL, PHONE, "4111"):
        assert value not in written
    private = json.loads((stage_dir(tmp_path, "prep") / "pii_private.json").read_text())
    assert {(p["kind"], p["value"]) for p in private} == {("EMAIL", EMAIL), ("PHONE", PHONE)}
    review = (stage_dir(tmp_path, "prep") / "review.csv").read_text()
    assert "PII pseudonymize: EMAIL" in review and "PII mask: PHONE" in review


def test_same_pseudonym_across_runs_with_per_kind_actions(tmp_path):
    table = tickets(tmp_path)
    action = {"EMAIL": "pseudonymize", "default": "keep"}
    prep.run(make_cfg(tmp_path, tables=[table], pii_action=action))
    first = records(tmp_path)
    assert first["tickets-00002"]["messages"][0]["content"] == ROWS[2][0]  # default keep: as is
    # another run (other settings, so not skipped) gives the same pseudonym: the key stays in the workspace
    prep.run(make_cfg(tmp_path, tables=[table], pii_action=action, seed=1))
    assert records(tmp_path)["tickets-00001"]["messages"] == first["tickets-00001"]["messages"]


def test_one_action_drop_drops_every_record_with_pii(tmp_path):
    prep.run(make_cfg(tmp_path, tables=[tickets(tmp_path)], pii_action="drop"))
    assert list(records(tmp_path)) == ["tickets-00003"]
    assert report(tmp_path)["pii"]["dropped"]["by_kind"] == {"CARD": 1, "EMAIL": 1, "PHONE": 1}


def test_everything_dropped_is_a_clear_error(tmp_path):
    table = tickets(tmp_path, rows=ROWS[:1])
    with pytest.raises(StillhouseError, match=r"1 held a PII kind whose prep.pii_action is drop") as e:
        prep.run(make_cfg(tmp_path, tables=[table], pii_action={"CARD": "drop"}))
    assert CARD not in str(e.value)


@pytest.mark.parametrize("action, needle", [
    ({"CARDS": "drop"}, r"prep\.pii_action\.CARDS: unknown PII kind; kinds: default, EMAIL"),
    ({"EMAIL": "zap"}, r"prep\.pii_action\.EMAIL: 'zap' is not an action; allowed: mask, pseudonymize, keep, drop"),
    ("erase", r"'erase' is not an action; allowed: mask, pseudonymize, keep, drop"),
])
def test_bad_pii_action_names_the_key(tmp_path, action, needle):
    with pytest.raises(StillhouseError, match=needle):
        make_cfg(tmp_path, pii_action=action)


# --------------------------------------------------------------------------------------- sensitivity


def test_restricted_is_read_as_secret(tmp_path):
    cfg = make_cfg(tmp_path, max_sensitivity="restricted", sensitivity={"folders": [{"pattern": "x", "level": "restricted"}]})
    assert cfg.prep.max_sensitivity == "secret" and cfg.prep.sensitivity.folders[0].level == "secret"


def write_docs(ws: Path) -> None:
    docs = {
        "hr/salaries.md": "# Salary bands\n\nThe salary bands for the next year are attached to this page.\n",
        "notes/ja.md": "# 会議\n\nこの資料は社外秘です。来期の販売計画について話し合いました。\n",
        "notes/ja2.md": "# 計画\n\n極秘\n\n新工場の建設予定地は来月の取締役会で決まります。\n",
        "notes/th.md": "# บันทึก\n\nลับ\n\nแผนการขายของไตรมาสหน้าจะประกาศในการประชุมครั้งต่อไป\n",
        "notes/th2.md": "# กลับบ้าน\n\nพนักงานทุกคนกลับบ้านได้ตอนห้าโมงเย็นในวันศุกร์นี้\n",  # กลับ ("return") holds ลับ
        "notes/falcon.md": "# Plans\n\nProject Falcon starts in March with a small team of engineers.\n",
        "notes/canteen.md": "# Canteen\n\nThe canteen opens at noon and closes at two in the afternoon.\n",
        "notes/contacts.md": ("# Contacts\n\n## Payroll\n\nWrite to anna.berg@acme.example, tom.ek@acme.example or "
                              "call +1 415-555-0134.\n\n## Desk\n\nThe front desk is staffed from eight in the morning; "
                              "ask at the desk for visitor badges, or mail desk@acme.example.\n"),
    }
    for rel, text in docs.items():
        (ws / "sources" / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / "sources" / rel).write_text(text, encoding="utf-8")


def test_levels_from_markers_and_folders(tmp_path):
    write_docs(tmp_path)
    sens = {"folders": [{"pattern": "sources/hr", "level": "confidential"}], "markers": {"secret": ["Project Falcon"]},
            "pii_density": {}}  # PII plays no part here: levels come from markers and folders alone
    prep.run(make_cfg(tmp_path, sensitivity=sens, max_sensitivity="secret"))  # everything kept, to see every level
    level = {r["source"]["file"].removeprefix("sources/"): r["sensitivity"] for r in records(tmp_path).values()
             if "contacts" not in r["id"]}
    assert level == {
        "hr/salaries.md": "confidential",  # folder rule
        "notes/ja.md": "confidential",  # 社外秘
        "notes/ja2.md": "secret",  # 極秘
        "notes/th.md": "confidential",  # ลับ standing alone
        "notes/th2.md": "internal",  # not in กลับ: the default
        "notes/falcon.md": "secret",  # a marker from the config
        "notes/canteen.md": "internal",
    }


def test_levels_from_pii_density(tmp_path):
    write_docs(tmp_path)
    prep.run(make_cfg(tmp_path, sensitivity={"pii_density": {"confidential": 0, "secret": 20}}, max_sensitivity="secret"))
    level = {r["source"]["location"]: r["sensitivity"] for r in records(tmp_path).values() if "contacts" in r["id"]}
    assert level == {"line 5": "secret", "line 9": "confidential"}  # 3 values in ~130 chars; 1 in ~200


def test_secret_never_enters_training_by_default_and_is_listed(tmp_path, capsys):
    write_docs(tmp_path)
    sens = {"folders": [{"pattern": "sources/hr", "level": "secret"}], "pii_density": {"confidential": 0, "secret": 20}}
    prep.run(make_cfg(tmp_path, sensitivity=sens, max_sensitivity="confidential"))
    files = {r["source"]["file"] for r in records(tmp_path).values()}
    assert not files & {"sources/hr/salaries.md", "sources/notes/ja2.md"}
    excluded = {d["file"]: d for d in report(tmp_path)["sensitivity"]["excluded_documents"]}
    assert set(excluded) == {"sources/hr/salaries.md", "sources/notes/ja2.md", "sources/notes/contacts.md"}
    assert excluded["sources/hr/salaries.md"]["why"] == ["folder rule prep.sensitivity.folders 'sources/hr'"]
    assert excluded["sources/notes/ja2.md"]["why"] == ["marker '極秘' in its document"]
    assert excluded["sources/notes/contacts.md"] == {
        "file": "sources/notes/contacts.md", "level": "secret", "records": 1,
        "why": ["PII density >= 20 per 1,000 chars (prep.sensitivity.pii_density.secret)"]}
    console = capsys.readouterr()
    written = everything_written(tmp_path) + console.out + console.err
    assert "anna.berg" not in written and "tom.ek" not in written  # nor in the listing of what was left out
    # the default config: secret stays out, confidential goes in
    assert make_cfg(tmp_path).prep.max_sensitivity == "confidential"


def test_builtin_markers_can_be_switched_off(tmp_path):
    write_docs(tmp_path)
    prep.run(make_cfg(tmp_path, sensitivity={"builtin_markers": False, "pii_density": {}}, max_sensitivity="secret"))
    assert {r["sensitivity"] for r in records(tmp_path).values()} == {"internal"}


def test_mapping_covers_every_kind():
    """The per-kind mapping covers every kind pii.py finds: nothing falls through to an undefined action."""
    assert set(prep._pii_actions({"EMAIL": "keep"})) == set(pii.KINDS)
    assert prep._pii_actions({"EMAIL": "keep"})["PHONE"] == "mask"  # no default given: mask
