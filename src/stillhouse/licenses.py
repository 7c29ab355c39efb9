"""The license gate: which license a model is under, and whether this project may distill it.

A distilled student is a derivative of its teacher, so the teacher's license follows it. We read the license
from the places a model publisher puts it (model card front-matter, a LICENSE file, config.json, GGUF
metadata), classify it, and decide:

    permissive (apache-2.0, mit, bsd-*, cc-by-4.0, ...)  -> pass
    custom (llama*, gemma, qwen, deepseek, openrail, copyleft, ...) -> stop unless `license.accept` names it
    non-commercial (cc-by-nc-*, ...)                      -> stop unless `license.non_commercial_use: true`
    unknown or missing                                    -> stop, saying where we looked

Training data written by a commercial API model (GPT-4, Claude, Gemini, ...) is refused as a teacher signal:
those providers' terms forbid using their output to train competing models.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from stillhouse.errors import StillhouseError

# SPDX-style ids as the Hugging Face model card uses them. Anything permissive lets a derivative be used and
# shipped with attribution only.
PERMISSIVE = {
    "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "isc", "zlib", "bsl-1.0",
    "unlicense", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "odc-by", "pddl", "ecl-2.0",
    "afl-3.0", "postgresql", "wtfpl", "artistic-2.0", "openmdw-1.0",
}

# Licenses with their own terms (use restrictions, user thresholds, naming rules) or copyleft obligations that
# follow the student: usable, but only after someone has read them and says so in `license.accept`.
CUSTOM_PREFIXES = (
    "llama", "gemma", "qwen", "tongyi-qianwen", "deepseek", "openrail", "bigscience", "creativeml", "bigcode",
    "falcon", "apple", "nvidia", "health-ai", "intel", "gpl", "agpl", "lgpl", "mpl", "cc-by-sa", "osl", "epl",
    "eupl", "c-uda", "other",
)

# Terms that forbid commercial use altogether (Mistral's non-production license, Meta's research license, ...).
NON_COMMERCIAL = {"mnpl", "mnpl-0.1", "mistral-ai-non-production-license", "fair-noncommercial-research-license"}

# How a LICENSE file's text gives its license away: (regex over the first 20k characters, id). First match wins,
# so the specific (Llama 3.1) comes before the general (Llama 3).
_TEXT_PATTERNS = [
    (r"llama\s*4\s+community\s+license", "llama4"),
    (r"llama\s*3\.3\s+community\s+license", "llama3.3"),
    (r"llama\s*3\.2\s+community\s+license", "llama3.2"),
    (r"llama\s*3\.1\s+community\s+license", "llama3.1"),
    (r"llama\s*3\s+community\s+license", "llama3"),
    (r"llama\s*2\s+community\s+license", "llama2"),
    (r"gemma\s+terms\s+of\s+use", "gemma"),
    (r"qwen\s+research\s+license", "qwen-research"),
    (r"tongyi\s+qianwen\s+license", "tongyi-qianwen"),
    (r"deepseek\s+license\s+agreement", "deepseek"),
    (r"responsible\s+ai\s+license|openrail", "openrail"),
    (r"attribution-noncommercial-sharealike\s+4\.0", "cc-by-nc-sa-4.0"),
    (r"attribution-noncommercial-noderivatives\s+4\.0", "cc-by-nc-nd-4.0"),
    (r"attribution-noncommercial\s+4\.0", "cc-by-nc-4.0"),
    (r"attribution-sharealike\s+4\.0", "cc-by-sa-4.0"),
    (r"attribution\s+4\.0\s+international", "cc-by-4.0"),
    (r"gnu\s+affero\s+general\s+public\s+license", "agpl-3.0"),
    (r"gnu\s+lesser\s+general\s+public\s+license", "lgpl-3.0"),
    (r"gnu\s+general\s+public\s+license\s+version\s+2", "gpl-2.0"),
    (r"gnu\s+general\s+public\s+license", "gpl-3.0"),
    (r"mozilla\s+public\s+license", "mpl-2.0"),
    (r"apache\s+license[\s,]+version\s+2\.0", "apache-2.0"),
    (r"permission\s+is\s+hereby\s+granted,\s+free\s+of\s+charge", "mit"),
    (r"redistribution\s+and\s+use\s+in\s+source\s+and\s+binary\s+forms.*neither\s+the\s+name", "bsd-3-clause"),
    (r"redistribution\s+and\s+use\s+in\s+source\s+and\s+binary\s+forms", "bsd-2-clause"),
]

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "COPYING")

# Commercial API models whose terms forbid using their output to develop competing models
# (OpenAI, Anthropic, Google Gemini/PaLM, Cohere, xAI). Matched against `provenance.generated_by` / `.model`.
_COMMERCIAL_API = [
    (r"\bgpt-?[345](?:\.\d)?(?:o|-turbo|-mini)?\b|\bchatgpt\b|\btext-davinci\b|\bo[134](?:-mini|-pro|-preview)?\b"
     r"|\bopenai\b", "OpenAI"),
    (r"\bclaude\b|\banthropic\b", "Anthropic"),
    (r"\bgemini\b|\bbard\b|\bpalm-?2?\b|\bvertex\s*ai\b|\bai\s*studio\b", "Google"),
    (r"\bcohere\b|\bcommand-r\b", "Cohere"),
    (r"\bgrok\b|\bx\.ai\b|\bxai\b", "xAI"),
]


def normalize_license(raw: str) -> str:
    """A license name as people write it ('Apache License 2.0', 'Llama 3.1 Community License') -> an id."""
    s = re.sub(r"[\s_]+", "-", str(raw).strip().lower())
    if s.startswith("apache") and "2" in s:
        return "apache-2.0"
    if s in ("mit-license", "the-mit-license", "expat"):
        return "mit"
    if "gemma" in s:
        return "gemma"
    m = re.match(r"^(?:meta-)?llama-?(\d(?:\.\d)?)", s)
    if m:
        return f"llama{m.group(1)}"
    if "qwen" in s and "research" in s:
        return "qwen-research"
    if "qianwen" in s:
        return "tongyi-qianwen"
    if s.startswith("deepseek"):
        return "deepseek"
    return s


def license_class(license_id: str | None) -> str:
    """'permissive' | 'custom' | 'non-commercial' | 'unknown'."""
    if not license_id:
        return "unknown"
    lid = normalize_license(license_id)
    if lid in PERMISSIVE or (lid.startswith("bsd") and "nc" not in lid):
        return "permissive"
    if "-nc" in lid or lid in NON_COMMERCIAL or "noncommercial" in lid or "non-commercial" in lid:
        return "non-commercial"
    if lid.startswith(CUSTOM_PREFIXES):
        return "custom"
    return "unknown"


# ------------------------------------------------------------------------------------------ reading a model


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value header of a GGUF file (long arrays such as the token list become their length), plus
    `_tensor_names`. Cached per file version: the license gate and the hardware plan both read it, and parsing
    a 49k-token vocabulary takes ~1.5 s."""
    st = Path(path).stat()
    return _gguf_metadata(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if len(field.data) > 64:  # tokens, merges, scores: only their count matters here
            meta[key] = len(field.data)
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an exotic field type we do not need must not stop the gate
            continue
    meta["_tensor_names"] = [t.name for t in reader.tensors]
    return meta


def _front_matter(readme: Path) -> dict:
    """The YAML between the leading `---` lines of a model card ({} when there is none). Malformed front-matter
    is an error naming the file and line: read as "no license", it would hide the license it states."""
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^\ufeff?---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 2}" if mark else ""  # + the opening --- line, 1-based
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise StillhouseError(f"{readme}{where}: the model card's front-matter (between the --- lines) is not valid YAML "
                              f"({problem}); fix it, e.g. `license: apache-2.0` on its own line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StillhouseError(f"{readme}: the model card's front-matter must be key: value lines (like `license: mit`), "
                              f"got a {type(data).__name__}")
    return data


def _from_card(meta: dict) -> str | None:
    """`license:` (a string or a list), or `license_name:` when the card says `license: other`."""
    lic = meta.get("license")
    if isinstance(lic, list):
        lic = lic[0] if lic else None
    name = meta.get("license_name")
    if (not lic or str(lic).lower() == "other") and name:
        return normalize_license(name)
    return normalize_license(lic) if lic else None


def _from_text(path: Path) -> str | None:
    text = " ".join(path.read_text(encoding="utf-8", errors="replace")[:20000].lower().split())
    for pattern, lid in _TEXT_PATTERNS:
        if re.search(pattern, text, re.S):
            return lid
    return None


_STRICTNESS = {"permissive": 0, "custom": 1, "unknown": 2, "non-commercial": 3}


def detect_license(src) -> dict:
    """Where a model says what license it is under, in this order: README.md front-matter, LICENSE files,
    config.json, GGUF `general.license`, and last the license stillhouse records for its bundled assets.

    Returns {"license": id or None, "where": which source, "looked_in": [every place checked],
    "found": [{"license", "where"}, ...]}. When sources disagree, the strictest wins and "conflict" says so:
    a permissive model card cannot override a LICENSE file with use restrictions."""
    from stillhouse.models import asset_license

    folder = Path(src.folder)
    looked_in: list[str] = []
    found: list[dict] = []

    readme = folder / "README.md"
    looked_in.append(f"{readme} front-matter")
    if readme.is_file() and (lic := _from_card(_front_matter(readme))):
        found.append({"license": lic, "where": "README.md front-matter"})

    looked_in.append(f"{folder}/{{{','.join(LICENSE_FILES)}}} text")
    for name in LICENSE_FILES:
        path = folder / name
        if path.is_file() and (lic := _from_text(path)):
            found.append({"license": lic, "where": f"{name} (text)"})

    config = folder / "config.json"
    looked_in.append(f"{config} license key")
    if config.is_file():
        try:
            lic = json.loads(config.read_text(encoding="utf-8")).get("license")
        except (ValueError, AttributeError):
            lic = None
        if lic:
            found.append({"license": normalize_license(lic), "where": "config.json"})

    if src.is_gguf:
        looked_in.append(f"{src.path} metadata general.license")
        try:
            meta = gguf_metadata(str(src.path))
        except (OSError, ValueError):
            meta = {}
        lic = meta.get("general.license")
        if (not lic or str(lic).lower() == "other") and meta.get("general.license.name"):
            lic = meta["general.license.name"]
        if lic:
            found.append({"license": normalize_license(lic), "where": "GGUF general.license"})

    looked_in.append("stillhouse's bundled assets")
    if lic := asset_license(src):
        found.append({"license": normalize_license(lic), "where": "stillhouse asset registry (models.ASSETS)"})

    out = {"license": None, "where": None, "looked_in": looked_in, "found": found}
    if found:
        chosen = found[0]
        for f in found[1:]:  # the first of the strictest
            if _STRICTNESS[license_class(f["license"])] > _STRICTNESS[license_class(chosen["license"])]:
                chosen = f
        out.update(license=chosen["license"], where=chosen["where"])
        if len({f["license"] for f in found}) > 1:
            out["conflict"] = "; ".join(f"{f['where']}: {f['license']}" for f in found) + f" -> using the strictest, {chosen['license']}"
    return out


def license_decision(license_id: str | None, license_cfg) -> dict:
    """The gate for one license under the `license:` config section.

    Returns {"license", "verdict": "pass" | "accepted" | "stop", "class", "reason", "fix"} ("fix" only on stop)."""
    lid = normalize_license(license_id) if license_id else None
    cls = license_class(lid)
    accepted = {normalize_license(a) for a in license_cfg.accept}
    out = {"license": lid, "class": cls}
    if cls == "permissive":
        return {**out, "verdict": "pass", "reason": f"{lid} is permissive: distilling and shipping the student is allowed with attribution"}
    if cls == "non-commercial":
        if license_cfg.non_commercial_use:
            return {**out, "verdict": "accepted",
                    "reason": f"{lid} forbids commercial use; license.non_commercial_use declares this project non-commercial"}
        return {**out, "verdict": "stop", "reason": f"{lid} forbids commercial use, and the student inherits that",
                "fix": "use another model, or if this project is non-commercial set license.non_commercial_use: true"}
    if lid and lid in accepted:
        return {**out, "verdict": "accepted", "reason": f"{lid} has its own terms; accepted in license.accept"}
    if cls == "custom":
        return {**out, "verdict": "stop",
                "reason": f"{lid} is a custom license with its own terms (use restrictions, naming, attribution) that bind the student too",
                "fix": f"read its terms; to accept them set license.accept: [{lid}] (or --set license.accept=[{lid}])"}
    if lid:
        return {**out, "verdict": "stop", "reason": f"license {lid!r} is not one stillhouse recognizes",
                "fix": f"check its terms; to accept it set license.accept: [{lid}]"}
    return {**out, "verdict": "stop", "reason": "no license found",
            "fix": "if you know the model's license, put it in the model folder: a README.md whose front-matter says "
                   "`license: apache-2.0` (or the right id), or its LICENSE file"}


def check_data_provenance(records: list[dict]) -> list[str]:
    """One problem line per record whose `provenance.generated_by` (or `.model`) names a commercial API model:
    OpenAI, Anthropic, Google, Cohere and xAI terms forbid using their output to train competing models."""
    problems = []
    for n, rec in enumerate(records, 1):
        prov = rec.get("provenance")
        if not isinstance(prov, dict):
            continue
        for key in ("generated_by", "model"):
            value = prov.get(key)
            if isinstance(value, dict):  # {"name": ..., "version": ...}
                value = " ".join(str(v) for v in value.values())
            if not value:
                continue
            text = str(value).lower()
            if "gpt-oss" in text:  # OpenAI's open-weight models (Apache-2.0) run locally: allowed
                continue
            vendor = next((v for pattern, v in _COMMERCIAL_API if re.search(pattern, text)), None)
            if vendor:
                problems.append(f"record {rec.get('id', f'#{n}')}: provenance.{key} {value!r} is a commercial API model ({vendor})")
                break
    return problems
