"""Benchmark: near-duplicate detection at threshold 0.8 -- stillhouse's `similar_pairs` vs datasketch's MinHashLSH.

    .venv/bin/python bench/dedup.py [--docs 20000] [--pairs 1000] [--seed 0] [--no-append]

The corpus: `--docs` generated documents (60-250 words drawn from a Zipf distribution over 30,000 made-up
words), among them `--pairs` planted near-duplicate pairs whose exact Jaccard on our shingles (word 5-grams,
`textproc.shingles`) is measured to lie in [0.835, 0.865], and as many pairs just below the threshold, in
[0.70, 0.79], that must not be reported. Every other document is unrelated.

Scored for each method, on the same shingle sets in the same process: precision (reported pairs whose exact
Jaccard is >= 0.8), recall (planted pairs reported), planted negatives reported, seconds and docs/s. Shingling
(common to both, ~1 s) is timed once and included in docs/s. The peer is datasketch 2.0 (a pinned dependency)
with its defaults for threshold=0.8 at 128 permutations: MinHash.bulk, MinHashLSH insert + query; its raw
candidates are its answer, and "+ exact check" shows it with the same verification ours does. text-dedup
0.4 (PyPI) was not installed: it pulls its own datasets/numpy versions into the pinned environment.

Prints a table and appends it to docs/benchmarks.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

from _docs import publish  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stillhouse import textproc  # noqa: E402

THRESHOLD = 0.8
POSITIVE = (0.835, 0.865)  # planted near-duplicates, just above the threshold (where banded LSH loses pairs)
NEGATIVE = (0.70, 0.79)  # planted pairs just below it: similar, but not duplicates


def make_vocab(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: set[str] = set()
    while len(vocab) < n:
        vocab.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 10))))
    return sorted(vocab)


def variant(base: list[str], band: tuple[float, float], rng: random.Random, vocab: list[str]) -> tuple[list[str], float] | None:
    """A copy of `base` edited until its Jaccard with it falls into `band`: substitutions, insertions and
    deletions at random places (each changes ~5 shingles) while well above the band, then substitutions near
    the end (1-2 shingles each) for the last steps. None if it overshot (the caller tries again)."""
    target = rng.uniform(*band)
    ref = textproc.shingles(" ".join(base))
    words = list(base)
    sim = 1.0
    while sim > target:
        if sim > band[1] + 0.05:
            pos = rng.randrange(len(words))
            op = rng.random()
            if op < 0.6:
                words[pos] = rng.choice(vocab)
            elif op < 0.8:
                words.insert(pos, rng.choice(vocab))
            elif len(words) > 20:
                del words[pos]
        else:
            words[len(words) - 1 - rng.randrange(2)] = rng.choice(vocab)
            if rng.random() < 0.5:
                words.append(rng.choice(vocab))
        sim = textproc.jaccard(ref, textproc.shingles(" ".join(words)))
    return (words, sim) if band[0] <= sim <= band[1] else None


def make_corpus(n_docs: int, n_pairs: int, seed: int) -> tuple[list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    """Texts, planted positive pairs (i < j) and planted negative pairs; positions shuffled."""
    import numpy as np

    rng = random.Random(seed)
    vocab = make_vocab(30_000, rng)
    np_rng = np.random.default_rng(seed)
    # Zipf-like word frequencies (rank^-1.1), as in natural text: common words recur, shingles mostly do not
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()

    def doc() -> list[str]:
        return [vocab[k] for k in np_rng.choice(len(vocab), size=rng.randint(60, 250), p=p)]

    texts: list[list[str]] = []
    planted: dict[str, list[tuple[int, int]]] = {"pos": [], "neg": []}
    for kind, band in (("pos", POSITIVE), ("neg", NEGATIVE)):
        while len(planted[kind]) < n_pairs:
            base = doc()
            v = variant(base, band, rng, vocab)
            if v:
                texts += [base, v[0]]
                planted[kind].append((len(texts) - 2, len(texts) - 1))
    while len(texts) < n_docs:
        texts.append(doc())
    order = list(range(len(texts)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    fix = lambda pairs: [tuple(sorted((where[a], where[b]))) for a, b in pairs]  # noqa: E731
    return [" ".join(texts[i]) for i in order], fix(planted["pos"]), fix(planted["neg"])


def datasketch_pairs(sets: list[set[str]], num_perm: int = 128) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    hashes = MinHash.bulk([[x.encode() for x in s] for s in sets], num_perm=num_perm, seed=1)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=num_perm)
    out = set()
    for i, mh in enumerate(hashes):
        out.update((j, i) for j in lsh.query(mh))
        lsh.insert(i, mh)
    return out


def score(name: str, pairs: set[tuple[int, int]], sets, pos, neg, seconds: float, shingle_s: float) -> dict:
    true = sum(1 for a, b in pairs if textproc.jaccard(sets[a], sets[b]) >= THRESHOLD)
    found = len(pairs & set(pos))
    precision = true / len(pairs) if pairs else 1.0
    recall = found / len(pos)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"method": name, "reported": len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "negatives_reported": len(pairs & set(neg)), "seconds": seconds,
            "docs_per_s": len(sets) / (seconds + shingle_s)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = ap.parse_args()

    t = time.time()
    texts, pos, neg = make_corpus(args.docs, args.pairs, args.seed)
    gen_s = time.time() - t
    t = time.time()
    sets = [textproc.shingles(x) for x in texts]
    shingle_s = time.time() - t
    sims = [textproc.jaccard(sets[a], sets[b]) for a, b in pos + neg]  # the planted values, measured
    assert all(POSITIVE[0] <= s <= POSITIVE[1] for s in sims[: len(pos)]) and all(s < THRESHOLD for s in sims[len(pos):])

    rows = []
    bands, per_band = textproc.lsh_layout(THRESHOLD, 128)
    t = time.time()
    ours = {(a, b) for a, b, _ in textproc.similar_pairs(sets, THRESHOLD)}
    rows.append(score(f"stillhouse similar_pairs ({bands} bands x {per_band} rows, exact check)", ours, sets, pos, neg,
                      time.time() - t, shingle_s))
    t = time.time()
    peer = datasketch_pairs(sets)
    peer_s = time.time() - t
    rows.append(score("datasketch 2.0 MinHashLSH(threshold=0.8, num_perm=128)", peer, sets, pos, neg, peer_s, shingle_s))
    t = time.time()
    checked = {(a, b) for a, b in peer if textproc.jaccard(sets[a], sets[b]) >= THRESHOLD}
    rows.append(score("datasketch 2.0 + exact check", checked, sets, pos, neg, peer_s + time.time() - t, shingle_s))

    lines = [
        "### near-duplicate detection at Jaccard 0.8: stillhouse vs datasketch",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, no GPU",
        f"- command: `.venv/bin/python bench/dedup.py --docs {args.docs} --pairs {args.pairs} --seed {args.seed}`",
        f"- corpus: {len(texts)} generated documents (60-250 Zipf-distributed words, generated in {gen_s:.0f} s), "
        f"{len(pos)} planted pairs at measured Jaccard {min(sims[:len(pos)]):.3f}-{max(sims[:len(pos)]):.3f} (word "
        f"5-grams) and {len(neg)} planted pairs at {min(sims[len(pos):]):.3f}-{max(sims[len(pos):]):.3f} (must not be "
        f"reported); shingling {shingle_s:.1f} s, included in docs/s",
        "",
        "| method | pairs reported | precision | recall at J 0.835-0.865 | F1 | below-threshold pairs reported | seconds | docs/s |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['method']} | {r['reported']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
          f"{r['negatives_reported']} | {r['seconds']:.1f} | {r['docs_per_s']:.0f} |" for r in rows),
        "",
    ]
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
