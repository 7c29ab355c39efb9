"""General-purpose data mixed into training, so the student keeps its basic language ability while it specializes.

`prep` calls `general_records` when `prep.general.share` > 0. The data comes from the user's JSONL file
(`prep.general.file`) or from the bundled list of general prompts (`stillhouse/data/general_prompts.jsonl`, each
with a short reference answer). Records get task "general":

- train: `share` of the train split (e.g. 0.1 -> 1 general record per 9 task records). A bundled prompt goes in
  without its answer, so `label` has the teacher write one (self-distilled replay: the student learns the
  teacher's own general behaviour, not a third party's). A user record keeps its response if it has one.
- test: `test_records` others, with their reference response, never in train. eval scores task "general" by
  perplexity, next to the task metrics, so forgetting is visible (student vs student-init vs teacher).

A user file holds one JSON object per line: {"messages": [...]} (a final assistant turn is the response), or
{"prompt": "...", "response": "..."} (response optional). Its text goes through prep's PII masking.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from stillhouse.errors import StillhouseError
from stillhouse.records import response_text

BUNDLED = Path(__file__).parent / "data" / "general_prompts.jsonl"
TASK = "general"


def _load(path: Path, key: str) -> list[tuple[list[dict], str]]:
    """(messages, location) per line of a general-data file; one clear error for a bad line."""
    from stillhouse.workspace import read_jsonl

    if not path.is_file():
        raise StillhouseError(f"{key}: {path} not found; give a JSONL file of general instructions, or leave it empty "
                              "to use the bundled general prompts")
    out = []
    for n, row in enumerate(read_jsonl(path), 1):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if msgs is None and isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            msgs = [{"role": "user", "content": row["prompt"]}]
            if isinstance(row.get("response"), str) and row["response"].strip():
                msgs.append({"role": "assistant", "content": row["response"]})
        ok = (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
              and m.get("role") in ("system", "user", "assistant") for m in msgs) and msgs[0]["role"] != "assistant")
        if not ok:
            raise StillhouseError(f"{path} line {n}: a general record needs 'prompt' (+ optional 'response') or a "
                                  "'messages' list of {role: system|user|assistant, content} starting with a user or system turn")
        out.append((msgs, f"line {n}"))
    return out


def source_path(gc, workspace: Path) -> Path:
    """The file general records come from: `prep.general.file` (relative to the workspace) or the bundled list."""
    if gc.file is None:
        return BUNDLED
    p = Path(gc.file).expanduser()
    return p if p.is_absolute() else Path(workspace) / p


def general_records(gc, n_task_train: int, workspace: Path,
                    mask: Callable[[str], tuple[str, list]] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(train records, test records, report) for `prep.general` (a `GeneralConfig`). `n_task_train`: task records
    in the train split, which `share` is reckoned against. `mask(text) -> (text, spans)`: prep's PII masking,
    applied to a user file's text (the bundled prompts are ours and hold no PII)."""
    user_file = gc.file is not None
    rows = _load(source_path(gc, workspace), "prep.general.file")
    pii_found = 0
    if user_file and mask is not None:
        for msgs, _ in rows:  # freshly parsed from the file: ours to change
            for m in msgs:
                m["content"], spans = mask(m["content"])
                pii_found += len(spans)

    order = list(range(len(rows)))
    random.Random(f"general:{gc.seed}").shuffle(order)
    answered = [i for i in order if rows[i][0][-1]["role"] == "assistant"]
    test_idx = answered[: gc.test_records]  # held out: a reference response is what perplexity is measured on
    held = set(test_idx)
    pool = [i for i in order if i not in held]
    wanted = round(gc.share * n_task_train / (1 - gc.share)) if gc.share > 0 else 0
    train_idx = pool[:wanted]

    source = str(gc.file) if user_file else "stillhouse bundled general prompts"

    def record(i: int, split: str, keep_response: bool) -> dict:
        msgs, where = rows[i]
        if not keep_response and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # the teacher answers it in `label`
        return {"id": f"general-{split}-{i:05d}", "task": TASK, "messages": msgs,
                "source": {"file": source, "location": where}, "sensitivity": "internal" if user_file else "public"}

    train = [record(i, "train", keep_response=user_file) for i in train_idx]
    test = [record(i, "test", keep_response=True) for i in test_idx]
    report = {
        "source": source, "share": gc.share, "requested_train": wanted, "train": len(train), "test": len(test),
        "train_for_teacher_to_answer": sum(1 for r in train if response_text(r) is None),
        "available": len(rows),
    }
    if user_file and mask is not None:
        report["pii_masked"] = pii_found
    if len(train) < wanted:
        report["note"] = (f"asked for {wanted} general train records (share {gc.share}), the source has {len(pool)} "
                          f"after {len(test)} held out for test: used them all")
    if gc.test_records and len(test) < gc.test_records:
        report["note_test"] = f"only {len(test)} general records with a response for test (asked for {gc.test_records})"
    return train, test, report
