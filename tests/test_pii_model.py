"""stillhouse.pii_model: a real tiny BERT token classifier trained here, and a real spaCy pipeline, find names the
rules miss; prep masks them; bad folders get one line naming prep.pii_model.path."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from stillhouse import pii, pii_model
from stillhouse.config import validate
from stillhouse.errors import StillhouseError
from stillhouse.pii import Span
from stillhouse.stages import prep
from stillhouse.workspace import read_jsonl, stage_dir

# Made-up lowercase names: no gazetteer holds them and no capital letter gives them away, so the rules miss them.
NAMES = ["zorbulax", "quimbrel", "vexandor", "trillowen"]
TEMPLATES = ["the budget was approved by {} yesterday", "{} will call back tomorrow", "please ask {} about the invoice",
             "send the report to {} today", "the invoice from {} is late", "{} and {} met at the office"]
OTHER = "the budget was approved yesterday will call back tomorrow please ask about invoice send report to today " \
        "from is late and met at office printer lamp a of for on in"
TEXT = "the invoice from zorbulax is late"  # a template the model saw, with a name it saw


@pytest.fixture(scope="module")
def ner_folder(tmp_path_factory) -> Path:
    """A 1-layer BertForTokenClassification with a word-level tokenizer, trained for 40 steps to tag NAMES as
    B-PER: ~2 s on CPU. Saved with save_pretrained (safetensors, tokenizer.json)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

    words = sorted(set(OTHER.split()) | set(NAMES))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        id2label={0: "O", 1: "B-PER", 2: "I-PER"}, label2id={"O": 0, "B-PER": 1, "I-PER": 2})
    model = BertForTokenClassification(config)
    sentences = [t.format(n, NAMES[(i + 1) % len(NAMES)]) for t in TEMPLATES for i, n in enumerate(NAMES)]
    sentences += [t.replace("{}", "").replace("  ", " ").strip() for t in TEMPLATES]  # no name at all
    sentences += ["please write to the office about the printer lamp on a day of rain"]  # unknown words: [UNK] is no name
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    names = {vocab[n] for n in NAMES}
    labels = torch.tensor([[1 if i in names else (0 if m else -100) for i, m in zip(ids, mask)]
                           for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    folder = tmp_path_factory.mktemp("ner")
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_cfg(ws: Path, **prep_cfg):
    return validate({"prep": {"workers": 1, "val_fraction": 0, "test_fraction": 0, **prep_cfg}}, workspace=ws, source="test")


def tickets(ws: Path, questions: list[str]) -> dict:
    (ws / "sources").mkdir(exist_ok=True)
    with open(ws / "sources" / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["q", "a"])
        w.writerows([q, "ok"] for q in questions)
    return {"pattern": "t.csv", "task": "qa", "input": "q", "output": "a"}


def user_turns(ws: Path) -> list[str]:
    return [r["messages"][0]["content"] for r in read_jsonl(stage_dir(ws, "prep") / "train.jsonl")]


# --------------------------------------------------------------------------------------------- merge


def test_merge_is_a_union_where_the_longer_span_wins():
    rule = [Span(0, 5, "PERSON", "Maria"), Span(20, 30, "EMAIL", "a@b.example")]
    model = [Span(0, 11, "PERSON", "Maria Lopez"), Span(22, 26, "PERSON", "b.ex"), Span(40, 45, "ADDRESS", "Paris")]
    assert pii_model.merge(rule, model) == [Span(0, 11, "PERSON", "Maria Lopez"), Span(20, 30, "EMAIL", "a@b.example"),
                                            Span(40, 45, "ADDRESS", "Paris")]
    assert pii_model.merge([Span(3, 8, "PHONE", "x")], [Span(3, 8, "PERSON", "x")]) == [Span(3, 8, "PHONE", "x")]  # tie: rules
    assert pii_model.merge([], []) == []


# ------------------------------------------------------------------------------------- transformers


def test_transformers_backend_masks_a_name_the_rules_miss(tmp_path, ner_folder):
    assert not pii.find_pii(TEXT), "the rules now find this name: pick one they miss"
    mc = make_cfg(tmp_path, pii_model={"kind": "transformers", "path": str(ner_folder)}).prep.pii_model
    detector = pii_model.load(mc, tmp_path)
    long_text = "please ask about the invoice " * 12 + "the budget was approved by quimbrel yesterday"  # > 64 tokens
    found = detector.find([TEXT, "the printer lamp is late", long_text])
    assert found[0] == [Span(17, 25, "PERSON", "zorbulax")]
    assert found[1] == []
    assert [s.value for s in found[2]] == ["quimbrel"]  # seen in the second window
    table = tickets(tmp_path, [TEXT, "please write to ops@acme.example about the invoice today"])
    prep.run(make_cfg(tmp_path, tables=[table], pii_model={"kind": "transformers", "path": str(ner_folder)}))
    assert user_turns(tmp_path) == ["the invoice from [PERSON] is late", "please write to [EMAIL] about the invoice today"]
    rep = json.loads((stage_dir(tmp_path, "prep") / "report.json").read_text())["pii"]
    assert rep["by_kind"] == {"EMAIL": 1, "PERSON": 1} and rep["model"]["kind"] == "transformers"
    assert "zorbulax" not in (stage_dir(tmp_path, "prep") / "report.json").read_text()


def test_labels_not_mapped_is_an_error(tmp_path, ner_folder):
    mc = make_cfg(tmp_path, pii_model={"kind": "transformers", "path": str(ner_folder), "labels": {"LOC": "ADDRESS"}}).prep.pii_model
    with pytest.raises(StillhouseError, match=r"prep\.pii_model\.labels maps none of the model's labels \(PER\)"):
        pii_model.load(mc, tmp_path)


def test_missing_or_wrong_model_folder_names_the_key(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = make_cfg(tmp_path, tables=[tickets(tmp_path, [TEXT])], pii_model={"kind": "transformers", "path": "models/none"})
    with pytest.raises(StillhouseError, match=r"^prep\.pii_model\.path: .*models/none is not a folder"):
        prep.run(cfg)
    lm = tmp_path / "models" / "lm"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(lm)
    mc = make_cfg(tmp_path, pii_model={"kind": "transformers", "path": "models/lm"}).prep.pii_model
    with pytest.raises(StillhouseError, match=r"^prep\.pii_model\.path: .* holds a GPT2LMHeadModel, not a token-classification"):
        pii_model.load(mc, tmp_path)
    (lm / "model.safetensors").unlink()
    with pytest.raises(StillhouseError, match=r"^prep\.pii_model\.path: .*needs config.json and \*\.safetensors"):
        pii_model.load(mc, tmp_path)


# -------------------------------------------------------------------------------------------- spaCy


def test_spacy_backend_masks_its_person_spans(tmp_path):
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "zorbulax"},
                                               {"label": "ORG", "pattern": "acme"}])
    (tmp_path / "models").mkdir()
    nlp.to_disk(tmp_path / "models" / "ruler")
    table = tickets(tmp_path, [TEXT, "acme approved the budget for the printer"])
    first = prep.run(make_cfg(tmp_path, tables=[table], pii_model={"kind": "spacy", "path": "models/ruler"}))
    assert user_turns(tmp_path) == ["the invoice from [PERSON] is late",
                                    "acme approved the budget for the printer"]  # ORG is not mapped: kept
    # the same model again: up to date; a model changed in the same folder: prep runs again and uses it
    assert prep.run(make_cfg(tmp_path, tables=[table], pii_model={"kind": "spacy", "path": "models/ruler"})) == first
    nlp.get_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "printer"}])
    nlp.to_disk(tmp_path / "models" / "ruler")
    prep.run(make_cfg(tmp_path, tables=[table], pii_model={"kind": "spacy", "path": "models/ruler"}))
    assert user_turns(tmp_path)[1] == "acme approved the budget for the [PERSON]"


def test_spacy_not_installed_is_one_line_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # what `import spacy` meets where it is not installed
    mc = make_cfg(tmp_path, pii_model={"kind": "spacy", "path": "models/ruler"}).prep.pii_model
    with pytest.raises(StillhouseError, match=r"prep\.pii_model\.kind=spacy needs spaCy.*pip install spacy"):
        pii_model.load(mc, tmp_path)


def test_spacy_folder_that_is_not_a_pipeline(tmp_path):
    pytest.importorskip("spacy")
    (tmp_path / "models" / "empty").mkdir(parents=True)
    mc = make_cfg(tmp_path, pii_model={"kind": "spacy", "path": "models/empty"}).prep.pii_model
    with pytest.raises(StillhouseError, match=r"^prep\.pii_model\.path: .*models/empty is not a spaCy pipeline"):
        pii_model.load(mc, tmp_path)
