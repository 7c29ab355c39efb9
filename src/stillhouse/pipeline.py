"""The stages in order, as a literal dict (no registry), and `run`: every stage, skipping what is done."""

from __future__ import annotations

import time

from stillhouse.config import Config
from stillhouse.ui import console

# `run` goes through these. prep before check, so the check also vets the data's provenance. serve (a long-running server) and monitor (needs production traffic) are separate.
PIPELINE = ["prep", "check", "adapt", "label", "train", "eval", "redteam", "export"]


def stage_functions() -> dict:
    """name -> run(cfg). Imported here, lazily, so `stillhouse --help` stays fast."""
    from stillhouse.stages import adapt, check, export, label, monitor, prep, redteam, train
    from stillhouse.stages import eval as eval_

    return {
        "check": check.run, "prep": prep.run, "adapt": adapt.run, "label": label.run, "train": train.run,
        "eval": eval_.run, "redteam": redteam.run, "export": export.run, "monitor": monitor.run,
    }


def run_all(cfg: Config, stages: list[str] | None = None) -> dict[str, float]:
    """Run stages in order; each skips itself when its inputs are unchanged. Returns wall seconds per stage.
    A gate (GateError) stops the pipeline where it fires."""
    funcs = stage_functions()
    seconds: dict[str, float] = {}
    for name in stages or PIPELINE:
        console.rule(f"[bold]{name}")
        t0 = time.time()
        funcs[name](cfg)
        seconds[name] = round(time.time() - t0, 1)
    return seconds
