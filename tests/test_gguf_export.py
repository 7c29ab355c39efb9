"""GGUF export: the file loads back in transformers with the same weights, tokenizer and chat template."""

import pytest
import torch

from stillhouse.errors import StillhouseError
from stillhouse.gguf_export import write_gguf
from stillhouse.models import ModelSource, load_model, load_tokenizer, save_pretrained, tiny_random_model


@pytest.fixture(scope="module")
def fp16_exact_model(tmp_path_factory, tokenizer):
    """A tiny Llama whose weights are exactly representable in fp16, so an f16 GGUF is lossless."""
    model = tiny_random_model(tokenizer, num_layers=2, hidden_size=64, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    folder = tmp_path_factory.mktemp("gguf") / "student"
    save_pretrained(model, tokenizer, folder)
    return model, folder


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_f16_roundtrip_is_exact(fp16_exact_model, tokenizer, tmp_path):
    model, folder = fp16_exact_model
    info = write_gguf(folder, tmp_path / "s-f16.gguf", quant="f16", license="apache-2.0", tokenizer_pre="smollm")
    assert info["bytes"] > 0 and info["tensors"] == len([n for n in model.state_dict() if n != "lm_head.weight"])
    src = ModelSource(tmp_path, "s-f16.gguf")
    back = load_model(src)  # transformers dequantizes, we rebuild a plain model
    ids = tokenizer("Turn on the kitchen light, please.")["input_ids"]
    assert torch.equal(_logits(model, ids), _logits(back, ids))  # q/k permutation undone exactly
    tok = load_tokenizer(src)
    text = "hello <|im_start|>user\nwhere is my parcel?<|im_end|>"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == tokenizer.chat_template


def test_q8_0_close_to_original(fp16_exact_model, tokenizer, tmp_path):
    model, folder = fp16_exact_model
    f16 = write_gguf(folder, tmp_path / "s-f16.gguf", quant="f16")
    q8 = write_gguf(folder, tmp_path / "s-q8.gguf", quant="q8_0")
    assert q8["bytes"] < 0.75 * f16["bytes"]
    back = load_model(ModelSource(tmp_path, "s-q8.gguf"))
    ids = tokenizer("Set the bedroom thermostat to 21 degrees")["input_ids"]
    a, b = _logits(model, ids), _logits(back, ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # 8-bit blocks: small, nonzero error
    assert not torch.equal(a, b)


def test_refuses_non_llama(tmp_path, fp16_exact_model):
    _, folder = fp16_exact_model
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StillhouseError, match="Llama-family"):
        write_gguf(other, tmp_path / "x.gguf")
    with pytest.raises(StillhouseError, match="q4_k"):
        write_gguf(folder, tmp_path / "x.gguf", quant="q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_q4_0_is_smaller_and_agrees_with_the_original(fp16_exact_model, tokenizer, tmp_path):
    """q4_0: 4-bit blocks in the decoder, the embedding (= LM head, tied) in q8_0. Measured on the tiny random
    model: the next-token argmax agrees with the unquantized model at >= 80% of positions (a random model's
    distribution is flat, so this is a harder case than a trained one: SmolLM2 in bench/gguf_export.py)."""
    model, folder = fp16_exact_model
    q8 = write_gguf(folder, tmp_path / "s-q8.gguf", quant="q8_0")
    q4 = write_gguf(folder, tmp_path / "s-q4.gguf", quant="q4_0")
    assert q4["bytes"] < q8["bytes"]
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "s-q4.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    back = load_model(ModelSource(tmp_path, "s-q4.gguf"))
    ids = tokenizer("<|im_start|>user\nturn off the lights in the garage and lock the front door<|im_end|>\n"
                    "<|im_start|>assistant\nHassTurnOff garage, HassLock front door")["input_ids"]
    a, b = _logits(model, ids), _logits(back, ids)
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agreement >= 0.8, agreement
    assert not torch.equal(a, b)
