"""General-data mixing: which records go to train and test and how many, a user's file (formats, PII, bad lines),
and the real stages on a tiny workspace: prep mixes them in, label has the teacher answer the bundled prompts,
eval reports perplexity on the held-out general records next to the task metric (not gated)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stillhouse import pii
from stillhouse.config import GeneralConfig, validate
from stillhouse.errors import StillhouseError
from stillhouse.general import BUNDLED, general_records
from stillhouse.records import response_text
from stillhouse.workspace import read_jsonl

INTENTS = ["HassTurnOn", "HassTurnOff", "HassLightSet"]


def tiny_workspace(root: Path, teacher_dir: Path, **sections) -> Path:
    """A workspace with 60 smart-home utterances (labeled), a tiny teacher (4 layers, MIT) and small budgets."""
    ws = root / "ws"
    (ws / "sources").mkdir(parents=True)
    rows = [{"text": f"please {'switch on' if i % 3 == 0 else 'switch off' if i % 3 == 1 else 'dim'} lamp number {i} "
                     f"in room {i * 7 % 13}", "label": INTENTS[i % 3]} for i in range(60)]
    (ws / "sources" / "intents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(teacher_dir, ws / "teacher-model")
    (ws / "teacher-model" / "README.md").write_text("---\nlicense: mit\n---\n")
    config = {
        "teacher": {"model": "teacher-model"},
        "student": {"derive_layers": 2},
        "prep": {"tables": [{"pattern": "intents*.jsonl", "task": "classification"}], "review_sample_size": 0},
        "label": {"batch_size": 8, "max_new_tokens": 4, "records_per_shard": 64},
        "train": {"steps": 2, "batch_size": 4, "eval_every_steps": 2, "warmup_steps": 1},
        "eval": {"max_examples": 6, "bootstrap_samples": 50, "max_new_tokens": 4, "latency_requests": 2},
        **sections,
    }
    import yaml

    (ws / "stillhouse.yaml").write_text(yaml.safe_dump(config))
    return ws


def test_bundled_split_counts_and_no_overlap():
    gc = GeneralConfig(share=0.2, test_records=10, seed=3)
    train, test, report = general_records(gc, n_task_train=80, workspace=Path("."))
    assert len(train) == report["requested_train"] == 20  # 20 / (80 + 20) = share 0.2
    assert len(test) == 10 and report["available"] == len(read_jsonl(BUNDLED))
    assert all(r["task"] == "general" for r in train + test)
    assert all(response_text(r) is None for r in train)  # the teacher answers them (self-distilled replay)
    assert all(response_text(r) for r in test)  # held out with the reference answer
    prompts = lambda recs: {r["messages"][0]["content"] for r in recs}  # noqa: E731
    assert not prompts(train) & prompts(test)
    assert len({r["id"] for r in train + test}) == 30
    # the seed decides which records: another seed, another selection; the same seed, the same one
    assert prompts(general_records(GeneralConfig(share=0.2, test_records=10, seed=4), 80, Path("."))[1]) != prompts(test)
    assert general_records(gc, 80, Path("."))[0] == train


def test_share_larger_than_the_source_uses_it_all_and_says_so():
    train, test, report = general_records(GeneralConfig(share=0.9, test_records=10), n_task_train=1000, workspace=Path("."))
    assert report["requested_train"] == 9000 and len(train) == report["available"] - 10
    assert "used them all" in report["note"]


def test_user_file_formats_and_pii(tmp_path):
    path = tmp_path / "general.jsonl"
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(6)]
    rows += [{"prompt": "Write to jane.doe@example.com about the invoice."}]
    rows += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gc = GeneralConfig(share=0.5, file="general.jsonl", test_records=3)
    train, test, report = general_records(gc, 10, tmp_path, mask=lambda t: pii.mask(t, "mask"))
    assert len(test) == 3 and len(train) == 5  # 8 rows, 3 held out, the rest (wanted 10)
    assert report["pii_masked"] == 1
    texts = json.dumps(train + test)
    assert "jane.doe@example.com" not in texts and "[EMAIL" in texts
    unanswered = [r for r in train if response_text(r) is None]
    assert report["train_for_teacher_to_answer"] == len(unanswered) <= 1  # user responses are kept in train
    assert any(r["messages"][0]["role"] == "system" for r in train + test)


@pytest.mark.parametrize("line, match", [
    ('{"text": "no prompt"}', "line 2: a general record needs 'prompt'"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "line 2: a general record needs"),
    ('not json', "line 2: not valid JSON"),
])
def test_bad_user_lines_name_the_line(tmp_path, line, match):
    (tmp_path / "g.jsonl").write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(StillhouseError, match=match):
        general_records(GeneralConfig(share=0.1, file="g.jsonl"), 10, tmp_path)
    with pytest.raises(StillhouseError, match="prep.general.file: .*missing.jsonl not found"):
        general_records(GeneralConfig(share=0.1, file="missing.jsonl"), 10, tmp_path)


def test_share_must_be_below_one(tmp_path):
    with pytest.raises(StillhouseError, match="'prep.general.share'"):
        validate({"prep": {"general": {"share": 1.0}}}, tmp_path, "test")


def test_prep_label_train_eval_with_general_data(tmp_path, tiny_model_dir):
    from stillhouse.config import load_config
    from stillhouse.pipeline import run_all

    ws = tiny_workspace(tmp_path, tiny_model_dir)
    cfg = load_config(ws, ["prep.general.share=0.2", "prep.general.test_records=4"])
    run_all(cfg, ["prep", "label", "train", "eval"])

    train, test = read_jsonl(ws / "data" / "train.jsonl"), read_jsonl(ws / "data" / "test.jsonl")
    general_train = [r for r in train if r["task"] == "general"]
    task_train = [r for r in train if r["task"] != "general"]
    assert len(general_train) == round(0.2 * len(task_train) / 0.8) > 0
    assert sum(r["task"] == "general" for r in test) == 4
    report = json.loads((ws / "data" / "report.json").read_text())["general"]
    assert report["train"] == len(general_train) and report["test"] == 4

    # label: the teacher was asked to answer every general prompt (sequence-level KD); what it wrote is trained on.
    # This random teacher mostly ends its turn at once, and empty answers are skipped, so count both outcomes.
    stats = json.loads((ws / "labels" / "stats.json").read_text())
    generated = {r["id"] for r in read_jsonl(ws / "labels" / "generated.jsonl")}
    general_ids = {r["id"] for r in general_train}
    assert stats["generated"] + stats["unlabeled_skipped"] == len(general_ids), stats  # the task records are labeled
    labeled_ids = {r["id"] for r in read_jsonl(ws / "labels" / "sequences.jsonl")}
    assert labeled_ids & general_ids == generated & general_ids

    results = json.loads((ws / "eval" / "results.json").read_text())
    general = results["tasks"]["general"]
    assert general["metric"] == "perplexity" and general["n"] == 4 and not general["higher_is_better"]
    assert general["models"]["student"]["score"] > 1 and general["models"]["teacher"]["score"] > 1
    assert "classification" in results["tasks"]  # next to the task metric
    assert "general" in (ws / "eval" / "summary.md").read_text()

    # forgetting is reported, not gated: the same ratio under the name of a task would fail a strict gate
    from stillhouse.stages.eval import check_gate

    strict = load_config(ws, ["eval.min_retention=1000"])
    assert general["retention"]["student"]["value"] < 1000
    assert not [f for f in check_gate(results, strict) if "general" in f]
    as_text = {**results, "tasks": {"text": general}}
    assert any("task 'text'" in f for f in check_gate(as_text, strict))

    # prep is fingerprinted on the general settings: the same ones are skipped, a new share re-runs it
    from stillhouse.stages import prep

    before = json.loads((ws / "data" / "manifest.json").read_text())["fingerprint"]
    assert prep.run(cfg)["fingerprint"] == before
    again = prep.run(load_config(ws, ["prep.general.share=0.1", "prep.general.test_records=4"]))
    assert again["fingerprint"] != before
    assert json.loads((ws / "data" / "report.json").read_text())["general"]["share"] == 0.1
