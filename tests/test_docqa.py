"""prep.document_qa: the teacher writes QA pairs from document sections; only grounded pairs are kept.

The teacher here is a tiny model trained in the test to always ask "When are returns accepted?" and to answer
"Returns are accepted within 30 days of delivery." (so what it writes is known): on the returns document the pair
is grounded and kept, on the VPN document the question is not about the section and is dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stillhouse import docqa
from stillhouse.config import validate
from stillhouse.errors import StillhouseError
from stillhouse.stages import prep
from stillhouse.workspace import read_jsonl, stage_dir

RETURNS = ("# Returns policy\n\nReturns are accepted within 30 days of delivery. The item must be unused and in its "
           "original packaging, and the receipt must be included with the parcel.\n")
VPN = ("# VPN update\n\nThe VPN client must be updated to version 4.2 before March 1. Employees who work from home "
       "should install the update from the IT portal.\n")
QUESTION = "When are returns accepted?"
ANSWER = "Returns are accepted within 30 days of delivery."


def test_parsing_and_grounding():
    assert docqa.parse_field("Question: Q: When is it due?\nAnswer: soon", "Question") == "When is it due?"
    assert docqa.parse_field("Answer: The answer is: within 30 days", "Answer") == "within 30 days"
    assert docqa.parse_field("Question: When?", "Answer") == ""  # the other field only
    assert docqa.parse_field("", "Question") == ""
    assert docqa.is_question("How long do refunds take") and docqa.is_question("The limit is 30 days?")
    assert not docqa.is_question("The text recommends calling the desk.")
    section = "Refunds are paid within 5 business days after delivery."
    assert docqa.grounded_share("When is the refund paid?", section) == 1.0  # "refund" ~ "refunds" (stem)
    assert docqa.grounded_share("Who founded the company in Berlin?", section) == 0.0
    assert docqa.grounded_share("What is it?", section) == 0.0  # no content word at all


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny model over SmolLM2's tokenizer that learned the two replies above, saved with a license."""
    import torch

    from stillhouse.models import load_tokenizer, resolve_model, save_pretrained, tiny_random_model
    from stillhouse.records import encode

    tok = load_tokenizer(resolve_model("asset:smollm2-135m-instruct"))
    model = tiny_random_model(tok, num_layers=2, hidden_size=64)
    rows = []
    for title, text in (("returns", RETURNS), ("vpn", VPN)):
        body = text.split("\n\n", 1)[1].strip()
        q = {"messages": [{"role": "user", "content": docqa.QUESTION_PROMPT.format(title=title, text=body)},
                          {"role": "assistant", "content": f"Question: {QUESTION}"}]}
        a = {"messages": [{"role": "user", "content": docqa.ANSWER_PROMPT.format(title=title, text=body, question=QUESTION)},
                          {"role": "assistant", "content": f"Answer: {ANSWER}"}]}
        rows += [encode(tok, q, 512), encode(tok, a, 512)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        for e in rows:
            ids = torch.tensor([e.input_ids])
            labels = ids.clone()
            labels[0, : e.prompt_len] = -100
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = tmp_path_factory.mktemp("docqa") / "teacher"
    save_pretrained(model, tok, out)
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\nA tiny test teacher.\n")
    return out


def _ws(tmp_path: Path, teacher: Path, **dq) -> tuple[Path, object]:
    (tmp_path / "sources").mkdir(parents=True)
    (tmp_path / "sources" / "returns.md").write_text(RETURNS)
    (tmp_path / "sources" / "vpn.md").write_text(VPN)
    cfg = validate({"teacher": {"model": str(teacher)},
                    "prep": {"workers": 1, "document_qa": {"enabled": True, "questions_per_section": 1, **dq}}},
                   workspace=tmp_path, source="test")
    return tmp_path, cfg


def test_prep_keeps_the_grounded_pair_in_its_sections_split(teacher_dir, tmp_path):
    ws, cfg = _ws(tmp_path, teacher_dir)
    prep.run(cfg)
    out = stage_dir(ws, "prep")
    split_of = {r["id"]: s for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")}
    records = {r["id"]: r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")}
    pairs = [r for r in records.values() if r["task"] == "qa"]
    assert len(pairs) == 1, pairs
    pair = pairs[0]
    assert pair["messages"] == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    section = pair["provenance"]["section_id"]
    assert records[section]["source"]["file"].endswith("returns.md") and pair["source"] == records[section]["source"]
    assert split_of[pair["id"]] == split_of[section]  # a paraphrase of a test section must not train the student
    assert pair["provenance"]["generated_by"] == "teacher" and pair["provenance"]["teacher"] == str(teacher_dir)
    rep = json.loads((out / "report.json").read_text())["document_qa"]
    assert rep["sections"] == 2 and rep["asked"] == 2 and rep["kept"] == 1
    assert rep["rejected"] == {"question not about the section": 1}  # the returns question, asked of the VPN text
    assert not (out / "resume").exists()  # the cache holds document text: gone once the run is done


def test_without_the_sections_only_the_pairs_remain(teacher_dir, tmp_path):
    ws, cfg = _ws(tmp_path, teacher_dir, keep_sections=False)
    prep.run(cfg)
    recs = [r for s in ("train", "val", "test") for r in read_jsonl(stage_dir(ws, "prep") / f"{s}.jsonl")]
    assert [r["task"] for r in recs] == ["qa"]


def test_cached_sections_are_not_asked_again(teacher_dir, tmp_path):
    from stillhouse.models import load_model, load_tokenizer, resolve_model

    src = resolve_model(str(teacher_dir))
    tok, model = load_tokenizer(src), load_model(src)
    _, cfg = _ws(tmp_path, teacher_dir)
    sections = [{"id": "r-1", "title": "returns", "text": RETURNS.split("\n\n", 1)[1].strip()}]
    first, counts = docqa.write_pairs(sections, model, tok, cfg.prep.document_qa, tmp_path / "cache", "fp")
    assert first["r-1"][0]["question"] == QUESTION and counts["cached_sections"] == 0
    # a resumed run: every section is cached, so the model is not needed at all
    again, counts = docqa.write_pairs(sections, None, tok, cfg.prep.document_qa, tmp_path / "cache", "fp")
    assert again == first and counts["cached_sections"] == 1 and counts["asked"] == 1
    # another teacher or other settings (another fingerprint): asked again
    with pytest.raises(AttributeError):
        docqa.write_pairs(sections, None, tok, cfg.prep.document_qa, tmp_path / "cache", "other")


def test_a_teacher_without_a_license_may_not_write_data(teacher_dir, tmp_path):
    import shutil

    unlicensed = tmp_path / "unlicensed"
    shutil.copytree(teacher_dir, unlicensed)
    (unlicensed / "README.md").unlink()
    ws, cfg = _ws(tmp_path / "ws", unlicensed)
    with pytest.raises(StillhouseError, match=r"prep.document_qa: the teacher .* may not write training data: no license found"):
        prep.run(cfg)
