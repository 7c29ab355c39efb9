"""Question-answer pairs written by the teacher from document sections (`prep.document_qa`).

A section of a document ("Returns are accepted within 30 days ...") teaches the student little as a long answer to
"What does the Returns policy say about ...?". With a teacher configured, prep asks it, through the same generation
engine the label stage uses (`records.generate`), for questions the section answers and then for each question's
answer *from the section*. Small teachers write off-topic questions and answers that are not in the text, so every
pair is checked against its section before it is kept:

    question   parsed from "Question: ..." (one line), 8-300 characters, shaped like a question, not seen before
               for that section;
               grounded: at least `min_overlap` of its content words occur in the section
    answer     parsed from "Answer: ...", not empty; grounded the same way (extractive-ish answers pass, invented
               ones do not)

Each rejected pair is counted by reason. The teacher reads the section *after* PII masking, so it never sees
an original value; its output is masked again by the caller (a teacher can invent a name). Results are cached per
section under data/resume/docqa/ as they are made, so a killed prep does not ask the teacher twice.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from stillhouse.workspace import atomic_write_json, read_json_or_none

QUESTION_PROMPT = ("Read the text and write one question that the text answers. Ask about a fact stated in the "
                   "text.\nReply in this format:\nQuestion: ...\n\nText ({title}):\n{text}")
ANSWER_PROMPT = ("Answer the question using only the text. Copy the relevant sentence or phrase if you can.\n"
                 "Reply in this format:\nAnswer: ...\n\nText ({title}):\n{text}\n\nQuestion: {question}")

# words that carry no content: a question made of them alone is not "about" any section
_STOP = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being do does did what which "
    "who whom whose when where why how this that these those it its there their they them he she his her we our you "
    "your i me my can could should would will shall may might must not no yes than then so such about into over "
    "under after before between text according say says said any all each other more most some only also".split())
_WORD = re.compile(r"\w+", re.UNICODE)


def content_words(text: str) -> list[str]:
    """Lower-cased words of 3+ characters that are not function words (placeholders like [PERSON] count)."""
    return [w for w in (m.group().casefold() for m in _WORD.finditer(text)) if len(w) >= 3 and w not in _STOP]


def grounded_share(text: str, section: str) -> float:
    """Share of `text`'s content words that also occur in `section` (1.0 for text with no content word: the
    caller rejects those on length). A word counts when it or its first 5 letters (crude stemming: "delivered"
    ~ "delivery") occur among the section's words."""
    words = content_words(text)
    if not words:
        return 0.0
    have = set(content_words(section))
    stems = {w[:5] for w in have}
    return sum(1 for w in words if w in have or w[:5] in stems) / len(words)


def parse_field(output: str, name: str) -> str:
    """The value after `name:` in a generated reply (or the whole first line when the label is missing), one line,
    without surrounding quotes. Empty when there is nothing."""
    m = re.search(rf"(?im)^\s*\**{name}\**\s*[:：]\s*(.*)$", output)
    line = m.group(1) if m else output.strip().splitlines()[0] if output.strip() else ""
    if not m and re.match(r"(?i)^\s*(question|answer)\s*[:：]", line):
        return ""  # the other field's label: this one is missing
    line = _LEAD.sub("", line.strip())  # "Q: ...", "A: ...", "The answer is: ..."
    return line.strip().strip('"“”').strip()


_LEAD = re.compile(r"^(?:(?:Q|A|Question|Answer)\s*[:：.]\s*|(?:the\s+)?answer\s+is\s*[:：]?\s*)+", re.IGNORECASE)
# a question: ends with "?", or opens like one (English wh-words and auxiliaries)
_QUESTION = re.compile(r"\?\s*$|^(?:what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|"
                       r"could|should|would|will|may|must|has|have|had)\b", re.IGNORECASE)


def is_question(text: str) -> bool:
    """True for "When are returns accepted?" and "How long is the refund period"; false for a statement."""
    return bool(_QUESTION.search(text.strip()))


def _section_key(fingerprint: str, section_id: str, text: str) -> str:
    return hashlib.sha256(f"{fingerprint}\0{section_id}\0{text}".encode()).hexdigest()[:32]


def write_pairs(sections: list[dict], model, tokenizer, dq, cache: Path, fingerprint: str,
                progress=None) -> tuple[dict[str, list[dict]], dict]:
    """Teacher-written, grounded QA pairs for `sections` ([{id, title, text}]).

    Returns ({section id: [{"question", "answer", "sample"}]}, counts) where counts has sections, questions
    asked, pairs kept and rejections by reason. `dq` is prep.document_qa; `fingerprint` names the teacher and the
    settings (cached results made under another one are not reused)."""
    from stillhouse.records import encode_prompt, generate, sample_seed

    cache.mkdir(parents=True, exist_ok=True)
    counts = {"sections": len(sections), "asked": 0, "kept": 0, "cached_sections": 0, "rejected": {}}
    results: dict[str, list[dict]] = {}
    todo = []
    for s in sections:
        got = read_json_or_none(cache / f"{_section_key(fingerprint, s['id'], s['text'])}.json")
        if got is not None:
            results[s["id"]] = got["pairs"]
            _add(counts["rejected"], got["rejected"])
            counts["asked"] += got["asked"]
            counts["cached_sections"] += 1
        else:
            todo.append(s)
    n = dq.questions_per_section
    sampled = n > 1 and dq.temperature > 0
    # a batch of sections at a time, cached as it finishes: a kill loses at most one batch of teacher work
    step = max(1, dq.batch_size)
    for b in range(0, len(todo), step):
        batch = todo[b : b + step]
        jobs = [(s, k) for s in batch for k in range(n)]
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": QUESTION_PROMPT.format(
            title=s["title"], text=s["text"])}]) for s, _ in jobs]
        questions = generate(model, tokenizer, prompts, dq.max_new_tokens, batch_size=step,
                             temperature=dq.temperature if sampled else 0.0,
                             seeds=[sample_seed(dq.seed, s["id"], k) for s, k in jobs] if sampled else None)
        per: dict[str, dict] = {s["id"]: {"pairs": [], "rejected": {}, "asked": 0, "seen": set()} for s in batch}
        asked = []
        for (s, k), out in zip(jobs, questions):
            r = per[s["id"]]
            r["asked"] += 1
            q = parse_field(out, "Question")
            q = q.split(" Answer:")[0].strip()
            why = ("no question in the reply" if len(q) < 8 else "question too long" if len(q) > 300
                   else "not a question" if not is_question(q)
                   else "same question twice" if q.casefold() in r["seen"]
                   else "question not about the section" if grounded_share(q, s["text"]) < dq.min_overlap else "")
            if why:
                _add(r["rejected"], {why: 1})
                continue
            r["seen"].add(q.casefold())
            asked.append((s, k, q if q.endswith("?") else q.rstrip(".") + "?"))
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": ANSWER_PROMPT.format(
            title=s["title"], text=s["text"], question=q)}]) for s, _, q in asked]
        answers = generate(model, tokenizer, prompts, dq.max_new_tokens, batch_size=step) if prompts else []
        for (s, k, q), out in zip(asked, answers):
            r = per[s["id"]]
            a = parse_field(out, "Answer")
            why = ("no answer in the reply" if len(a) < 2
                   else "answer not supported by the section" if grounded_share(a, s["text"]) < dq.min_overlap else "")
            if why:
                _add(r["rejected"], {why: 1})
            else:
                r["pairs"].append({"question": q, "answer": a, "sample": k})
        for s in batch:
            r = per[s["id"]]
            atomic_write_json(cache / f"{_section_key(fingerprint, s['id'], s['text'])}.json",
                              {"pairs": r["pairs"], "rejected": r["rejected"], "asked": r["asked"]})
            results[s["id"]] = r["pairs"]
            _add(counts["rejected"], r["rejected"])
            counts["asked"] += r["asked"]
        if progress is not None:
            progress(len(batch))
    counts["kept"] = sum(len(v) for v in results.values())
    counts["rejected"] = dict(sorted(counts["rejected"].items()))
    return results, counts


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v
