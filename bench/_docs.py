"""What every bench script shares: appending its section to docs/benchmarks.md (scripts run as
`python bench/NAME.py`, so this folder is on sys.path and `from _docs import publish` works)."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def append_to_docs(text: str) -> None:
    """Append one section (markdown) to docs/benchmarks.md, separated by a blank line."""
    with open(BENCHMARKS, "a", encoding="utf-8") as f:
        f.write("\n" + text.rstrip("\n") + "\n")


def publish(lines: list[str], append: bool = True) -> str:
    """Print a bench script's section (markdown lines) and, unless `append` is off (`--no-append`), append it to
    docs/benchmarks.md. Returns the text."""
    text = "\n".join(lines)
    print(text)
    if append:
        append_to_docs(text)
    return text
