"""export: the chosen student as a plain safetensors folder that transformers and vLLM load, with a model card
(license, lineage, metrics, redteam verdict) and a sha256 list of every file.

GGUF files (llama.cpp) for Llama-family students: f16, and the quantized variants q8_0 (8-bit blocks) and q4_0
(4-bit blocks; the embedding stays 8-bit). Each variant is loaded back (transformers dequantizes it, so its weights
are exactly the quantized ones) and answers the first `export.reeval_examples` labeled test records, greedy, like
the export itself: `export/quantization.json` and the manifest show each variant's task score, its retention
(variant score / export score) and how often its answer equals the export's. bitsandbytes/torchao variants for GPU
serving are not written: neither runs on this project's CPU machines, and a variant is only written if it can be
re-evaluated here. This stage never claims formats it did not write.

A student whose redteam verdict is "fail" is refused (exit 1) unless `export.allow_failed_redteam` is set; the
override is recorded in the export manifest and on the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from stillhouse.config import Config
from stillhouse.errors import GateError
from stillhouse.models import count_parameters, load_model, load_tokenizer, resolve_model, save_pretrained
from stillhouse.ui import console
from stillhouse.workspace import StageRun, atomic_write_text, load_manifest, require_manifest, sha256_file


def redteam_status(cfg: Config) -> dict:
    """The redteam verdict for the student being exported: {"verdict": pass | fail | not run, "reasons",
    "overridden"}. Refuses (GateError) a "fail" unless `export.allow_failed_redteam`."""
    red = load_manifest(cfg.workspace, "redteam") or {}
    status = {"verdict": red.get("verdict") or red.get("metrics", {}).get("verdict") or "not run",
              "reasons": red.get("verdict_reasons", []), "overridden": False}
    if status["verdict"] == "fail":
        if not cfg.export.allow_failed_redteam:
            why = "; ".join(status["reasons"]) or "see redteam/report.md"
            raise GateError(f"export: the student failed redteam ({why}); retrain it, or export anyway with "
                            "--set export.allow_failed_redteam=true (recorded in the manifest and model card)")
        status["overridden"] = True
    return status


def _card(cfg: Config, n_params: int, lineage: dict, red: dict) -> str:
    ws = cfg.workspace
    check = load_manifest(ws, "check") or {}
    ev = load_manifest(ws, "eval") or {}
    prep = load_manifest(ws, "prep") or {}
    lic = (check.get("license") or {})
    lines = [
        f"# {cfg.project}: distilled student", "",
        "Made by stillhouse, entirely on-premises.", "",
        "## Lineage", "",
        f"- teacher: `{cfg.teacher.model}`" + (" (adapted to the task first)" if cfg.teacher.adapt.enabled else ""),
        f"- student: {json.dumps(lineage)}",
        f"- parameters: {n_params:,}",
        f"- training data manifest: `{prep.get('fingerprint', 'n/a')}`",
        f"- license: {json.dumps(lic) if lic else 'see the check stage report'}", "",
        "## Evaluation", "",
        "```json", json.dumps(ev.get("metrics", {}), indent=2, default=str)[:4000], "```", "",
        "## Red team", "",
        f"- verdict: {red['verdict']}",
        *(f"- reason: {r}" for r in red["reasons"]),
        *(["- **exported despite the failed red team** (export.allow_failed_redteam=true)"] if red["overridden"] else []),
        "",
        "## Intended use and limits", "",
        "For the tasks in the training data only; outside them it is a small model with a small model's knowledge. "
        "Re-evaluate after any change of data or quantization.", "",
    ]
    return "\n".join(lines)


def run(cfg: Config) -> dict:
    """Write export/model/ (merged safetensors, tokenizer, chat template), README.md and SHA256SUMS."""
    ws = cfg.workspace
    require_manifest(ws, "train", "export")
    best = ws / "student" / "best"
    red = redteam_status(cfg)
    # the verdict is a parameter: a new redteam result must not be skipped as "up to date"
    test_split = ws / "data" / "test.jsonl"  # re-evaluated on: a new split must not be skipped as "up to date"
    run_ = StageRun(cfg, "export", inputs=[best] + ([test_split] if test_split.exists() else []),
                    params={"export": cfg.export.model_dump(), "redteam": red, "eval_max_new_tokens": cfg.eval.max_new_tokens})
    if run_.previous:
        console.print("export: up to date, skipped")
        return run_.previous
    src = resolve_model(str(best))
    model = load_model(src, cfg.export.dtype)
    tok = load_tokenizer(src)
    lineage = json.loads((best / "stillhouse.json").read_text()) if (best / "stillhouse.json").exists() else {}
    out = run_.dir / "model"
    save_pretrained(model, tok, out, {**lineage, "exported_dtype": cfg.export.dtype})
    n_params = count_parameters(model)
    atomic_write_text(out / "README.md", _card(cfg, n_params, lineage, red))
    formats = ["safetensors"]
    quantization = None
    if "gguf" in cfg.export.formats:
        ggufs = _write_gguf(cfg, out, lineage)
        formats += [f"gguf-{q}" for q in ggufs]
        quantization = _reeval(cfg, out, ggufs)
    sums = {str(p.relative_to(run_.dir)): sha256_file(p) for p in sorted(run_.dir.rglob("*"))
            if p.is_file() and p.parent.name in ("model", "gguf")}
    atomic_write_text(run_.dir / "SHA256SUMS", "".join(f"{h}  {name}\n" for name, h in sums.items()))
    size = sum(Path(run_.dir / n).stat().st_size for n in sums if n.startswith("model/"))
    warn = " [bold red]despite a failed redteam (allowed by export.allow_failed_redteam)[/bold red]" if red["overridden"] else ""
    console.print(f"export: {out} ({size / 1e6:.1f} MB, {cfg.export.dtype}){warn}")
    metrics = {"parameters": n_params, "bytes": size}
    if quantization:
        metrics["quantization"] = {q: {k: v[k] for k in ("score", "retention", "agreement", "bytes")}
                                   for q, v in quantization["variants"].items()}
    return run_.finish(metrics=metrics, files=sums, formats=formats, redteam=red)


def _write_gguf(cfg: Config, model_dir: Path, lineage: dict) -> dict[str, Path]:
    """export/gguf/student-{quant}.gguf for each configured quantization ({quant: path}); {} (with a note) for
    non-Llama students."""
    from stillhouse.gguf_export import write_gguf
    from stillhouse.licenses import gguf_metadata

    if json.loads((model_dir / "config.json").read_text()).get("model_type") != "llama":
        console.print("export: GGUF skipped: only Llama-family students are written as GGUF (safetensors is there)")
        return {}
    # llama.cpp picks its pre-tokenizer regex by name: take the teacher's when it came as GGUF (a derived student
    # shares its tokenizer)
    pre = "default"
    teacher = resolve_model(cfg.teacher.model, cfg.workspace, cfg.teacher.sha256)
    if teacher.is_gguf and cfg.student.model is None:
        pre = gguf_metadata(teacher.path).get("tokenizer.ggml.pre", "default")
    license_id = ((load_manifest(cfg.workspace, "check") or {}).get("license") or {}).get("student", {}).get("license")
    written = {}
    for quant in cfg.export.gguf_quants:
        info = write_gguf(model_dir, model_dir.parent / "gguf" / f"student-{quant}.gguf", quant=quant,
                          license=license_id, name=f"{cfg.project} student", tokenizer_pre=pre)
        console.print(f"export: {info['path']} ({info['bytes'] / 1e6:.1f} MB)")
        written[quant] = Path(info["path"])
    return written


def _reeval(cfg: Config, model_dir: Path, ggufs: dict[str, Path]) -> dict | None:
    """Answer the first `export.reeval_examples` labeled test records with the export and with each GGUF variant
    (greedy, `eval.max_new_tokens`); score them as the eval stage does for classification (exact label) and with
    token F1 otherwise. Writes export/quantization.json; None when there is nothing to measure."""
    from stillhouse import metrics as M
    from stillhouse.models import ModelSource
    from stillhouse.records import encode_prompt, generate, response_text
    from stillhouse.workspace import atomic_write_json, read_jsonl

    test_path = cfg.workspace / "data" / "test.jsonl"
    n = cfg.export.reeval_examples
    if not n or not ggufs or not test_path.exists():
        return None
    records = [r for r in read_jsonl(test_path) if response_text(r)][:n]
    if not records:
        return None
    tok = load_tokenizer(resolve_model(str(model_dir)))
    prompts = [encode_prompt(tok, r) for r in records]

    def answer(src) -> list[str]:
        return generate(load_model(src), tok, prompts, cfg.eval.max_new_tokens, batch_size=32)

    def score(outputs: list[str]) -> float:
        per = [float(M.normalize_prediction(o) == response_text(r).strip()) if r["task"] == "classification"
               else M.token_f1(o, response_text(r)) for r, o in zip(records, outputs)]
        return sum(per) / len(per)

    console.print(f"export: re-evaluating {len(ggufs)} GGUF variant(s) on {len(records)} test records")
    reference = answer(resolve_model(str(model_dir)))
    base = score(reference)
    variants = {}
    for quant, path in ggufs.items():
        outs = answer(ModelSource(path.parent, path.name))
        s = score(outs)
        variants[quant] = {"score": round(s, 4), "retention": round(s / base, 4) if base else None,
                           "agreement": round(sum(a == b for a, b in zip(outs, reference)) / len(outs), 4),
                           "bytes": path.stat().st_size, "outputs": outs}
        console.print(f"export: {quant}: score {s:.3f} (export {base:.3f}), same answer as the export on "
                      f"{variants[quant]['agreement']:.0%} of records")
    result = {"records": [r["id"] for r in records], "metric": "classification: exact label; other tasks: token F1",
              "max_new_tokens": cfg.eval.max_new_tokens, "export_score": round(base, 4), "export_outputs": reference,
              "variants": variants}
    atomic_write_json(model_dir.parent / "quantization.json", result)
    return result
