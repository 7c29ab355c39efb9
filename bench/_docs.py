"""What every bench script shares: appending its section to docs/benchmarks.md (scripts run as
`python bench/NAME.py`, so this folder is on sys.path and `from _docs import append_to_docs` works)."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def append_to_docs(text: str) -> None:
    """Append one section (markdown) to docs/benchmarks.md, separated by a blank line."""
    with open(BENCHMARKS, "a", encoding="utf-8") as f:
        f.write("\n" + text.rstrip("\n") + "\n")
