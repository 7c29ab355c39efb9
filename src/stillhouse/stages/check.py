"""`stillhouse check`: before anyone spends GPU hours, may this teacher and student be used together, how can
they be distilled, and do they fit the hardware?

Three gates and a self-test, answered from configs, GGUF metadata and tokenizers only (no weights are loaded, so
it takes seconds):

1. license: the teacher's and student's licenses (stillhouse.licenses), and the provenance of data/train.jsonl;
2. tokenizer: identical vocabularies -> token-level KD; padding rows only -> token-level KD on the shared rows
   ("token-sliced"); otherwise sequence-level KD (the student learns from teacher-generated text);
3. hardware: peak memory of labeling, training (full and LoRA) and quantized serving, per GPU size and for
   this machine's RAM, with changes that would make a phase fit;
4. offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE are in force, and the configs and
   tokenizers read above came from local files (which ones).

Also the cost of ownership (stillhouse.tco, config section `tco`): on-premises vs a cloud API, per month and per
million tokens, and the break-even month, with every input echoed.

Writes check/report.json and check/report.md. License acceptances (what, when, by whom) go into the manifest.
A gate that says no raises GateError after the report is written and without a manifest, so a re-run checks
again.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import time
from pathlib import Path

from stillhouse.config import Config
from stillhouse.errors import GateError, StillhouseError
from stillhouse.licenses import LICENSE_FILES, check_data_provenance, detect_license, gguf_metadata, license_decision
from stillhouse.models import ModelSource, evenly_spaced_layers, load_tokenizer, resolve_model
from stillhouse.tco import markdown as tco_markdown
from stillhouse.tco import tco
from stillhouse.workspace import StageRun, atomic_write_json, atomic_write_text, load_manifest, read_jsonl

GPU_SIZES_GB = (24, 48, 80, 141)
FIT_FRACTION = 0.9  # "fits" leaves 10% for allocator fragmentation and buffers the estimate leaves out
RUNTIME_OVERHEAD_BYTES = 0.4e9  # CUDA context / PyTorch runtime, present in every phase
SERVE_CONCURRENT_REQUESTS = 8
QUANT_BYTES_PER_PARAM = {"int8": 8.5 / 8, "int4": 4.5 / 8}  # block-quantized weights carry a scale per 32 values
GB = 1e9

# Architectures whose MLP is up -> act -> down (2 matrices) instead of gate/up/down (3).
_NON_GATED_MLP = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "gpt_bigcode", "bert"}

# config.json keys the plan cannot do without (any one name of each group); the rest have sound defaults.
_REQUIRED_CONFIG_FIELDS = [
    ("model_type",), ("vocab_size",), ("hidden_size", "n_embd", "d_model"),
    ("num_hidden_layers", "n_layer", "num_layers"), ("num_attention_heads", "n_head"),
]
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "chat_template.jinja")

# Text that both tokenizers must split into the same ids for token-level KD: identical vocabularies with other
# merges or normalizers would silently misalign every label.
_PROBES = [
    "Turn on the kitchen light, please.",
    "  Leading spaces,\ttabs\tand\n\nblank lines.",
    "Invoice 2024-0193: 1,234.56 EUR due 03/07.",
    "Unicode: café naïve Zürich 東京 🙂",
    "def area(r):\n    return 3.14159 * r ** 2",
]


# ------------------------------------------------------------------------------------------ model configs


def read_model_config(src: ModelSource, trust_remote_code: bool = False) -> dict:
    """A model's architecture numbers as a config dict, without loading weights: config.json through
    AutoConfig, or the metadata of a GGUF file mapped to the same keys."""
    if src.is_gguf:
        return _gguf_config(src)
    from transformers import AutoConfig

    # transformers fills missing fields with its defaults (a Llama config without hidden_size becomes 4096 wide),
    # so a truncated config.json would give a plan for another model: read it ourselves first.
    path = src.folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StillhouseError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); restore the model's config.json") from None
    if not isinstance(raw, dict):
        raise StillhouseError(f"{path}: expected a JSON object with the model's settings; restore the model's config.json")
    fields = {**raw, **raw["text_config"]} if isinstance(raw.get("text_config"), dict) else raw
    missing = [names[0] for names in _REQUIRED_CONFIG_FIELDS if not any(n in fields for n in names)]
    if missing:
        raise StillhouseError(f"{path}: missing {', '.join(missing)}; this does not look like a complete causal language "
                              "model config: restore the model's config.json")
    try:
        config = AutoConfig.from_pretrained(str(src.folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise StillhouseError(f"{src.folder / 'config.json'}: cannot read the model config ({str(e).splitlines()[0]})") from None
    return config.to_dict()


def _gguf_config(src: ModelSource) -> dict:
    # transformers' own GGUF -> config key table; AutoConfig(gguf_file=...) would take ~5 s to parse the
    # tokenizer too, and the license gate has already read this header.
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    try:
        meta = gguf_metadata(str(src.path))
    except (OSError, ValueError) as e:
        raise StillhouseError(f"{src.path}: not a readable GGUF file ({e}); re-download or re-convert it") from None
    arch = meta.get("general.architecture")
    mapping = GGUF_CONFIG_MAPPING.get(arch, {})
    config: dict = {"model_type": arch}
    for key, value in meta.items():
        if key.startswith(f"{arch}.") and (hf_key := mapping.get(key[len(arch) + 1 :])):
            config[hf_key] = value
    config.setdefault("vocab_size", meta.get("tokenizer.ggml.tokens"))
    config["tie_word_embeddings"] = "output.weight" not in meta["_tensor_names"]  # no separate LM head
    return config


def derived_student_config(teacher_config: dict, derive_layers: int | list[int], strategy: str = "uniform") -> dict:
    """The config of a student derived from the teacher: the same, with only the kept layers (listed in
    `_kept_layers`, which is not a transformers key)."""
    config = dict(teacher_config)
    text = dict(config["text_config"]) if isinstance(config.get("text_config"), dict) else config
    total = model_shape(teacher_config)["layers"]
    keep = evenly_spaced_layers(total, derive_layers, strategy) if isinstance(derive_layers, int) else sorted(derive_layers)
    if any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise StillhouseError(f"student.derive_layers={derive_layers}: indices must be distinct and in 0..{total - 1}")
    text["num_hidden_layers"] = len(keep)
    if text.get("layer_types"):
        text["layer_types"] = [text["layer_types"][i] for i in keep]
    if text is not config:
        config["text_config"] = text
    config["_kept_layers"] = keep
    return config


def model_shape(config, where: str = "model config") -> dict:
    """The numbers memory depends on, from a transformers config or its dict (multimodal: the text model)."""
    d = config if isinstance(config, dict) else config.to_dict()
    if isinstance(d.get("text_config"), dict):
        d = {**d, **d["text_config"]}

    def get(*names, default=None):
        for name in names:
            value = d.get(name)
            if value is not None:
                return int(max(value)) if isinstance(value, (list, tuple)) else value  # per-layer lists: the largest
        if default is None:
            raise StillhouseError(f"{where}: no {names[0]!r}; the hardware plan needs it (is this a causal language model config?)")
        return default

    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    experts = int(get("num_local_experts", "num_experts", "n_routed_experts", default=1))
    inter = int(get("intermediate_size", "n_inner", default=4 * hidden))
    return {
        "model_type": d.get("model_type"),
        "hidden": hidden,
        "layers": int(get("num_hidden_layers", "n_layer", "num_layers")),
        "heads": heads,
        "kv_heads": int(get("num_key_value_heads", "num_kv_heads", default=heads)),
        "head_dim": int(get("head_dim", default=hidden // heads)),
        "intermediate": int(get("moe_intermediate_size", default=inter)) if experts > 1 else inter,
        "experts": experts,
        "experts_per_token": int(get("num_experts_per_tok", default=1)) if experts > 1 else 1,
        "vocab": int(get("vocab_size")),
        "tied": bool(d.get("tie_word_embeddings", False)),
        "gated_mlp": d.get("model_type") not in _NON_GATED_MLP,
    }


def count_params(shape: dict) -> int:
    """Parameters from the shape alone (biases left out: < 0.1% for today's LMs). Exact for Llama-style models."""
    h, hd = shape["hidden"], shape["head_dim"]
    attn = h * shape["heads"] * hd * 2 + h * shape["kv_heads"] * hd * 2  # q, o + k, v
    mlp = (3 if shape["gated_mlp"] else 2) * h * shape["intermediate"] * shape["experts"]
    router = h * shape["experts"] if shape["experts"] > 1 else 0
    per_layer = attn + mlp + router + 2 * h  # + two norms
    embeddings = shape["vocab"] * h * (1 if shape["tied"] else 2)  # input embedding (+ LM head)
    return shape["layers"] * per_layer + embeddings + h  # + final norm


def _lora_params(shape: dict, rank: int) -> int:
    # LoRA on every linear layer of attention and MLP: r * (in + out) per matrix
    h, hd, i = shape["hidden"], shape["head_dim"], shape["intermediate"]
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    attn = (h + q) * 2 + (h + kv) * 2
    mlp = (h + i) * (3 if shape["gated_mlp"] else 2) * shape["experts"]
    return rank * shape["layers"] * (attn + mlp)


# ---------------------------------------------------------------------------------------------- memory


def _decoder_params(shape: dict) -> int:
    """Parameters of the decoder layers alone: the matrices bf16 autocast keeps a cast copy of."""
    return count_params(shape) - shape["vocab"] * shape["hidden"] * (1 if shape["tied"] else 2) - shape["hidden"]


def _loss_chunk_bytes(s: dict, tokens: int, cfg: Config, head_trained: bool) -> float:
    """losses.distill_loss on one chunk of (c, V): logits in the compute dtype and ~5 fp32 (c, V) buffers (upcast
    logits, the student's tail, their gradients); the head cast to the compute dtype, and, when the head is
    trained, its fp32 gradient accumulator plus the chunk's own (V, H) gradient."""
    b = 2 if cfg.train.precision == "bf16" else 4
    c = min(tokens, cfg.train.loss_chunk_tokens)
    return c * s["vocab"] * (b + 20) + s["vocab"] * s["hidden"] * (b + (8 if head_trained else 0))


def _phase_bytes(t: dict, s: dict, cfg: Config) -> dict[str, dict[str, float]]:
    """Peak bytes per phase, by part, for what the stages really do (validated against measured peak memory by
    bench/check_memory.py). The assumptions are listed in `_ASSUMPTIONS` and in the report."""
    b = 2 if cfg.train.precision == "bf16" else 4  # bytes per value computed under train.precision
    t_params, s_params = count_params(t), count_params(s)

    # Labeling (stages/label.py): the teacher in fp32, its decoder under bf16 autocast; generation of unlabeled
    # responses in batches of at least 32 (bf16 KV cache); then each record's (n, V) logits one record at a time.
    gen_tokens = max(cfg.label.batch_size, 32) * (cfg.label.max_seq_len + cfg.label.max_new_tokens)
    label_tokens = cfg.label.batch_size * cfg.label.max_seq_len
    label = {
        "weights": t_params * 4,
        "autocast_copies": _decoder_params(t) * 2,  # bf16 copies of the decoder weights, kept during a forward
        "kv_cache": gen_tokens * t["layers"] * 2 * t["kv_heads"] * t["head_dim"] * 2,
        "activations": max(gen_tokens, label_tokens) * (4 * t["hidden"] + 2 * t["intermediate"] * t["experts_per_token"]) * 2,
        # one record's fp32 logits, logits / T and their log-softmax: (label.max_seq_len, V) each
        "logits": cfg.label.max_seq_len * t["vocab"] * 12,
        "runtime": RUNTIME_OVERHEAD_BYTES,
    }

    # Training: one micro-batch of train.batch_size sequences of label.max_seq_len tokens, all supervised.
    train_tokens = cfg.train.batch_size * cfg.label.max_seq_len
    # tensors each decoder layer keeps for backward, per token: ~10 of width hidden (norm in/out, q/k/v,
    # attention out, residuals) and 4 of width intermediate (gate, up, act(gate), product); flash/SDPA
    # attention keeps no (T, T) scores
    activations = train_tokens * s["layers"] * (10 * s["hidden"] + 4 * s["intermediate"] * s["experts_per_token"]) * b
    shared = {
        "teacher_signal": train_tokens * (cfg.label.topk * 8 + 4),  # top-k ids + log-probs + rest mass
        "runtime": RUNTIME_OVERHEAD_BYTES,
    }
    full = {
        "weights": s_params * 4,  # fp32 master weights (autocast computes in bf16)
        "autocast_copies": _decoder_params(s) * 2 if b == 2 else 0,
        "grads": s_params * 4,
        "optimizer": s_params * 8,  # AdamW: two fp32 moments
        "activations": activations,
        "loss_chunk": _loss_chunk_bytes(s, train_tokens, cfg, head_trained=True),
        **shared,
    }
    lora_params = _lora_params(s, cfg.train.lora.r)
    lora = {
        # the frozen base stays fp32 (autocast casts frozen weights per use, without keeping copies) + fp32 adapters
        "weights": s_params * 4 + lora_params * 4,
        "grads": lora_params * 4,
        "optimizer": lora_params * 8,
        "activations": activations + train_tokens * s["layers"] * 7 * cfg.train.lora.r * b,
        "loss_chunk": _loss_chunk_bytes(s, train_tokens, cfg, head_trained=False),
        **shared,
    }

    serve = {f"serve_{q}": serve_bytes(s, cfg, bpp) for q, bpp in QUANT_BYTES_PER_PARAM.items()}
    return {"label_teacher": label, "train_full": full, "train_lora": lora, **serve}


def serve_bytes(s: dict, cfg: Config, weight_bytes_per_param: float) -> dict[str, float]:
    """Peak bytes of serving the student, by part: weights at `weight_bytes_per_param`, KV cache for
    SERVE_CONCURRENT_REQUESTS requests of label.max_seq_len + serve.max_tokens tokens."""
    serve_tokens = SERVE_CONCURRENT_REQUESTS * (cfg.label.max_seq_len + cfg.serve.max_tokens)
    return {
        "weights": count_params(s) * weight_bytes_per_param,
        "kv_cache": serve_tokens * s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * 2,
        "activations": serve_tokens * (4 * s["hidden"] + 2 * s["intermediate"] * s["experts_per_token"]) * 2,  # prefill
        "logits": SERVE_CONCURRENT_REQUESTS * s["vocab"] * 4,
        "runtime": RUNTIME_OVERHEAD_BYTES,
    }


_PHASE_TITLES = {
    "label_teacher": "teacher labeling",
    "train_full": "student training, full",
    "train_lora": "student training, LoRA",
    "serve_int8": "serving the student, int8",
    "serve_int4": "serving the student, int4",
}

_ASSUMPTIONS = [
    "GB = 10^9 bytes; the formulas follow what the stages run and were checked against measured peak memory on CPU "
    "(bench/check_memory.py, docs/benchmarks.md)",
    "labeling: teacher weights in fp32 plus the bf16 copies autocast keeps of its decoder weights; bf16 KV cache for "
    "generating in batches of max(label.batch_size, 32) x (label.max_seq_len + label.max_new_tokens) tokens; each "
    "record's (label.max_seq_len, V) logits in fp32, three times over (logits, / T, log-softmax)",
    "training: AdamW with fp32 master weights, gradients and two moments (16 bytes per trained parameter) plus bf16 "
    "autocast copies of the decoder weights; activations of train.batch_size x label.max_seq_len tokens, all "
    "supervised, kept for backward (no gradient checkpointing); LM head and loss in chunks of "
    "train.loss_chunk_tokens (~6 (chunk, V) buffers and the head gradient); LoRA adapts every linear layer, the "
    "base stays fp32 and frozen",
    f"serving: int8 ~8.5 and int4 ~4.5 bits per weight; fp16 KV cache for {SERVE_CONCURRENT_REQUESTS} concurrent "
    "requests of label.max_seq_len + serve.max_tokens tokens (`stillhouse serve` on CPU loads fp32 weights: "
    "about 4x the int8 weights)",
    f"every phase adds {RUNTIME_OVERHEAD_BYTES / GB:.1f} GB of runtime (a CUDA context); a size 'fits' when the "
    f"estimate is at most {FIT_FRACTION:.0%} of it, 'tight' up to 100%",
]


def _verdict(total_bytes: float, capacity_bytes: float) -> str:
    if total_bytes <= FIT_FRACTION * capacity_bytes:
        return "fits"
    return "tight" if total_bytes <= capacity_bytes else "no"


def _with(cfg: Config, overrides: dict) -> Config:
    new = cfg.model_copy(deep=True)
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = new
        for p in parents:
            node = getattr(node, p)
        setattr(node, last, value)
    return new


def _halvings(n: int) -> list[int]:
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


def _candidates(phase: str, cfg: Config) -> list[dict]:
    """Config changes that lower a phase's memory, the gentlest first."""
    if phase == "label_teacher":
        out = [{"label.batch_size": bs} for bs in _halvings(cfg.label.batch_size)]
        out += [{"label.batch_size": 1, "train.loss_chunk_tokens": c} for c in (512, 256, 128) if c < cfg.train.loss_chunk_tokens]
        return out
    if phase.startswith("train"):
        bs, ga = cfg.train.batch_size, cfg.train.grad_accum_steps
        smaller = [{"train.batch_size": b, "train.grad_accum_steps": ga * bs // b} for b in _halvings(bs)]  # same effective batch
        out = list(smaller)
        if not cfg.train.lora.enabled:
            out += [{"train.lora.enabled": True}] + [{"train.lora.enabled": True, **c} for c in smaller]
        last = {"train.lora.enabled": True, "train.batch_size": 1, "train.grad_accum_steps": ga * bs}
        out += [{**last, "train.loss_chunk_tokens": c} for c in (512, 256, 128) if c < cfg.train.loss_chunk_tokens]
        return out
    return []


def _suggest(phase: str, total: float, t: dict, s: dict, cfg: Config, target_bytes: float, target_name: str) -> str:
    for change in _candidates(phase, cfg):
        new_cfg = _with(cfg, change)
        measured = ("train_lora" if new_cfg.train.lora.enabled else "train_full") if phase.startswith("train") else phase
        new_total = sum(_phase_bytes(t, s, new_cfg)[measured].values())
        if new_total <= FIT_FRACTION * target_bytes:
            sets = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())
            return f"{_PHASE_TITLES[phase]} needs {total / GB:.1f} GB, more than {target_name}: {sets} brings it to {new_total / GB:.1f} GB"
    if phase == "label_teacher":
        fix = "label on a machine with more memory, or run a quantized teacher (GGUF) / tensor-parallel vLLM"
    elif phase.startswith("train"):
        fix = "choose a smaller student (student.derive_layers), or train on more GPUs (accelerate launch with FSDP)"
    else:
        fix = "serve with int4, or choose a smaller student"
    return f"{_PHASE_TITLES[phase]} needs {total / GB:.1f} GB, more than {target_name}, even with smaller batches: {fix}"


def hardware_plan(teacher_config, student_config, cfg: Config) -> dict:
    """Peak memory per phase (labeling, training full and LoRA, int8/int4 serving) from the two configs and the
    `label`/`train`/`serve` sections; verdicts per GPU size and for this machine's RAM; changes that would make
    the configured phases fit."""
    import psutil

    t, s = model_shape(teacher_config, "teacher config"), model_shape(student_config, "student config")
    vm = psutil.virtual_memory()
    targets = {f"{g}GB": g * GB for g in GPU_SIZES_GB}
    targets["RAM"] = float(vm.total)

    phases = {}
    for name, parts in _phase_bytes(t, s, cfg).items():
        total = sum(parts.values())
        phases[name] = {
            "title": _PHASE_TITLES[name],
            "total_gb": round(total / GB, 3),
            "parts_gb": {k: round(v / GB, 3) for k, v in parts.items()},
            "verdicts": {k: _verdict(total, cap) for k, cap in targets.items()},
            "smallest_gpu_gb": next((g for g in GPU_SIZES_GB if total <= FIT_FRACTION * g * GB), None),
        }

    # Suggestions for what this configuration will actually run: labeling, the configured training, serving.
    train_phase = "train_lora" if cfg.train.lora.enabled else "train_full"
    suggestions = []
    for name in ("label_teacher", train_phase, "serve_int8"):
        total = phases[name]["total_gb"] * GB
        if phases[name]["verdicts"]["RAM"] != "fits":
            if name == "serve_int8" and phases["serve_int4"]["verdicts"]["RAM"] == "fits":
                int4_gb = phases["serve_int4"]["total_gb"]
                suggestions.append(f"serving int8 needs {total / GB:.1f} GB, more than this machine's RAM: serve int4 ({int4_gb:.1f} GB)")
            else:
                suggestions.append(_suggest(name, total, t, s, cfg, vm.total, f"this machine's {vm.total / GB:.1f} GB RAM"))
        if phases[name]["smallest_gpu_gb"] is None:
            suggestions.append(_suggest(name, total, t, s, cfg, GPU_SIZES_GB[-1] * GB, f"a {GPU_SIZES_GB[-1]} GB GPU"))
    full, lora = phases["train_full"], phases["train_lora"]
    if train_phase == "train_full" and full["verdicts"]["24GB"] != "fits" and lora["verdicts"]["24GB"] == "fits":
        gpu = full["smallest_gpu_gb"] or f"> {GPU_SIZES_GB[-1]}"
        suggestions.append(f"full training needs a {gpu} GB GPU; with --set train.lora.enabled=true it fits 24 GB")

    return {
        "precision": cfg.train.precision,
        "teacher": {**t, "params": count_params(t)},
        "student": {**s, "params": count_params(s)},
        "machine": {"ram_gb": round(vm.total / GB, 2), "ram_available_gb": round(vm.available / GB, 2)},
        "configured_train": train_phase,
        "phases": phases,
        "suggestions": suggestions,
        "assumptions": _ASSUMPTIONS,
    }


# ------------------------------------------------------------------------------------------- tokenizers


def _specials(tok) -> dict:
    named = {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {**{k: str(v) if v is not None else None for k, v in named.items()}, "all": sorted(map(str, tok.all_special_tokens))}


def _split_differs(teacher_tok, student_tok) -> str | None:
    """The first probe the two tokenizers encode differently, or None."""
    for text in _PROBES:
        a = teacher_tok(text, add_special_tokens=False)["input_ids"]
        b = student_tok(text, add_special_tokens=False)["input_ids"]
        if a != b:
            return text
    return None


def tokenizer_gate(teacher_tok, student_tok, teacher_vocab_rows: int | None = None, student_vocab_rows: int | None = None) -> dict:
    """How teacher and student can be distilled, from their tokenizers (and embedding rows from the configs):

    - "token": identical vocabularies (token -> id), same splits, same number of embedding rows;
    - "token-sliced": the same tokens with the same ids, but one side has extra padding rows (a larger
      embedding matrix, or extra ids after the shared ones): token-level KD on the first `shared_rows` rows;
    - "sequence": anything else; the student learns from teacher-generated text.

    Special tokens and chat templates that differ are reported in "warnings"."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    t_rows = teacher_vocab_rows or max(tv.values()) + 1
    s_rows = student_vocab_rows or max(sv.values()) + 1
    out = {
        "vocab_teacher": len(tv),
        "vocab_student": len(sv),
        "rows_teacher": t_rows,
        "rows_student": s_rows,
        "shared_rows": 0,
        "special_tokens_match": _specials(teacher_tok) == _specials(student_tok),
        "chat_template_match": teacher_tok.chat_template == student_tok.chat_template,
        "warnings": [],
    }
    if not out["special_tokens_match"]:
        out["warnings"].append(f"special tokens differ: teacher {_specials(teacher_tok)}, student {_specials(student_tok)}")
    if not out["chat_template_match"]:
        out["warnings"].append("chat templates differ: labels and training use the teacher's template; serve the student with it too")
    for who, vocab, rows in (("teacher", tv, t_rows), ("student", sv, s_rows)):
        if max(vocab.values()) >= rows:
            out["warnings"].append(f"the {who} tokenizer has ids up to {max(vocab.values())} but its model only {rows} embedding rows")

    def sequence(reason: str) -> dict:
        reason += "; token-level KD would compare unrelated tokens, so the student learns from teacher-generated text (sequence-level KD)"
        return {**out, "mode": "sequence", "reason": reason}

    if tv == sv:
        shared = None  # every id
    else:
        small, large = (tv, sv) if len(tv) < len(sv) else (sv, tv)
        shared = max(small.values()) + 1
        # every smaller-side token keeps its id, and the larger side's extras all come after them
        is_prefix = all(large.get(tok) == i for tok, i in small.items()) and all(
            i >= shared for tok, i in large.items() if tok not in small
        )
        if not is_prefix:
            common = tv.keys() & sv.keys()
            moved = [tok for tok in common if tv[tok] != sv[tok]]
            example = f" (e.g. {moved[0]!r}: teacher id {tv[moved[0]]}, student id {sv[moved[0]]})" if moved else ""
            return sequence(
                f"different vocabularies: {len(tv.keys() - sv.keys()):,} teacher tokens are not in the student's, "
                f"{len(sv.keys() - tv.keys()):,} student tokens not in the teacher's, {len(moved):,} shared tokens have other ids{example}"
            )
    if (probe := _split_differs(teacher_tok, student_tok)) is not None:
        return sequence(f"the vocabularies match but the tokenizers split text differently (e.g. {probe!r})")

    if shared is None and t_rows == s_rows:
        return {**out, "mode": "token", "shared_rows": t_rows, "reason": f"identical tokenizers ({len(tv):,} tokens) and embedding sizes"}
    shared_rows = min(t_rows, s_rows) if shared is None else min(shared, t_rows, s_rows)
    if shared is None:
        why = (f"identical vocabularies ({len(tv):,} tokens); the embedding matrices differ only in padding rows "
               f"(teacher {t_rows:,}, student {s_rows:,})")
    else:
        bigger = "teacher" if len(tv) > len(sv) else "student"
        why = f"the {bigger}'s vocabulary is the other's plus {abs(len(tv) - len(sv)):,} extra tokens after id {shared - 1:,} (padding)"
    return {**out, "mode": "token-sliced", "shared_rows": shared_rows, "reason": f"{why}: token-level KD on the first {shared_rows:,} rows"}


# ---------------------------------------------------------------------------------------------- the stage


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return f"uid {os.getuid()}"


def _tokenizer_files(src: ModelSource) -> list[Path]:
    return [src.path] if src.is_gguf else [p for p in (src.folder / n for n in _TOKENIZER_FILES) if p.is_file()]


def _load_tokenizer(src: ModelSource, trust_remote_code: bool):
    """load_tokenizer, with any failure (the tokenizers library raises bare Exceptions on a corrupt
    tokenizer.json) as one line naming the files."""
    files = _tokenizer_files(src)
    if not files:
        raise StillhouseError(f"{src.folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); copy the "
                              "model's tokenizer into the folder")
    try:
        return load_tokenizer(src, trust_remote_code)
    except StillhouseError:
        raise
    except Exception as e:  # noqa: BLE001  (whatever the library raises, the user needs the file, not a traceback)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise StillhouseError(f"{', '.join(map(str, files))}: the tokenizer does not load ({first}); restore the "
                              "model's tokenizer files") from None


def _local_files(role: str, src: ModelSource) -> dict:
    """Which local files the check read a model's config and tokenizer from (for the offline self-test)."""
    config = f"{src.path} (GGUF metadata)" if src.is_gguf else str(src.folder / "config.json")
    return {"model": role, "config": config, "tokenizer": [str(p) for p in _tokenizer_files(src)]}


def offline_self_test(loaded: list[dict]) -> dict:
    """Whether offline mode is in force (the environment variables stillhouse sets, and what huggingface_hub
    read from them at import), plus `loaded`: what this check read from local files, per model."""
    import huggingface_hub.constants

    env = {v: os.environ.get(v) for v in _OFFLINE_VARS}
    hub = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    problems = [f"{v} is {val!r}, not '1'" for v, val in env.items() if val != "1"]
    if not hub:
        problems.append("huggingface_hub was imported before stillhouse set HF_HUB_OFFLINE, so it may reach the hub")
    return {"in_force": not problems, "env": env, "huggingface_hub_offline": hub, "problems": problems,
            "loaded_from_local_files": loaded}


def _model_files(src: ModelSource) -> list[Path]:
    """What the gates read: the model folder, or a GGUF file plus the model card / LICENSE beside it."""
    if not src.is_gguf:
        return [src.folder]
    return [src.path] + [p for p in (src.folder / n for n in ("README.md", *LICENSE_FILES)) if p.is_file()]


def run(cfg: Config) -> dict:
    """Run the three gates, write check/report.json + report.md, print a summary, return the manifest.
    Raises GateError (exit 1) after writing the report when a license or data-provenance gate says no, and
    StillhouseError (exit 2) when label.mode=token but the tokenizers need sequence-level KD."""
    teacher_src = resolve_model(cfg.teacher.model, cfg.workspace, cfg.teacher.sha256)
    student_src = resolve_model(cfg.student.model, cfg.workspace) if cfg.student.model else None
    if student_src is None and cfg.student.derive_layers is None:
        raise StillhouseError("stillhouse.yaml: set student.model (a model folder or .gguf) or student.derive_layers (e.g. 6)")
    train_path = cfg.workspace / "data" / "train.jsonl"
    inputs = _model_files(teacher_src) + (_model_files(student_src) if student_src else []) + ([train_path] if train_path.exists() else [])

    import psutil

    params = {
        "teacher": cfg.teacher.model,
        "student": cfg.student.model,
        "derive_layers": None if student_src else cfg.student.derive_layers,
        "derive_strategy": None if student_src else cfg.student.derive_strategy,
        "license": cfg.license.model_dump(mode="json"),
        "label": cfg.label.model_dump(mode="json", include={"mode", "batch_size", "max_seq_len", "max_new_tokens", "topk"}),
        "train": cfg.train.model_dump(mode="json", include={"batch_size", "grad_accum_steps", "precision", "lora", "loss_chunk_tokens"}),
        "serve_max_tokens": cfg.serve.max_tokens,
        "machine_ram_gb": round(psutil.virtual_memory().total / GB, 1),  # the plan's verdicts depend on it
        "tco": cfg.tco.model_dump(mode="json"),
        # only when asked for: otherwise every eval would make the next `run` re-check
        "measured_tokens_per_s": _measured_tokens_per_s(cfg) if cfg.tco.student_tokens_per_s == "measured" else None,
    }
    stage = StageRun(cfg, "check", inputs=inputs, params=params)
    if stage.previous:
        return stage.previous
    stops: list[str] = []

    # 1. licenses (a derived student is the teacher's derivative: same license, same decision)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    models = [("teacher", cfg.teacher.model, teacher_src)] + ([("student", cfg.student.model, student_src)] if student_src else [])
    licenses: dict = {}
    for role, ref, src in models:
        found = detect_license(src)
        licenses[role] = {"model": ref, **found, **license_decision(found["license"], cfg.license)}
    if student_src is None:
        teacher = licenses["teacher"]
        inherited = f"inherited from the teacher ({teacher['where']})" if teacher["where"] else None
        licenses["student"] = {**teacher, "model": f"derived from {cfg.teacher.model}", "where": inherited}
    acceptances = []
    for role, ref, _ in models:
        d = licenses[role]
        if d["verdict"] == "accepted":
            via = "license.non_commercial_use" if d["class"] == "non-commercial" else "license.accept"
            acceptances.append({"license": d["license"], "model": ref, "role": role, "accepted_via": via,
                                "accepted_at": now, "accepted_by": _os_user(), "host": platform.node()})
        elif d["verdict"] == "stop":
            where = f"found in {d['where']}" if d["where"] else "looked in " + ", ".join(d["looked_in"])
            stops.append(f"license gate: {role} {ref} is under {d['license'] or 'no known license'} ({where}): {d['reason']}; {d['fix']}")

    provenance = {"file": str(train_path) if train_path.exists() else None, "records": 0, "problems": []}
    if train_path.exists():
        records = read_jsonl(train_path)
        problems = check_data_provenance(records)
        provenance.update(records=len(records), problems=problems)
        if problems:
            stops.append(
                f"data provenance gate: {train_path}: {len(problems)} of {len(records)} records were written by a commercial API model "
                f"({problems[0]}); their terms forbid training competing models on their output: remove those records "
                "or regenerate the responses with the local teacher"
            )
    licenses["data_provenance"] = provenance
    licenses["acceptances"] = acceptances

    # 2. tokenizers and 3. memory, from configs only
    teacher_config = read_model_config(teacher_src, cfg.teacher.trust_remote_code)
    student_config = (read_model_config(student_src, cfg.student.trust_remote_code) if student_src
                      else derived_student_config(teacher_config, cfg.student.derive_layers, cfg.student.derive_strategy))
    t_shape = model_shape(teacher_config, f"{teacher_src.path} config")
    s_shape = model_shape(student_config, f"{student_src.path} config" if student_src else "derived student config")
    # The teacher's tokenizer is always loaded: it proves the model works offline and catches a broken tokenizer
    # before labeling does.
    teacher_tok = _load_tokenizer(teacher_src, cfg.teacher.trust_remote_code)
    loaded = [_local_files("teacher", teacher_src)]
    if student_src:
        student_tok = _load_tokenizer(student_src, cfg.student.trust_remote_code)
        loaded.append(_local_files("student", student_src))
        tokenizer = tokenizer_gate(teacher_tok, student_tok, t_shape["vocab"], s_shape["vocab"])
    else:
        # Same tokenizer and embedding matrix by construction.
        rows = t_shape["vocab"]
        tokenizer = {"mode": "token", "reason": "the student is derived from the teacher and shares its tokenizer and embeddings",
                     "vocab_teacher": rows, "vocab_student": rows, "rows_teacher": rows, "rows_student": rows, "shared_rows": rows,
                     "special_tokens_match": True, "chat_template_match": True, "warnings": []}
    tokenizer["label_mode"] = "sequence" if cfg.label.mode == "sequence" else tokenizer["mode"]
    mode_error = None
    if cfg.label.mode == "token" and tokenizer["mode"] == "sequence":
        mode_error = (f"label.mode is 'token', but the tokenizers do not allow token-level KD ({tokenizer['reason']}); "
                      "set label.mode: auto or sequence")

    hardware = hardware_plan(teacher_config, student_config, cfg)
    offline = offline_self_test(loaded)
    offline["trust_remote_code"] = {"teacher": cfg.teacher.trust_remote_code, "student": cfg.student.trust_remote_code}
    if not offline["in_force"]:
        stops.append(f"offline self-test: {'; '.join(offline['problems'])}: run stillhouse as `stillhouse ...` or "
                     "`python -m stillhouse`, which force offline mode before anything imports huggingface_hub")

    report = {
        "verdict": "stop" if stops or mode_error else "pass",
        "stops": stops + ([mode_error] if mode_error else []),
        "checked_at": now,
        "teacher": {"model": cfg.teacher.model, "path": str(teacher_src.path), "params": hardware["teacher"]["params"]},
        "student": {"model": cfg.student.model or (f"derived: teacher layers {student_config['_kept_layers']} of "
                                                   f"{t_shape['layers']} ({cfg.student.derive_strategy})"),
                    "path": str(student_src.path) if student_src else None, "params": hardware["student"]["params"]},
        "license": licenses,
        "tokenizer": tokenizer,
        "hardware": hardware,
        "offline": offline,
        "tco": tco(cfg.tco, params["measured_tokens_per_s"]),
    }
    atomic_write_json(stage.dir / "report.json", report)
    atomic_write_text(stage.dir / "report.md", _markdown(report))
    _print_summary(report)

    # The report is on disk; a "no" leaves no manifest, so the next run checks again.
    if stops:
        more = f" (and {len(stops) - 1} more)" if len(stops) > 1 else ""
        raise GateError(f"{stops[0]}{more}; see {stage.dir / 'report.md'}")
    if mode_error:
        raise StillhouseError(mode_error)
    return stage.finish(
        metrics={
            "teacher_params": hardware["teacher"]["params"],
            "student_params": hardware["student"]["params"],
            "label_mode": tokenizer["label_mode"],
            "peak_label_gb": hardware["phases"]["label_teacher"]["total_gb"],
            "peak_train_gb": hardware["phases"][hardware["configured_train"]]["total_gb"],
        },
        license=licenses,
        tokenizer=tokenizer,
        hardware=hardware,
        offline=offline,
    )


# ----------------------------------------------------------------------------------------------- output


def _measured_tokens_per_s(cfg: Config) -> float | None:
    """The student's generated tokens/s (batched) from eval's manifest, if eval has run."""
    ev = load_manifest(cfg.workspace, "eval") or {}
    return ev.get("metrics", {}).get("models", {}).get("student", {}).get("tokens_per_s_batched")


def _markdown(r: dict) -> str:
    lic, tok, hw = r["license"], r["tokenizer"], r["hardware"]
    lines = [
        "# stillhouse check",
        "",
        f"**Verdict: {r['verdict']}** ({r['checked_at']})",
        "",
        *[f"- STOP: {s}" for s in r["stops"]],
        "",
        f"Teacher: `{r['teacher']['model']}` ({r['teacher']['params'] / 1e6:,.1f}M parameters)  ",
        f"Student: `{r['student']['model']}` ({r['student']['params'] / 1e6:,.1f}M parameters)",
        "",
        "## License",
        "",
        "| model | license | where | class | verdict | reason |",
        "|---|---|---|---|---|---|",
    ]
    for role in ("teacher", "student"):
        d = lic[role]
        lines.append(f"| {role} | {d['license'] or 'none found'} | {d['where'] or '-'} | {d['class']} | {d['verdict']} | {d['reason']} |")
    for role in ("teacher", "student") if r["student"]["path"] else ("teacher",):  # a derived student inherits
        if lic[role].get("conflict"):
            lines.append(f"\n{role}: sources disagree: {lic[role]['conflict']}")
        if lic[role]["verdict"] == "stop":
            lines += ["", f"{role}: {lic[role]['fix']}. Looked in:", *[f"- {p}" for p in lic[role]["looked_in"]]]
    for a in lic["acceptances"]:
        lines.append(f"\nAccepted: {a['license']} for the {a['role']} ({a['accepted_via']}) "
                     f"by {a['accepted_by']} on {a['host']} at {a['accepted_at']}")
    prov = lic["data_provenance"]
    data = prov["file"] or "data/train.jsonl not present yet"
    lines += ["", f"Data provenance: {data}: {len(prov['problems'])} problem(s) in {prov['records']} records"]
    lines += [f"- {p}" for p in prov["problems"][:20]]
    lines += [
        "",
        "## Tokenizer",
        "",
        f"Mode: **{tok['mode']}** (label stage will use: {tok['label_mode']}). {tok['reason']}.",
        "",
        f"Vocabulary: teacher {tok['vocab_teacher']:,} tokens / {tok['rows_teacher']:,} rows, student {tok['vocab_student']:,} tokens / "
        f"{tok['rows_student']:,} rows; shared rows {tok['shared_rows']:,}.",
        *[f"- warning: {w}" for w in tok["warnings"]],
        "",
        f"## Memory (GB, {hw['precision']}; this machine: {hw['machine']['ram_gb']} GB RAM, {hw['machine']['ram_available_gb']} GB free)",
        "",
        "| phase | total | parts | " + " | ".join(f"{g} GB GPU" for g in GPU_SIZES_GB) + " | RAM |",
        "|---|---|---|" + "---|" * (len(GPU_SIZES_GB) + 1),
    ]
    for p in hw["phases"].values():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in p["parts_gb"].items())
        lines.append(f"| {p['title']} | {p['total_gb']:.2f} | {parts} | " + " | ".join(p["verdicts"].values()) + " |")
    lines += ["", "Suggestions:" if hw["suggestions"] else "Everything configured fits this machine."]
    lines += [f"- {s}" for s in hw["suggestions"]]
    off = r["offline"]
    lines += ["", "## Offline self-test", "",
              f"Offline mode in force: **{'yes' if off['in_force'] else 'NO'}** ("
              + ", ".join(f"{k}={v}" for k, v in off["env"].items()) + f"; huggingface_hub offline: {off['huggingface_hub_offline']}).",
              *[f"- problem: {p}" for p in off["problems"]],
              "", "Loaded from local files, without network:"]
    for m in off["loaded_from_local_files"]:
        lines.append(f"- {m['model']}: config from {m['config']}; tokenizer from {', '.join(m['tokenizer'])}")
    if not r["student"]["path"]:
        lines.append("- student: derived from the teacher (its config and tokenizer)")
    lines += [f"- trust_remote_code: teacher {off['trust_remote_code']['teacher']}, student {off['trust_remote_code']['student']}"]
    lines += ["", "Assumptions:", *[f"- {a}" for a in hw["assumptions"]], ""]
    lines += tco_markdown(r["tco"])
    return "\n".join(lines)


def _print_summary(r: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from stillhouse.ui import console

    color = {"pass": "green", "accepted": "yellow", "stop": "red"}
    gates = Table(title=f"stillhouse check: [{'green' if r['verdict'] == 'pass' else 'red'}]{r['verdict']}[/]", show_header=True)
    for col in ("gate", "result", "detail"):
        gates.add_column(col)
    for role in ("teacher", "student"):
        d = r["license"][role]
        detail = escape(f"{d['license'] or 'none found'} ({d['where'] or 'nowhere'})")
        gates.add_row(f"license ({role})", f"[{color[d['verdict']]}]{d['verdict']}[/]", detail)
    prov = r["license"]["data_provenance"]
    if prov["file"]:
        result = "[red]stop[/]" if prov["problems"] else "[green]pass[/]"
        gates.add_row("data provenance", result, f"{len(prov['problems'])} API-generated of {prov['records']} records")
    tok = r["tokenizer"]
    detail = f"{tok['mode']}: {tok['vocab_teacher']:,} / {tok['vocab_student']:,} tokens, {tok['shared_rows']:,} shared rows"
    gates.add_row("tokenizer", tok["label_mode"], detail)
    off = r["offline"]
    local = "; ".join(f"{m['model']}: config + tokenizer" for m in off["loaded_from_local_files"])
    gates.add_row("offline", "[green]in force[/]" if off["in_force"] else "[red]NOT in force[/]", escape(f"loaded from local files: {local}"))

    mem = Table(title="peak memory, GB")
    for col in ("phase", "GB", *[f"{g}GB" for g in GPU_SIZES_GB], "RAM"):
        mem.add_column(col)
    mark = {"fits": "[green]ok[/]", "tight": "[yellow]tight[/]", "no": "[red]no[/]"}
    for p in r["hardware"]["phases"].values():
        mem.add_row(p["title"], f"{p['total_gb']:.2f}", *[mark[v] for v in p["verdicts"].values()])

    console.print(gates)
    console.print(mem)
    for s in r["hardware"]["suggestions"]:
        console.print(f"[yellow]suggestion:[/] {escape(s)}")
    t = r["tco"]
    be = t["break_even_month"]
    console.print(f"cost per month ({t['currency']}): cloud API {t['cloud']['monthly']:,.0f}, on-premises "
                  f"{t['on_prem']['monthly']:,.0f} ({t['servers']} server(s)); break-even "
                  f"{'never' if be is None else f'month {be}'} (inputs: tco.* in report.md)")
    # stops are not repeated here: the CLI prints the GateError line, and report.md has them all
