"""Benchmark: what the optional PII model backend (`prep.pii_model`, stillhouse.pii_model) costs and can add.

    .venv/bin/python bench/pii_model.py [--no-append] [--texts N]

On the presidio-research texts (bench/pii.py's loader and scorer, read-only):

1. Speed, characters per second (best of 2, torch on every core this process may use), of the rules alone
   (`find_pii`) and of rules + a backend, merged as prep merges them: a token-classification model the size of
   BERT-base (12 layers, hidden 768) and a small one (4 layers, hidden 256), both with random weights (no
   trained NER model is reachable offline; speed does not depend on the weights) and a WordPiece vocabulary
   trained on the texts; and a spaCy entity_ruler with 1,000 name patterns.
2. Ceiling: the presidio SpanEvaluator-rules F2 (bench/pii.py's `score_presidio`, IoU 0.7) of the rules alone and
   of rules + an *oracle* backend: a spaCy entity_ruler whose patterns are the set's own gold PERSON strings. No
   real model does that well; it bounds what any NER backend can add to the rules on this set, and shows that the
   merge (union, longer span wins) does not cost the structured identifiers anything.

Prints a table and appends it to docs/benchmarks.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _docs import append_to_docs  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pii import load_presidio, prf, score_presidio  # noqa: E402  (bench/pii.py: loader and scorer)


def build_token_classifier(folder: Path, texts: list[str], layers: int, hidden: int) -> None:
    """A random-weight BertForTokenClassification (O, B-PER, I-PER) with a WordPiece tokenizer trained on `texts`."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=False)
    wp.train_from_iterator(texts, vocab_size=8000, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden, num_labels=3,
                     id2label={0: "O", 1: "B-PER", 2: "I-PER"}, label2id={"O": 0, "B-PER": 1, "I-PER": 2})
    BertForTokenClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def build_ruler(folder: Path, names: list[str]) -> None:
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": n} for n in names])
    nlp.to_disk(folder)


def timed(fn, texts: list[str], rounds: int = 2) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn(texts)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    ap.add_argument("--texts", type=int, default=1500, help="presidio texts used for speed (the ceiling uses all)")
    args = ap.parse_args()
    from stillhouse import pii_model
    from stillhouse.config import PiiModelConfig
    from stillhouse.pii import find_pii

    docs = load_presidio()
    texts = [d["text"] for d in docs]
    speed_texts = texts[: args.texts]
    chars = sum(map(len, speed_texts))
    gold_names = sorted({d["text"][s:e] for d in docs for s, e, k in d["spans"] if k == "PERSON"})

    def with_backend(detector):
        def run(batch: list[str]) -> list:
            model = detector.find(batch)
            return [pii_model.merge(find_pii(t), m) for t, m in zip(batch, model)]
        return run

    rows = []
    find_pii("Ms. Maria Lopez")  # reads the word lists once, outside the timing
    rules_s, rules_pred = timed(lambda b: [find_pii(t) for t in b], speed_texts)
    rows.append(("rules only (`find_pii`)", rules_s))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, layers, hidden in (("small token classifier (4 layers, hidden 256)", 4, 256),
                                     ("BERT-base-sized token classifier (12 layers, hidden 768)", 12, 768)):
            folder = tmp / f"tc-{layers}"
            build_token_classifier(folder, texts, layers, hidden)
            det = pii_model.load(PiiModelConfig(kind="transformers", path=str(folder), batch_size=32), tmp)
            rows.append((f"rules + {name}", timed(with_backend(det), speed_texts)[0]))
        have_spacy = True
        try:
            build_ruler(tmp / "ruler", gold_names[:1000])
            ruler = pii_model.load(PiiModelConfig(kind="spacy", path=str(tmp / "ruler")), tmp)
            rows.append((f"rules + spaCy entity_ruler ({min(1000, len(gold_names))} name patterns)",
                         timed(with_backend(ruler), speed_texts)[0]))
            build_ruler(tmp / "oracle", gold_names)
            oracle = pii_model.load(PiiModelConfig(kind="spacy", path=str(tmp / "oracle")), tmp)
            oracle_pred = with_backend(oracle)(texts)
        except ImportError:
            have_spacy = False

    import torch

    lines = ["### PII model backend (`prep.pii_model`): speed, and the most a NER model can add", "",
             f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores "
             f"(shared; run under flock), torch threads {torch.get_num_threads()}, Python {platform.python_version()}",
             f"- command: `.venv/bin/python bench/pii_model.py --texts {args.texts}`",
             f"- {len(speed_texts)} presidio-research texts, {chars:,} chars; best of 2; token classifiers have random "
             "weights (speed only: no trained NER model is reachable offline)", "",
             "| detector | chars/s | texts/s | vs rules only |", "|---|---|---|---|"]
    for name, secs in rows:
        lines.append(f"| {name} | {chars / secs:,.0f} | {len(speed_texts) / secs:,.1f} | {rules_s / secs:.2f}x |")
    if have_spacy:
        all_rules = rules_pred if len(speed_texts) == len(texts) else [find_pii(t) for t in texts]
        (r_all, r_kind), (o_all, o_kind) = score_presidio(docs, all_rules, 0.7), score_presidio(docs, oracle_pred, 0.7)
        structured = ("CARD", "EMAIL", "IBAN", "SSN", "IP", "PHONE")

        def struct_recall(by_kind: dict) -> float:
            return prf(sum((by_kind[k] for k in structured if k in by_kind), Counter()))[1]

        lines += ["", f"Ceiling on all {len(docs)} presidio texts (SpanEvaluator-rules F2, IoU 0.7): rules alone "
                  f"**{prf(r_all)[2]:.3f}** (P {prf(r_all)[0]:.3f} R {prf(r_all)[1]:.3f}); rules + an oracle NER "
                  f"backend (spaCy entity_ruler of the set's own {len(gold_names)} gold PERSON strings) "
                  f"**{prf(o_all)[2]:.3f}** (P {prf(o_all)[0]:.3f} R {prf(o_all)[1]:.3f}); PERSON F2 "
                  f"{prf(r_kind['PERSON'])[2]:.3f} -> {prf(o_kind['PERSON'])[2]:.3f}; structured identifiers recall "
                  f"{struct_recall(r_kind):.3f} -> {struct_recall(o_kind):.3f} (the merge costs them nothing when "
                  f"the two are equal). No real model reaches the oracle: this bounds what a backend can add here."]
    else:
        lines += ["", "spaCy not installed: its rows and the oracle ceiling skipped (`pip install spacy`)."]
    print("\n".join(lines))
    if not args.no_append:
        append_to_docs("\n".join(lines))


if __name__ == "__main__":
    main()
