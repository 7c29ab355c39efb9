"""The one config: `stillhouse.yaml`, validated by typed models.

Precedence: defaults < YAML < `--set key=value` (values parsed as YAML). Unknown keys and bad values are
errors naming the key and what is allowed. Every stage reads its own section; the resolved config is saved
in each stage's manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from stillhouse.errors import StillhouseError
from stillhouse.pii import KINDS  # standard library only at import time

CONFIG_NAME = "stillhouse.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdaptConfig(Section):
    """Fine-tune the teacher on the task first (cross-entropy on labeled train records), so it is a good teacher."""

    enabled: bool = False
    steps: int = Field(60, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    tasks: list[str] | None = Field(None, description="adapt on these record tasks only (e.g. [classification]); null: all")


class TeacherConfig(Section):
    """The large model whose behaviour the student learns."""

    model: str = Field("asset:smollm2-135m-instruct", description="HF folder, .gguf file, or asset:NAME")
    sha256: str | None = Field(None, description="expected sha256 of a .gguf file (checked before use)")
    trust_remote_code: bool = False
    adapt: AdaptConfig = AdaptConfig()


class StudentConfig(Section):
    """The small model. Either `model` (a folder/GGUF) or `derive_layers` (keep that many teacher layers)."""

    model: str | None = None
    derive_layers: int | list[int] | None = Field(
        6, description="derive the student from the teacher by keeping N of its layers (or these indices)"
    )
    derive_strategy: Literal["uniform", "first-last"] = Field(
        "uniform", description="which N layers: uniform (evenly spaced, first and last included) or first-last (first N/2, last N/2)"
    )
    trust_remote_code: bool = False


class LicenseConfig(Section):
    """License gate decisions, recorded in the check manifest."""

    accept: list[str] = Field(default_factory=list, description="custom licenses accepted by name, e.g. [gemma, llama3]")
    non_commercial_use: bool = Field(False, description="declare that this project is non-commercial (cc-by-nc-*)")


class TableMapping(Section):
    """How rows of a CSV/JSONL file become records."""

    pattern: str = Field(description="glob matched against source file names (or paths, if it has a '/'), e.g. 'intents*.jsonl'")
    task: Literal["classification", "qa", "summarization", "extraction", "text"] = "classification"
    input: str = Field("text", description="column holding the input text (the user turn)")
    output: str | None = Field("label", description="column holding the answer; empty or missing -> unlabeled (the teacher labels it)")
    system_prompt: str | None = Field(None, description="system message put before every record of this table")


class CanaryConfig(Section):
    """Secret canaries (Carlini et al., "The Secret Sharer"): random secrets planted in train.jsonl so redteam
    can measure how much the student memorizes. Recorded in data/canaries_private.json, never in val/test."""

    enabled: bool = False
    repetitions: list[int] = Field(
        default_factory=lambda: [0, 1, 10, 50],
        description="one canary per entry, inserted that many times into train; 0: a control that is recorded but "
                    "never inserted (its exposure shows what 'not memorized' looks like)")
    count: int = Field(1, ge=1, description="canaries per entry of `repetitions`")
    template: str = Field("my PIN is {secret}", pattern=r"\{secret\}",
                          description="the canary text; {secret} is replaced by random digits")
    digits: int = Field(6, ge=4, le=12, description="digits in the secret: 10**digits possible secrets")
    seed: int = Field(0, description="seeds the secrets (a different seed gives different canaries)")


class GeneralConfig(Section):
    """General-purpose instruction data mixed into train, so the student keeps its basic language ability while it
    specializes; a held-out part goes to test, where eval reports the student's perplexity on it (forgetting)."""

    share: float = Field(0.0, ge=0, lt=1, description="share of the train split that is general data (0: off)")
    file: str | None = Field(
        None, description="JSONL of general data (a 'messages' list, or 'prompt' + optional 'response'); null: the "
                          "bundled general prompts, answered by the teacher in `label` (self-distilled replay)")
    test_records: int = Field(20, ge=0, description="general records held out for test.jsonl (with a reference response)")
    seed: int = Field(0, description="seeds which general records go to train and which to test")


class DocumentQAConfig(Section):
    """Question-answer pairs the teacher writes from each document section (stillhouse.docqa): it reads the masked
    section, writes questions the section answers, then answers them from the section; pairs whose question or
    answer is not grounded in the section are dropped and counted. Needs `teacher.model` (loaded during prep)."""

    enabled: bool = Field(False, description="ask the teacher for QA pairs from each document section")
    questions_per_section: int = Field(2, ge=1, le=20, description="questions asked per section (sampled when > 1)")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature of the questions when more than one is asked")
    max_new_tokens: int = Field(64, ge=8, le=1024, description="longest question or answer, in tokens")
    min_overlap: float = Field(
        0.5, ge=0, le=1, description="share of a question's / answer's content words that must occur in the section")
    keep_sections: bool = Field(True, description="also keep the section records themselves (task text)")
    batch_size: int = Field(16, ge=1, description="sections per teacher batch (and per resume checkpoint)")
    seed: int = Field(0, description="seeds the sampled questions (per section and sample, so a resumed run asks the same)")


class ReidentConfig(Section):
    """Re-identification risk (stillhouse.reident): records whose combination of quasi-identifiers (a date + an
    age + a job title ...) fewer than k records share. Listed in data/reident.csv (kinds, never values)."""

    enabled: bool = True
    k: int = Field(5, ge=2, description="a combination shared by fewer records than this is a risk")
    action: Literal["report", "generalize", "drop"] = Field(
        "report", description="report: list them (and show them first in the review sample); generalize: date -> "
                              "year, age -> decade, postcode -> prefix, title/department/place -> [KIND]; drop: leave them out")
    quasi_identifiers: list[Literal["DATE", "AGE", "POSTCODE", "JOB_TITLE", "DEPARTMENT", "PLACE"]] = Field(
        default_factory=lambda: ["DATE", "AGE", "POSTCODE", "JOB_TITLE", "DEPARTMENT", "PLACE"])
    min_kinds: int = Field(2, ge=1, description="records with fewer different QI kinds are not assessed (a date alone is everywhere)")


class SourceDeclaration(Section):
    """Why a source was collected and on what legal basis it may be used for training (PDPA, APPI, GDPR)."""

    pattern: str = Field(description="source files it covers: a glob on the file name, or on the path from the workspace "
                                     "if it has a '/' (sources/hr/*), or a folder (sources/hr)")
    purpose: str = Field(min_length=1, description="the purpose the data was collected for, in words an auditor reads")
    legal_basis: Literal["consent", "contract", "legal_obligation", "vital_interest", "public_task",
                         "legitimate_interest", "research_statistics", "anonymized", "not_personal_data"] = Field(
        description="the lawful basis for using it to train a model")
    reference: str | None = Field(None, description="where the basis is documented: a consent form, a DPIA, a contract number")


SENSITIVITY_LEVELS = ("public", "internal", "confidential", "secret")  # lowest first: a record's `sensitivity`
PII_ACTIONS = ("mask", "pseudonymize", "keep", "drop")


def _level_alias(value: Any) -> Any:
    return "secret" if value == "restricted" else value  # the top level's name before issue #7: old configs load


Level = Annotated[Literal["public", "internal", "confidential", "secret"], BeforeValidator(_level_alias)]


class FolderLevel(Section):
    """Every record from the files a pattern covers is at least this level."""

    pattern: str = Field(description="a glob on the file name, or on the path from the workspace if it has a '/' "
                                      "(sources/hr/*), or a folder (sources/hr)")
    level: Level


class SensitivityConfig(Section):
    """Confidentiality labels: a record's level is the highest of its document's and its own markers, its
    folder's rule and its PII density (else `default`); records above prep.max_sensitivity are left out and
    listed in data/report.json."""

    builtin_markers: bool = Field(
        True, description="the built-in stamps: CONFIDENTIAL, 'Classification: Secret', TOP SECRET, 社外秘, 極秘, ลับ, ...")
    markers: dict[Level, list[str]] = Field(
        default_factory=dict, description="more markers per level, matched as written (case-sensitive; one that starts "
                                          "or ends with a Latin letter or digit not inside a longer word), e.g. "
                                          "{secret: ['Project Falcon'], confidential: [部外秘]}")
    folders: list[FolderLevel] = Field(default_factory=list, description="e.g. [{pattern: sources/hr, level: confidential}]")
    pii_density: dict[Level, float] = Field(
        default_factory=lambda: {"confidential": 0.0},
        description="a record holding PII is at least the highest level whose value here (PII values per 1,000 "
                    "characters) it reaches; {confidential: 0}: any PII -> confidential")
    default: Level = Field("internal", description="the level of a record nothing above says more about")

    @field_validator("pii_density")
    @classmethod
    def _non_negative(cls, v: dict) -> dict:
        bad = [f"{k}: {x}" for k, x in v.items() if x < 0]
        if bad:
            raise ValueError(f"PII values per 1,000 characters must be >= 0 ({', '.join(bad)})")
        return v


class PiiModelConfig(Section):
    """A local NER model whose spans are added to the rule-based PII finder's (stillhouse.pii_model). Never downloaded."""

    kind: Literal["transformers", "spacy"] = Field(
        description="transformers: a token-classification model folder (safetensors); spacy: a spaCy pipeline "
                    "folder or installed package (needs `pip install spacy`)")
    path: str = Field(description="the model folder (relative to the workspace), or an installed spaCy package name")
    labels: dict[str, Literal[tuple(KINDS)]] = Field(
        default_factory=lambda: {"PER": "PERSON", "PERSON": "PERSON"},
        description="model entity label (B-/I- prefixes dropped) -> PII kind; other labels are ignored")
    min_score: float = Field(0.5, ge=0, le=1, description="transformers: lowest token probability that counts")
    batch_size: int = Field(16, ge=1, description="texts per forward pass")


class PrepConfig(Section):
    """Turn documents and tickets into instruction-response records."""

    sources: list[str] = Field(default_factory=lambda: ["sources"], description="files/folders, relative to the workspace")
    tables: list[TableMapping] = Field(default_factory=list, description="CSV/JSONL files without a matching entry are quarantined")
    min_chars: int = Field(20, ge=0, description="document sections shorter than this are dropped (table rows are kept)")
    boilerplate_min_docs: int = Field(
        3, ge=2, description="a short paragraph (<= 200 chars) found in this many documents is boilerplate and dropped")
    max_file_mb: float = Field(200, gt=0, description="larger files are quarantined without being read")
    workers: int | None = Field(None, ge=1, description="processes that extract files; null: one per CPU core")
    ocr: bool = Field(True, description="OCR PDF pages without a text layer with tesseract, when it is installed")
    ocr_languages: str = Field("eng", description="tesseract languages, e.g. eng+jpn+tha (their language data must be installed)")
    chunk_chars: int = Field(600, ge=100, description="documents are cut into sections of about this many characters")
    near_dup_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity above which texts are near-duplicates")
    pii_action: str | dict[str, str] = Field(
        "mask", description="mask -> [EMAIL]...; pseudonymize -> consistent fake values (keyed by the workspace "
                            "secret); keep -> as is; drop -> leave out every record holding one. One action, or per "
                            "kind: {default: mask, EMAIL: pseudonymize, CARD: drop} (originals of kept records always "
                            "go to data/pii_private.json)")
    pii_model: PiiModelConfig | None = Field(None, description="optional NER model backend; null: rules only")
    max_sensitivity: Level = Field(
        "confidential", description="records labelled above this are left out (public < internal < confidential < "
                                    "secret; `restricted` is read as secret)")
    sensitivity: SensitivityConfig = SensitivityConfig()
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of labeled records for validation")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of labeled records for test")
    review_sample_size: int = Field(
        50, ge=0, description="records sampled, stratified by task and file type, into data/review.csv and review.html for a person to read")
    seed: int = Field(0, description="seeds the split and the review sample")
    canaries: CanaryConfig = CanaryConfig()
    general: GeneralConfig = GeneralConfig()
    reident: ReidentConfig = ReidentConfig()
    document_qa: DocumentQAConfig = DocumentQAConfig()
    data_use: list[SourceDeclaration] = Field(
        default_factory=list, description="the data-use register: purpose and legal basis per source (data/register.md)")
    require_legal_basis: bool = Field(False, description="refuse to run while a source file has no prep.data_use entry")

    @field_validator("pii_action")
    @classmethod
    def _check_pii_action(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        allowed = ", ".join(PII_ACTIONS)
        if isinstance(v, str):
            if v not in PII_ACTIONS:
                raise ValueError(f"{v!r} is not an action; allowed: {allowed}, or a mapping kind -> action")
            return v
        for kind, action in v.items():
            if kind != "default" and kind not in KINDS:
                raise ValueError(f"prep.pii_action.{kind}: unknown PII kind; kinds: default, {', '.join(KINDS)}")
            if action not in PII_ACTIONS:
                raise ValueError(f"prep.pii_action.{kind}: {action!r} is not an action; allowed: {allowed}")
        return v


class LabelConfig(Section):
    """Capture the teacher's soft labels once."""

    mode: Literal["auto", "token", "sequence"] = Field("auto", description="auto: token-level if tokenizers match")
    topk: int = Field(32, ge=1)
    temperature: float = Field(2.0, gt=0)
    batch_size: int = Field(16, ge=1)
    max_seq_len: int = Field(256, ge=8)
    on_too_long: Literal["truncate", "refuse"] = Field(
        "truncate", description="records longer than max_seq_len: cut the prompt from the left (counted in the "
                                "manifest), or stop with an error naming the record")
    records_per_shard: int = Field(256, ge=1)
    generate_unlabeled: bool = Field(True, description="teacher writes responses for records without one")
    max_new_tokens: int = Field(16, ge=1)
    precision: Literal["bf16", "fp32"] = Field("bf16", description="teacher forward: bf16 autocast (fast) or fp32")
    generation_temperature: float = Field(
        0.0, ge=0, description="teacher-written responses: 0 = greedy, > 0 = sampled at this temperature "
                               "(not the soft-label `temperature`)")
    top_p: float = Field(1.0, gt=0, le=1, description="sampled responses: nucleus (top-p) cut-off; 1 = off")
    seed: int = Field(0, description="seeds sampling; each record's draw depends only on (seed, record id, sample)")
    responses_per_prompt: int = Field(
        1, ge=1, description="teacher-written responses per unlabeled record (> 1 needs generation_temperature > 0)")


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names that get adapters, e.g. [q_proj, v_proj]; all-linear: every linear "
                                  "layer but the LM head")


class HiddenAlignmentConfig(Section):
    """Intermediate-layer alignment: pull the student's hidden states towards the teacher's (FitNets-style). Needs
    the teacher's hidden states, so train.teacher_signal=online (offline soft labels hold only log-probabilities)."""

    enabled: bool = False
    layer_map: dict[int, int] | Literal["uniform"] = Field(
        "uniform", description="{student_layer: teacher_layer}, 0-based; uniform: student layer i of S <- teacher "
                               "layer round((i + 1) * T / S) - 1 (the last to the last)")
    loss: Literal["mse", "cosine"] = Field("mse", description="mse, or cosine (1 - cosine similarity), per token")
    weight: float = Field(1.0, ge=0, description="loss += weight * (mean over the mapped layers)")


class AssistantConfig(Section):
    """Teacher-assistant chain (Mirzadeh et al., 2020): distill teacher -> assistant first, then assistant ->
    student with the assistant as an online teacher. Off unless `derive_layers` or `model` is set."""

    derive_layers: int | None = Field(None, ge=1, description="derive the assistant from the teacher by keeping N layers")
    model: str | None = Field(None, description="or an assistant model folder (same tokenizer as the teacher)")
    steps: int | None = Field(None, ge=1, description="optimizer steps of the teacher -> assistant phase (null: train.steps)")


class OptunaSweepConfig(Section):
    """`train.sweep.method=optuna`: the [low, high] ranges optuna's TPE sampler searches (seeded by train.seed;
    `pip install 'stillhouse[sweep]'`). Temperatures stay the list train.sweep.temperature, searched as choices:
    each one costs a pass of the teacher."""

    n_trials: int = Field(12, ge=1, description="trials in the study, counting those an interrupted sweep finished")
    alpha: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = Field(
        (0.0, 0.9), description="[low, high] of the KD weight")
    learning_rate: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (3e-5, 3e-3), description="[low, high] of the peak learning rate, searched on a log scale")
    lora_r: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="[low, high] LoRA rank, log scale (needs train.lora.enabled); null: train.lora.r")
    lora_alpha: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="[low, high] LoRA alpha (needs train.lora.enabled); null: train.lora.alpha")
    pruner: Literal["none", "median"] = Field(
        "none", description="median: stop a trial whose validation score at an evaluation is below the median of the "
                            "finished trials' at that step (not before max(2, n_trials // 4) trials finished, "
                            "nor at a trial's last step)")

    @field_validator("alpha", "learning_rate", "lora_r", "lora_alpha")
    @classmethod
    def _low_le_high(cls, v):
        if v is not None and v[0] > v[1]:
            raise ValueError(f"a range is [low, high] with low <= high (equal fixes the value), not {list(v)}")
        return v


class SweepConfig(Section):
    """`stillhouse train --sweep`: short trainings (other train settings as configured), ranked by the validation
    task metric: one per point of the grid temperature x alpha x learning_rate (x LoRA rank x LoRA alpha), or
    train.sweep.optuna.n_trials that optuna picks."""

    method: Literal["grid", "optuna"] = Field(
        "grid", description="grid: every combination of the lists here; optuna: a TPE search within train.sweep.optuna's "
                            "ranges (pip install 'stillhouse[sweep]')")
    temperature: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1.0, 2.0], min_length=1,
        description="KD temperatures (optuna chooses among them); one other than label.temperature relabels "
                    "with the teacher once (cached)")
    alpha: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.5, 0.9], min_length=1,
        description="KD weights; 0 is the cross-entropy baseline (one trial, whatever the temperature)")
    learning_rate: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3], min_length=1, description="peak learning rates")
    lora_r: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="LoRA ranks (needs train.lora.enabled); empty: train.lora.r")
    lora_alpha: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="LoRA alphas (needs train.lora.enabled); empty: train.lora.alpha")
    steps: int = Field(40, ge=1, description="optimizer steps per trial (short: trials rank settings, they are not the final run)")
    evals: int = Field(2, ge=1, description="validation evaluations per trial; a trial scores its best one")
    optuna: OptunaSweepConfig = OptunaSweepConfig()


class TrainConfig(Section):
    """The distillation loop."""

    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term; (1 - alpha) weights cross-entropy. "
                                                     "1 (pure KD) is allowed but warned about: without any CE "
                                                     "students tend to collapse into repetition")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "total_variation", "skew_forward_kl", "skew_reverse_kl"] = Field(
        "forward_kl", description="KD divergence over the teacher's top-k + tail (see stillhouse.losses)")
    jsd_beta: float = Field(0.5, ge=0, le=1)
    skew_alpha: float = Field(0.1, ge=0, le=1, description="skew KL mixture weight (0: plain KL)")
    precision: Literal["bf16", "fp32"] = "bf16"
    eval_every_steps: int = Field(25, ge=1)
    early_stopping_patience: int = Field(0, ge=0, description="stop after N evals without improvement (0: never)")
    keep_checkpoints: int = Field(2, ge=1)
    loss_chunk_tokens: int = Field(
        256, ge=16, description="tokens per chunk of LM head + loss (256: 0.08x the naive loss memory at V=49,152)")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="after the warm-up: cosine or linear decay to final_lr_ratio * learning_rate, or constant")
    final_lr_ratio: float = Field(0.1, ge=0, le=1, description="the learning rate at the last step, as a share of the peak")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (matrices only, not norms/biases)")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0: no clipping)")
    teacher_signal: Literal["offline", "online"] = Field(
        "offline", description="offline: the top-k soft labels in labels/; online: the teacher runs inside the loop "
                               "(all V tokens, dense; it must fit in memory next to the student)")
    hidden_alignment: HiddenAlignmentConfig = HiddenAlignmentConfig()
    assistant: AssistantConfig = AssistantConfig()
    tensorboard: bool = Field(True, description="also write student/tensorboard/ event files when tensorboard is installed")
    lora: LoraConfig = LoraConfig()
    sweep: SweepConfig = SweepConfig()
    seed: int = 0


class EvalConfig(Section):
    """Compare teacher, student and baselines on the test split."""

    max_examples: int = Field(200, ge=1)
    min_retention: float = Field(0.0, ge=0, description="gate: student score / teacher score per task")
    max_new_tokens: int = Field(16, ge=1)
    bootstrap_samples: int = Field(1000, ge=0)
    baselines: list[str] = Field(default_factory=list, description="more model folders to evaluate the same way")
    max_latency_ms_p95: float | None = Field(None, gt=0, description="gate: student latency p95 at batch 1, ms")
    latency_requests: int = Field(5, ge=1, description="requests timed one by one for latency (after a warm-up)")
    max_seq_len: int = Field(512, ge=8, description="tokens per record for perplexity (prompt cut from the left)")
    seed: int = Field(0, description="seeds the per-task sample and the bootstrap")


class RedteamConfig(Section):
    """Does the student leak training secrets or PII?"""

    max_probes: int = Field(50, ge=0)
    max_new_tokens: int = Field(24, ge=1)
    fail_on_leak: bool = Field(True, description="a 'fail' verdict stops the command with exit 1 (else: recorded only)")
    max_exposure: float | None = Field(
        10.0, gt=0, description="verdict fails when a planted canary's exposure (bits) exceeds this; null: not gated")
    canary_candidates: int = Field(10000, ge=10000, description="random secrets each canary is ranked against")
    max_mia_auc: float | None = Field(
        0.75, gt=0.5, le=1, description="verdict fails when the loss-based membership-inference AUC exceeds this; null: not gated")
    mia_samples: int = Field(200, ge=0, description="train and held-out records each, per task, for membership inference")
    verbatim_samples: int = Field(50, ge=0, description="train records probed for verbatim regurgitation")
    verbatim_threshold: float = Field(
        0.8, gt=0, le=1, description="ROUGE-L vs the training response above which an output counts as a verbatim copy"
    )
    seed: int = 0


class ExportConfig(Section):
    """The student for production."""

    formats: list[Literal["safetensors", "gguf"]] = Field(
        default_factory=lambda: ["safetensors", "gguf"],
        description="safetensors (transformers, vLLM) always; gguf (llama.cpp) for Llama-family students")
    gguf_quants: list[Literal["f16", "q8_0", "q4_0"]] = Field(
        default_factory=lambda: ["f16", "q8_0", "q4_0"],
        description="GGUF files to write; q8_0 and q4_0 are the quantized variants (8-bit, 4-bit blocks)")
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    reeval_examples: int = Field(
        50, ge=0, description="test records answered by the export and by each quantized GGUF (loaded back, greedy) "
                               "to measure what quantization costs; 0: skip")
    allow_failed_redteam: bool = Field(
        False, description="export a student whose redteam verdict is 'fail' (recorded in the manifest and model card)")


class ServeConfig(Section):
    """The OpenAI-compatible HTTP API over export/model."""

    host: str = Field("127.0.0.1", description="address to bind; anything but loopback requires API keys")
    port: int = Field(8000, ge=0, le=65535)
    model_name: str = Field("student", description="the `model` clients send")
    max_tokens: int = Field(256, ge=1, description="most new tokens one request may ask for (also the default)")
    max_prompt_chars: int = Field(8000, ge=1, description="longer prompts are refused with 400")
    no_auth: bool = Field(False, description="serve without API keys (refused unless host is loopback)")
    max_concurrent_requests: int = Field(32, ge=1, description="requests in flight; more are refused with 429")
    max_batch_size: int = Field(16, ge=1, description="requests decoded together in one batch")
    batch_window_ms: float = Field(5.0, ge=0, description="how long the batcher waits for more requests to join")


class MonitorConfig(Section):
    """Drift between production requests (serve/requests.jsonl) and the training data; `monitor --redistill`."""

    drift_threshold: float = Field(0.2, gt=0, description="population stability index above which inputs drifted")
    min_requests: int = Field(5, ge=1, description="fewer requests than this -> verdict 'insufficient data'")
    window_requests: int = Field(1000, ge=1, description="only the most recent N requests are compared")
    oov_margin: float = Field(
        0.1, gt=0, le=1, description="out-of-vocabulary word rate this far above the val split's counts as drift"
    )
    false_alarm_rate: float = Field(
        0.01, gt=0, lt=1, description="chance that a window of ordinary traffic is called drift (all checks together, Bonferroni)")
    embedding_sample: int = Field(
        500, ge=0, description="requests and train inputs each (at most) for the embedding test on the student's hidden states; 0: off")
    labeled_requests: str | None = Field(
        None, description="JSONL of requests with labels from people (records, or log rows with a `label`): accuracy drift")
    accuracy_margin: float = Field(
        0.05, gt=0, le=1, description="accuracy on labeled requests this far below the student's test accuracy counts as drift")
    redistill_max_regression: float = Field(
        0.02, ge=0, le=1, description="--redistill: the candidate may score at most this much below the current student per task")
    redistill_steps: int | None = Field(None, ge=1, description="--redistill: training steps for the candidate (null: train.steps)")


class TcoConfig(Section):
    """Total cost of ownership in the check report: the student on your own server vs a cloud API, per month,
    per million tokens, and the break-even month. Every input is echoed in the report; override with --set tco.x=..."""

    currency: str = Field("USD", description="label only: every price below is in this currency")
    requests_per_day: float = Field(10000, ge=0)
    tokens_per_request: float = Field(600, ge=0, description="prompt + response tokens per request (what a cloud API bills)")
    response_tokens_per_request: float = Field(100, ge=0, description="generated tokens per request (what sizes the server)")
    peak_to_average: float = Field(3.0, ge=1, description="peak traffic / average traffic: servers are sized for the peak")
    cloud_price_per_million_tokens: float = Field(1.0, ge=0, description="the cloud API's price, blended over prompt and response")
    server_price: float = Field(30000, ge=0, description="purchase price of one GPU server")
    lifetime_months: int = Field(36, ge=1, description="months over which the server is written off")
    power_watts: float = Field(1000, ge=0, description="average power draw of one server, W")
    electricity_price_per_kwh: float = Field(0.25, ge=0)
    operations_per_month: float = Field(0, ge=0, description="staff, rack space, support per month (all servers)")
    student_tokens_per_s: Annotated[float, Field(gt=0)] | Literal["measured"] | None = Field(
        None, description="generated tokens/s of one server with the student: a planned number; 'measured': eval's "
                          "tokens/s (batched, on the machine eval ran on); null: one server is assumed to suffice")


class LadderConfig(Section):
    """`stillhouse ladder`: distill several student sizes with the same budget and plot accuracy against latency."""

    rungs: list[int | str] = Field(
        default_factory=lambda: [2, 4, 6],
        description="one student per entry: a number of teacher layers to keep (derived) or a model folder")


class Config(Section):
    """Everything a workspace needs. `workspace` is filled in by the loader, not read from YAML."""

    project: str = "stillhouse"
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    license: LicenseConfig = LicenseConfig()
    prep: PrepConfig = PrepConfig()
    label: LabelConfig = LabelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    redteam: RedteamConfig = RedteamConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    tco: TcoConfig = TcoConfig()
    ladder: LadderConfig = LadderConfig()

    workspace: Path = Field(Path("."), exclude=True)

    def path(self, p: str | Path) -> Path:
        """A path from the config, resolved against the workspace."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else self.workspace / p


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """`["train.steps=50", "license.accept=[gemma]"]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise StillhouseError(f"--set {item!r}: expected section.key=value, e.g. --set train.steps=50")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), str) and k in WORD_OR_MAPPING:
            merged[k] = {"default": merged[k]}  # `pii_action: pseudonymize` + --set prep.pii_action.CARD=drop
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


WORD_OR_MAPPING = {"pii_action"}  # settings that are one word or a {default: word, KIND: word} mapping


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at `loc` (the parent of an unknown key)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(k for k, f in model.model_fields.items() if not f.exclude)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc[:-1])
            lines.append(f"{source}: unknown key '{key}'; allowed here: {', '.join(allowed)}")
        else:
            lines.append(f"{source}: '{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def validate(data: dict, workspace: Path, source: str) -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise StillhouseError(format_validation_error(err, source)) from None
    cfg.workspace = workspace
    return cfg


def load_config(workspace: str | Path = ".", overrides: list[str] | None = None, *, required: bool = True) -> Config:
    """Read `WORKSPACE/stillhouse.yaml`, apply `--set` overrides, validate."""
    workspace = Path(workspace).expanduser().resolve()
    path = workspace / CONFIG_NAME
    data: dict = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise StillhouseError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix it or re-create it with `stillhouse init`") from None
        if not isinstance(data, dict):
            raise StillhouseError(f"{path}: expected a mapping of sections (teacher:, student:, ...); re-create it with `stillhouse init`")
    elif required:
        raise StillhouseError(f"{path} not found; create one with `stillhouse -w {workspace} init`")
    return validate(_merge(data, parse_overrides(overrides)), workspace, str(path.name) + (" + --set" if overrides else ""))


def config_yaml_template() -> str:
    """A commented stillhouse.yaml with every section and its defaults."""
    lines = [
        "# stillhouse.yaml: the one config of this workspace. Every stage reads its own section.",
        "# Precedence: defaults < this file < `--set section.key=value` on the command line.",
        "# Unknown keys are errors. Paths are relative to this folder.",
        "",
    ]
    defaults = Config().model_dump(mode="json")

    def emit(model: type[BaseModel], data: dict, indent: int) -> None:
        pad = "  " * indent
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            value = data[name]
            doc = field.description
            ann = field.annotation
            sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if sub is not None and isinstance(value, dict):
                if sub.__doc__ and indent == 0:
                    lines.append(f"{pad}# {sub.__doc__.strip().splitlines()[0]}")
                lines.append(f"{pad}{name}:")
                emit(sub, value, indent + 1)
                if indent == 0:
                    lines.append("")
                continue
            rendered = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()[1:-1]
            lines.append(f"{pad}{rendered}" + (f"  # {doc}" if doc else ""))

    emit(Config, defaults, 0)
    return "\n".join(lines).rstrip() + "\n"
