"""export: the chosen student as a plain safetensors folder that transformers and vLLM load, with a model card
(license, lineage, metrics, redteam verdict) and a sha256 list of every file.

GGUF and quantized variants are a later issue (see docs); this stage never claims formats it did not write.
"""

from __future__ import annotations

import json
from pathlib import Path

from stillhouse.config import Config
from stillhouse.models import count_parameters, load_model, load_tokenizer, resolve_model, save_pretrained
from stillhouse.ui import console
from stillhouse.workspace import StageRun, atomic_write_text, load_manifest, require_manifest, sha256_file


def _card(cfg: Config, n_params: int, lineage: dict) -> str:
    ws = cfg.workspace
    check = load_manifest(ws, "check") or {}
    ev = load_manifest(ws, "eval") or {}
    red = load_manifest(ws, "redteam") or {}
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
        f"- verdict: {red.get('metrics', {}).get('verdict', 'not run')}", "",
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
    run_ = StageRun(cfg, "export", inputs=[best], params={"export": cfg.export.model_dump()})
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
    atomic_write_text(out / "README.md", _card(cfg, n_params, lineage))
    sums = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    atomic_write_text(run_.dir / "SHA256SUMS", "".join(f"{h}  model/{name}\n" for name, h in sums.items()))
    size = sum(Path(out / n).stat().st_size for n in sums)
    console.print(f"export: {out} ({size / 1e6:.1f} MB, {cfg.export.dtype})")
    return run_.finish(metrics={"parameters": n_params, "bytes": size}, files=sums, formats=["safetensors"])
