"""Model loading (HF folder, GGUF), saving as plain folders, deriving students, offline refusals."""

import json

import pytest
import torch

from stillhouse.errors import StillhouseError
from stillhouse.models import (count_parameters, derive_student, evenly_spaced_layers, load_model, load_tokenizer,
                               resolve_model, save_pretrained, tokenizer_fingerprint)


def test_folder_roundtrip(tiny_model_dir, tmp_path, tokenizer):
    src = resolve_model(str(tiny_model_dir))
    model = load_model(src)
    out = save_pretrained(model, load_tokenizer(src), tmp_path / "copy", {"note": "x"})
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "stillhouse.json"} <= {p.name for p in out.iterdir()}
    again = load_model(resolve_model(str(out)))
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tokenizer_fingerprint(load_tokenizer(resolve_model(str(out)))) == tokenizer_fingerprint(tokenizer)


def test_refuses_pickle_only_folder(tiny_model_dir, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(StillhouseError, match="safetensors"):
        resolve_model(str(bad))


def test_missing_path_and_wrong_file(tmp_path):
    with pytest.raises(StillhouseError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(StillhouseError, match=r"\.gguf"):
        resolve_model(str(f))


def test_gguf_hash_mismatch(tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(StillhouseError, match="sha256"):
        resolve_model(str(fake), sha256="0" * 64)


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(StillhouseError):
        evenly_spaced_layers(4, 5)


def test_derive_student_copies_layers(tiny_model_dir, tmp_path, tokenizer):
    teacher = load_model(resolve_model(str(tiny_model_dir)))
    student, kept = derive_student(teacher, 2)
    assert kept == [0, 3] and student.config.num_hidden_layers == 2
    assert count_parameters(student) < count_parameters(teacher)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    out = save_pretrained(student, tokenizer, tmp_path / "s")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    student2, kept2 = derive_student(teacher, [1, 2])
    assert kept2 == [1, 2]
    with pytest.raises(StillhouseError):
        derive_student(teacher, [0, 9])


@pytest.mark.slow
def test_real_smollm2_gguf_generates(tmp_path):
    """The demo teacher: verify the sha256, dequantize, save as a plain folder, reload, and generate."""
    from stillhouse.records import encode_prompt, generate

    src = resolve_model("asset:smollm2-135m-instruct")
    model, tok = load_model(src), load_tokenizer(src)
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    out = save_pretrained(model, tok, tmp_path / "smollm2")
    model2 = load_model(resolve_model(str(out)))
    text = generate(model2, tok, [encode_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])], 12)[0]
    assert "Paris" in text
