"""The data-use register: for every source file, the purpose it was collected for and the legal basis for
training on it, as declared in `prep.data_use`.

Thailand's PDPA (s.21, s.24) and Japan's APPI (Art. 17-18) tie personal data to the purpose it was collected
for; reusing it to train a model needs that purpose and a lawful basis written down first. prep matches every
source file to the first `prep.data_use` entry whose pattern covers it, refuses to run with
`prep.require_legal_basis` while a file has none, and writes data/register.md: a table an auditor reads
without the code (file, sha256, records, purpose, basis, reference). The same list goes into report.json and
the prep manifest.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from stillhouse.errors import StillhouseError


def covers(pattern: str, rel: str) -> bool:
    """Does a `prep.data_use` pattern cover the source file at `rel` (its path from the workspace)? A glob on
    the file name; with a '/', a glob on the path, or a folder and everything under it."""
    if "/" not in pattern:
        return fnmatch.fnmatch(Path(rel).name, pattern)
    pattern = pattern.rstrip("/")
    return fnmatch.fnmatch(rel, pattern) or rel.startswith(pattern + "/")


def declare(entries: list, rels: list[str], required: bool) -> dict[str, int | None]:
    """{source file: index of its prep.data_use entry, or None}. Errors (exit 2) for an entry that covers no
    source file (a typo, or a source since removed: its declaration would vouch for nothing), and, when
    `required`, for files without an entry."""
    declared = {rel: next((i for i, e in enumerate(entries) if covers(e.pattern, rel)), None) for rel in rels}
    for i, e in enumerate(entries):
        if not any(covers(e.pattern, rel) for rel in rels):
            raise StillhouseError(
                f"prep.data_use[{i}] (pattern '{e.pattern}'): no source file matches it; fix the pattern (a file name "
                f"glob, or a path from the workspace such as sources/hr/*) or remove the entry")
    missing = [rel for rel, i in declared.items() if i is None]
    if required and missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise StillhouseError(
            f"prep.require_legal_basis is on, and {len(missing)} source file(s) have no prep.data_use entry declaring "
            f"their purpose and legal basis: {shown}; add one, e.g. prep.data_use: [{{pattern: '{missing[0]}', "
            f"purpose: 'customer support', legal_basis: contract}}]")
    return declared


def write_register(path: Path, entries: list, declared: dict[str, int | None], sha256: dict[str, str],
                   records: dict[str, int]) -> list[dict]:
    """data/register.md and the list that goes into the report and manifest (one dict per source file)."""
    from stillhouse.workspace import atomic_write_text

    rows = []
    for rel, i in declared.items():
        e = entries[i] if i is not None else None
        rows.append({"file": rel, "sha256": sha256.get(rel), "records": records.get(rel, 0),
                     "purpose": e.purpose if e else None, "legal_basis": e.legal_basis if e else None,
                     "reference": e.reference if e else None, "entry": f"prep.data_use[{i}]" if e else None})
    cell = lambda v: str(v if v is not None else "-").replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["# Data-use register", "",
             "Every source file this `stillhouse prep` run read, the purpose it was collected for and the legal basis "
             "declared for training a model on it (`prep.data_use` in stillhouse.yaml). `records` counts the training "
             "records made from the file after deduplication and filtering; `sha256` identifies the exact file read.",
             "", f"Undeclared files: {sum(1 for r in rows if r['legal_basis'] is None)} of {len(rows)}.", "",
             "| file | sha256 (first 16) | records | purpose | legal basis | reference | declared by |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {cell(r['file'])} | {cell((r['sha256'] or '')[:16] or None)} | {r['records']} | {cell(r['purpose'])} | "
              f"{cell(r['legal_basis'] or 'NOT DECLARED')} | {cell(r['reference'])} | {cell(r['entry'])} |" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return rows
