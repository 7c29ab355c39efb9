"""Near-duplicate detection (textproc): shingles, MinHash signatures, the LSH band layout, verified pairs.

Checked against the definition: exact Jaccard over all pairs (brute force) on corpora small enough for it.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from stillhouse import textproc


def planted(m: int, changed: int, tag: str) -> tuple[set[str], set[str]]:
    """Two sets of m shingles that differ in `changed` each: Jaccard (m - changed) / (m + changed)."""
    a = {f"{tag}-{k}" for k in range(m)}
    b = {f"{tag}-{k}" for k in range(changed, m)} | {f"{tag}-new-{k}" for k in range(changed)}
    return a, b


def brute_force(sets: list[set[str]], threshold: float) -> set[tuple[int, int]]:
    return {(i, j) for i, j in itertools.combinations(range(len(sets)), 2)
            if sets[i] and sets[j] and textproc.jaccard(sets[i], sets[j]) >= threshold}


# ---------------------------------------------------------------------------------------------- shingles


def test_word_shingles_ignore_case_punctuation_and_space():
    assert textproc.shingles("Turn on the LIGHT, please!") == textproc.shingles("turn on  the light please")
    assert textproc.shingles("a b c d e f") == {"a b c d e", "b c d e f"}
    assert textproc.shingles("turn on the light") == {"turn on the light"}  # shorter than one shingle: one
    assert textproc.shingles(" ... ") == set()
    assert textproc.dedup_key("Turn on the LIGHT!") == textproc.dedup_key("turn on   the light")
    assert textproc.dedup_key("turn on the light") != textproc.dedup_key("turn off the light")


def test_character_shingles_for_japanese_and_thai():
    ja = textproc.shingles("東京都千代田区の会議室で打ち合わせをします。")
    assert "会議室で打" in ja and all(len(s) == 5 for s in ja)
    # a Latin word inside Japanese text does not switch to word shingles
    assert "室でabc" in textproc.shingles("会議室でabcの打ち合わせ")
    th = textproc.shingles("สวัสดีครับ ผมชื่อสมชาย")
    assert all(len(s) == 5 for s in th) and "สวัสด" in th  # vowel signs kept (stdlib `re` drops them)
    assert len(th) == len("สวัสดีครับผมชื่อสมชาย") - 4
    # Thai words that differ only in a vowel sign are different texts
    assert textproc.dedup_key("สวัสดี") != textproc.dedup_key("สวสด")


def test_japanese_and_thai_near_duplicates_found_unrelated_not():
    texts = ["来週の月曜日に東京本社の第三会議室で新製品の販売計画について打ち合わせを行います。資料は前日までに共有してください。",
             "来週の月曜日に東京本社の第三会議室で新製品の販売計画について打ち合わせを行います。資料は前日までに共有して下さい。",
             "経費精算の締め切りは毎月二十五日です。領収書の原本を経理部に提出してください。",
             "ลูกค้าสามารถเปลี่ยนสินค้าได้ภายในสามสิบวันนับจากวันที่ซื้อ โดยต้องแสดงใบเสร็จรับเงินฉบับจริงทุกครั้ง",
             "ลูกค้าสามารถเปลี่ยนสินค้าได้ภายในสามสิบวันนับจากวันที่ซื้อ โดยต้องแสดงใบเสร็จรับเงินฉบับจริงทุกครั้งค่ะ"]
    sets = [textproc.shingles(t) for t in texts]
    truth = brute_force(sets, 0.8)
    assert truth == {(0, 1), (3, 4)}
    assert {(a, b) for a, b, _ in textproc.similar_pairs(sets, 0.8)} == truth


# -------------------------------------------------------------------------------------------- LSH layout


@pytest.mark.parametrize("threshold", [0.5, 0.6, 0.8, 0.9])
def test_lsh_layout_keeps_misses_at_the_threshold_below_the_bound(threshold):
    bands, rows = textproc.lsh_layout(threshold, 128)
    assert bands * rows <= 128
    assert (1 - threshold**rows) ** bands <= textproc.LSH_MAX_MISS
    # one more row per band would break the bound: the layout is the most selective that keeps recall
    assert (1 - threshold ** (rows + 1)) ** (128 // (rows + 1)) > textproc.LSH_MAX_MISS


def test_lsh_layout_at_0_8_is_21_bands_of_6_rows():
    assert textproc.lsh_layout(0.8, 128) == (21, 6)


# -------------------------------------------------------------------------------------------- signatures


def test_minhash_signature_estimates_jaccard_and_is_deterministic():
    pairs = [planted(200, changed, f"s{changed}") for changed in (0, 20, 67, 200)]  # J = 1, 0.82, 0.5, 0
    sets = [s for pair in pairs for s in pair] + [set()]
    sig = textproc.minhash_signatures(sets, num_perm=256)
    assert sig.shape == (9, 256) and sig.dtype == np.uint32
    assert (sig[8] == 0xFFFFFFFF).all() and not (sig[:8] == 0xFFFFFFFF).all(axis=1).any()  # empty set: its own row
    for k in range(4):
        a, b = sets[2 * k], sets[2 * k + 1]
        estimate = (sig[2 * k] == sig[2 * k + 1]).mean()
        assert abs(estimate - textproc.jaccard(a, b)) < 0.1  # std sqrt(J(1-J)/256) <= 0.031
    assert (textproc.minhash_signatures(sets, num_perm=256) == sig).all()  # crc32, not hash(): same every run
    # chunked computation (many sets) gives the same rows as one set at a time
    many = [planted(50, 5, f"m{k}")[k % 2] for k in range(3000)]
    big = textproc.minhash_signatures(many)
    assert all((big[k] == textproc.minhash_signatures([many[k]])[0]).all() for k in (0, 1499, 2999))


# ---------------------------------------------------------------------------------------------- pairs


def test_similar_pairs_equal_brute_force_just_above_found_just_below_not():
    rng = random.Random(0)
    sets = []
    expected = set()
    # 100 shingles, changed -> J: 8 -> 0.852, 9 -> 0.835, 11 -> 0.802 (just above 0.8), 12 -> 0.786 (just below)
    for k, changed in enumerate([8, 9, 11, 12] * 15):
        a, b = planted(100, changed, f"p{k}")
        sets += [a, b]
        if changed <= 11:
            expected.add((len(sets) - 2, len(sets) - 1))
    sets += [{f"u{k}-{rng.randrange(10**6)}" for _ in range(rng.randint(1, 80))} for k in range(300)]
    sets.insert(17, set())  # empty sets pair with nothing
    expected = {(a + (a >= 17), b + (b >= 17)) for a, b in expected}
    assert brute_force(sets, 0.8) == expected
    pairs = textproc.similar_pairs(sets, 0.8)
    assert {(a, b) for a, b, _ in pairs} == expected
    assert all(a < b and sim == textproc.jaccard(sets[a], sets[b]) for a, b, sim in pairs)
    # in chunks of 7 sets (the empty one at 17 inside a chunk, pairs across chunk edges): the same pairs
    assert textproc.similar_pairs(sets, 0.8, chunk=7) == pairs


def test_lazy_shingles_give_the_same_pairs_as_the_sets():
    rng = random.Random(1)
    words = [f"w{k}" for k in range(400)]
    texts = []
    for _ in range(40):
        base = [rng.choice(words) for _ in range(60)]
        near = list(base)
        near[rng.randrange(60)] = "changed"  # one word changed: J of 5-word shingles ~0.9
        texts += [" ".join(base), " ".join(near)]
    texts.insert(5, "")
    sets = [textproc.shingles(t) for t in texts]
    want = textproc.similar_pairs(sets, 0.8)
    assert len(want) >= 30  # the planted pairs are there (a few may fall below 0.8 by chance)
    assert textproc.similar_pairs(textproc.LazyShingles(texts), 0.8, chunk=9) == want


def test_recall_holds_just_above_threshold():
    """The case datasketch's default layout loses ~30% of: 300 pairs at J 0.81-0.86 among unrelated sets."""
    rng = random.Random(1)
    sets = []
    for k in range(300):
        m, target = rng.randint(60, 200), rng.uniform(0.81, 0.86)
        changed = max(c for c in range(m) if (m - c) / (m + c) >= target)  # J in [target, target + 2/m]
        sets += list(planted(m, changed, f"r{k}"))
    found = {(a, b) for a, b, _ in textproc.similar_pairs(sets, 0.8)}
    assert found == brute_force(sets, 0.8) and len(found) == 300


def test_similar_pairs_at_the_split_group_threshold():
    # prep also asks for pairs >= 0.6 (records kept together in one split): a looser layout, same guarantee
    sets = []
    for k, changed in enumerate([20, 24, 25, 27] * 10):  # J 0.667, 0.613, 0.6, 0.575
        sets += list(planted(100, changed, f"g{k}"))
    assert {(a, b) for a, b, _ in textproc.similar_pairs(sets, 0.6)} == brute_force(sets, 0.6)
    assert len(brute_force(sets, 0.6)) == 30


def test_union_find_root_is_smallest_index():
    uf = textproc.UnionFind(6)
    for a, b in [(4, 5), (3, 5), (1, 2)]:
        uf.union(a, b)
    assert [uf.find(i) for i in range(6)] == [0, 1, 1, 3, 3, 3]


def test_a_large_bucket_of_near_identical_sets_is_screened_in_blocks(monkeypatch):
    """120 variants of one text (one bucket in most bands, 7,140 candidate pairs) among unrelated sets: with
    candidates made and screened 50 at a time, and only 8 sets cached while verifying, the pairs are exactly
    the brute-force ones -- the memory bounds change nothing found."""
    rng = random.Random(3)
    base = [f"b{k}" for k in range(100)]
    sets = [{f"u{k}-{rng.randrange(10**6)}" for _ in range(40)} for k in range(60)]
    for v in range(120):  # each variant drops 0-6 of the base shingles: J 0.94-1.0 with each other
        sets.insert(rng.randrange(len(sets) + 1), set(base) - set(rng.sample(base, rng.randint(0, 6))) | {f"v{v}"})
    want = textproc.similar_pairs(sets, 0.8)
    assert {(a, b) for a, b, _ in want} == brute_force(sets, 0.8) and len(want) == 120 * 119 // 2
    monkeypatch.setattr(textproc, "CANDIDATE_BLOCK", 50)
    monkeypatch.setattr(textproc, "VERIFY_CACHE", 8)
    assert textproc.similar_pairs(sets, 0.8) == want


def test_similar_clusters_are_the_components_of_the_pairs_with_few_checks():
    """Clusters at two thresholds == the connected components of brute-force pairs at each; a cluster of 120
    near-identical sets takes far fewer exact checks than its 7,140 pairs."""
    rng = random.Random(5)
    base = [f"b{k}" for k in range(100)]
    sets = [set(base) - set(rng.sample(base, rng.randint(0, 6))) | {f"v{v}"} for v in range(120)]
    for k, changed in enumerate([10, 20, 25, 40] * 8):  # J 0.82, 0.67, 0.6, 0.43: linked at 0.8, at 0.6, or not
        sets += list(planted(100, changed, f"c{k}"))
    sets += [{f"u{k}-{rng.randrange(10**6)}" for _ in range(40)} for k in range(50)]
    rng.shuffle(sets)

    def clusters(uf: textproc.UnionFind) -> set[frozenset[int]]:
        return {frozenset(i for i in range(len(sets)) if uf.find(i) == r) for r in {uf.find(i) for i in range(len(sets))}}

    def components(threshold: float) -> set[frozenset[int]]:
        uf = textproc.UnionFind(len(sets))
        for a, b in brute_force(sets, threshold):
            uf.union(a, b)
        return clusters(uf)

    high, low, checked = textproc.similar_clusters(sets, 0.8, 0.6)
    assert clusters(high) == components(0.8) and clusters(low) == components(0.6)
    assert components(0.8) != components(0.6) and max(map(len, components(0.8))) == 120
    assert checked < 1000  # the 120-set cluster alone has 7,140 pairs
