"""Console output: one rich console, and progress bars with rates and ETA for long work."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


class _Rate(TextColumn):
    """items per second, with the unit of the task (`fields["unit"]`)."""

    def __init__(self):
        super().__init__("")

    def render(self, task):
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return f"{speed:.1f} {unit}/s" if speed else f"- {unit}/s"


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "it"):
    """`with progress_bar("label", total=n, unit="rec") as advance: advance(k)`; extra text via advance(0, info="...")."""
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and _quiet()) as prog:
        task = prog.add_task(description, total=total, unit=unit, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            prog.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance


def _quiet() -> bool:
    import os

    return os.environ.get("STILLHOUSE_QUIET") == "1"
