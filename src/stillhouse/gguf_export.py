"""Write a Llama-family `save_pretrained` folder as a GGUF file that llama.cpp and transformers load.

Written with the `gguf` package (the writer llama.cpp's own converter uses), so the layout is llama.cpp's:
  - metadata `llama.*` from config.json, the tokenizer as `tokenizer.ggml.*` (byte-level BPE: tokens, types,
    merges, special ids) and the chat template;
  - tensors renamed (`blk.N.attn_q.weight`, ...), with the query and key projections permuted the way llama.cpp
    expects for its rotary embedding (transformers' GGUF loader undoes exactly this permutation);
  - norms in F32, the rest in F16, Q8_0 or Q4_0 (rows whose length is not a multiple of 32 stay F16). Q4_0 keeps
    the token embedding (also the LM head when tied) in Q8_0, as llama.cpp's own quantizer keeps it at a higher
    type: 4-bit output logits cost the most accuracy for the fewest bytes saved.
Only the Llama architecture (SmolLM2, Llama 2/3, ...) is supported; anything else is refused with a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stillhouse.errors import StillhouseError

QUANT_TYPES = ("f16", "q8_0", "q4_0")

# HF name suffix -> GGUF name suffix, for the tensors of one decoder block
_BLOCK = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _permute_for_rope(w, n_head: int):
    """llama.cpp stores q/k rows with each head's two rotary halves interleaved (its convert script's `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    if hf_name.startswith("model.layers."):
        idx, rest = hf_name[len("model.layers."):].split(".", 1)
        if rest in _BLOCK:
            return f"blk.{idx}.{_BLOCK[rest]}"
    return None


def _merges(model_dir: Path) -> list[str]:
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    merges = data.get("model", {}).get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_gguf(model_dir: Path, out_path: Path, *, quant: str = "f16", license: str | None = None,
               name: str = "stillhouse student", tokenizer_pre: str = "default") -> dict:
    """Convert `model_dir` (a Llama save_pretrained folder with tokenizer.json) to `out_path`. Atomic.

    Returns {"path", "bytes", "quant", "tensors"}. `tokenizer_pre` names llama.cpp's pre-tokenizer regex
    (e.g. "smollm", "llama-bpe"); the export stage copies it from the teacher's GGUF when there is one."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    if quant not in QUANT_TYPES:
        raise StillhouseError(f"GGUF quantization {quant!r} is not supported; use one of {', '.join(QUANT_TYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise StillhouseError(f"{model_dir}: GGUF export supports Llama-family models only (this is {cfg.get('model_type')!r}); "
                              "use the safetensors export for vLLM/transformers")
    if not (model_dir / "tokenizer.json").exists():
        raise StillhouseError(f"{model_dir}: no tokenizer.json; GGUF export needs a fast (BPE) tokenizer saved with the model")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise StillhouseError(f"{model_dir}: rope scaling {rope.get('rope_type')!r} is not supported by this GGUF export yet")

    tmp = out_path.with_name(f".{out_path.name}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    if license:
        w.add_license(license)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])

    # tokenizer: ids are positions in the token list, so it must cover the embedding rows exactly
    vocab_rows = cfg["vocab_size"]
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    for i in range(len(tokens), vocab_rows):  # padding rows beyond the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre)
    w.add_token_list(tokens[:vocab_rows])
    w.add_token_types(types[:vocab_rows])
    w.add_token_merges(_merges(model_dir))
    for setter, tid in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                        (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    tied = cfg.get("tie_word_embeddings", False)
    count = 0
    for hf_name, t in state.items():
        gname = _gguf_name(hf_name)
        if gname is None:
            raise StillhouseError(f"{model_dir}: tensor {hf_name} has no GGUF name; is this a plain Llama checkpoint?")
        if gname == "output.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        data = t.float().numpy()
        if gname.endswith("attn_q.weight"):
            data = _permute_for_rope(data, n_head)
        elif gname.endswith("attn_k.weight"):
            data = _permute_for_rope(data, n_kv)
        if data.ndim == 1:
            w.add_tensor(gname, data.astype(np.float32))
        elif quant != "f16" and data.shape[-1] % 32 == 0:  # both types quantize blocks of 32 along a row
            qtype = gguf.GGMLQuantizationType.Q4_0 if quant == "q4_0" and gname.startswith("blk.") else gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, data.astype(np.float16))
        count += 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out_path), "bytes": out_path.stat().st_size, "quant": quant, "tensors": count}
