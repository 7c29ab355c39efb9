"""Text in, text out: decoding, cleaning, page furniture, sections, and near-duplicate detection.

Everything here works on strings and lists; reading file formats and writing records is `stages/prep.py`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import regex

# ------------------------------------------------------------------------------------------------ decoding


class UndecodableText(ValueError):
    """Binary data with a text file's name, or bytes that no encoding we can tell turns into text."""


def decode_text(data: bytes) -> tuple[str, str]:
    """Bytes of a text file -> (text, encoding used); raises UndecodableText.

    In order: a UTF-8/16/32 BOM; NUL bytes mean UTF-16 without a BOM when they sit in every other byte (ASCII
    text saved as "Unicode"), else binary data; UTF-8, which is self-validating; Windows-1252 (what "ANSI"
    files in Western Europe and the US are) when that gives mostly ASCII letters, as Western text does;
    else charset-normalizer's guess (Shift-JIS, EUC-JP, TIS-620, Windows-1251, ...), which returns nothing
    for bytes no encoding explains. charset-normalizer alone would read Western text as Windows-1250 and
    turn "crème" into "crčme", hence the Windows-1252 step before it."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace"), "utf-8-sig"
    for bom, enc in ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
                     (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if data.startswith(bom):
            return data[len(bom):].decode(enc, errors="replace"), enc
    head = data[:65536]
    if b"\x00" in head:
        half = len(head) / 2
        nul_even, nul_odd = head[0::2].count(0), head[1::2].count(0)
        for enc, nul, other in (("utf-16-le", nul_odd, nul_even), ("utf-16-be", nul_even, nul_odd)):
            if nul > 0.4 * half and other < 0.02 * half:
                return data.decode(enc, errors="replace"), enc
        raise UndecodableText("binary data (NUL bytes), not text")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp1252")
        letters = [c for c in text[:65536] if c.isalpha()]
        if sum(c.isascii() for c in letters) >= 0.7 * len(letters):
            return text, "cp1252"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise UndecodableText("undecodable: not UTF-8, UTF-16/32, Windows-1252 or another encoding charset-normalizer knows")
    return str(best), best.encoding


# ------------------------------------------------------------------------------------------------ cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u00ad\u200b\u200e\u200f\ufeff]")  # soft hyphen, ZW space, marks
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")


def normalize(text: str) -> str:
    """NFKC (full-width digits and letters, ligatures, NBSP -> plain; Thai SARA AM kept whole), no control
    characters, one space between words, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    # NFKC splits Thai SARA AM (and its Lao twin) into NIKHAHIT + SARA AA: same look, different text to a
    # tokenizer and to a search for the original; put them back together
    text = text.replace("\u0e4d\u0e32", "\u0e33").replace("\u0ecd\u0eb2", "\u0eb3")
    text = _CONTROL.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_PAGE_NUMBER = re.compile(
    r"(?i)^(?:[-–—]\s*)?(?:page|p\.|seite|página|pagina|ページ)?\s*\d{1,4}(?:\s*(?:/|of|von|de|di|sur)\s*\d{1,4})?(?:\s*[-–—])?$"
)
EDGE_LINES = 3  # headers and footers live in the first/last few lines a PDF page yields


def strip_page_furniture(pages: list[str]) -> tuple[list[str], dict]:
    """Drop running headers/footers and page numbers from the pages of one document.

    A header/footer is a line among the first or last EDGE_LINES of a page that recurs (digits ignored, so
    "Page 3 of 9" matches "Page 4 of 9") on at least half of the pages (and at least 2). Page numbers are
    dropped only in those edge lines, so a "42" in a table body survives. Returns (pages, counts).
    """
    split = [[ln for ln in p.split("\n")] for p in pages]
    key = _furniture_key
    seen_on: dict[str, int] = {}
    for lines in split:
        edge = {key(ln) for ln in _edge(lines) if ln.strip()}
        for k in edge:
            seen_on[k] = seen_on.get(k, 0) + 1
    need = max(2, math.ceil(len(pages) / 2))
    repeated = {k for k, n in seen_on.items() if n >= need} if len(pages) >= 2 else set()
    counts = {"header_footer_lines": 0, "page_number_lines": 0}
    out = []
    for lines in split:
        n = len(lines)
        edge_idx = set(range(min(EDGE_LINES, n))) | set(range(max(0, n - EDGE_LINES), n))
        kept = []
        for i, ln in enumerate(lines):
            if i in edge_idx and ln.strip():
                if _PAGE_NUMBER.match(ln.strip()):
                    counts["page_number_lines"] += 1
                    continue
                if key(ln) in repeated:
                    counts["header_footer_lines"] += 1
                    continue
            kept.append(ln)
        out.append("\n".join(kept))
    return out, counts


def _edge(lines: list[str]) -> list[str]:
    nonblank = [ln for ln in lines if ln.strip()]
    return nonblank[:EDGE_LINES] + nonblank[-EDGE_LINES:]


BOILERPLATE_MAX_CHARS = 200  # a disclaimer or copyright line is short; a repeated long paragraph is dedup's job


def _furniture_key(text: str) -> str:
    return re.sub(r"\d+", "#", " ".join(text.split()).casefold())


class RepeatedParagraphs:
    """The short paragraphs many documents share: the copyright line, disclaimer or "Contact the service desk"
    box every page of an intranet carries. Documents are added one at a time and only their short paragraphs'
    keys are kept (once each, with a count), so a corpus streams through. Digits are ignored, so "(c) 2023" and
    "(c) 2024" match."""

    def __init__(self):
        self.seen_in: dict[str, int] = {}  # paragraph key -> documents it is in

    def add(self, paragraphs: Iterable[str]) -> None:
        """One document's paragraphs."""
        for k in {_furniture_key(p) for p in paragraphs if len(p) <= BOILERPLATE_MAX_CHARS}:
            self.seen_in[k] = self.seen_in.get(k, 0) + 1

    def keys(self, min_docs: int) -> set[str]:
        """Keys (see `is_repeated`) of the paragraphs found in at least `min_docs` of the documents added."""
        return {k for k, n in self.seen_in.items() if n >= min_docs}


def is_repeated(text: str, keys: set[str]) -> bool:
    return len(text) <= BOILERPLATE_MAX_CHARS and _furniture_key(text) in keys


def is_noise(text: str) -> bool:
    """No letter or digit at all: rules ("-----", "* * *"), bullets without text, box-drawing art."""
    return not any(c.isalnum() for c in text)


def quality_issue(text: str) -> str | None:
    """Why a section is not worth training on, or None: mostly digits and symbols (a number dump, a scanned
    table read badly), or the same few words over and over (a spreadsheet export, a keyboard held down)."""
    chars = [c for c in text if not c.isspace()]
    if len(chars) >= 40 and sum(c.isalpha() for c in chars) < 0.3 * len(chars):
        return "mostly digits and symbols"
    words = text.casefold().split()
    if len(words) >= 20 and len(set(words)) < 0.2 * len(words):
        return "repetitive"
    return None


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class Block:
    """A heading or a paragraph of a document, with where it came from ("page 3", "line 18")."""

    text: str
    location: str
    heading: bool = False


@dataclass
class Section:
    heading: str | None
    text: str
    location: str
    part: int = 1  # a long section is cut into parts of about chunk_chars
    parts: int = 1


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])")


def looks_like_heading(line: str, prev: str | None, next_line: str | None = None) -> bool:
    """A heading in text without markup (PDF text layer, .txt): short, no closing punctuation, starts with a
    capital or a number ("2.1 Carry-over"), follows a finished sentence and is not continued by a lowercase
    line (a sentence wrapped across lines is not a heading, however short its lines)."""
    line = line.strip()
    if not line or len(line) > 70 or line[-1] in ".,;:!?" or "|" in line:
        return False
    if prev and prev.strip() and prev.strip()[-1] not in ".!?:":
        return False
    if next_line and next_line.strip() and next_line.strip()[0].islower():
        return False
    if re.match(r"^[-*•·▪]\s", line) or len(line.split()) > 10:
        return False
    return line[0].isupper() or bool(re.match(r"^\d+(?:\.\d+)*\.?\s+[^\W\d_]", line))


def lines_to_blocks(lines: list[tuple[str, str]], detect_headings: bool = True) -> list[Block]:
    """(line, location) pairs -> blocks: blank lines end paragraphs, heading-looking lines become headings,
    wrapped lines of one paragraph are joined with a space."""
    blocks: list[Block] = []
    guessed: set[int] = set()  # headings found by looks_like_heading, not by markup
    para: list[str] = []
    para_loc = ""
    prev = None

    def flush():
        nonlocal para
        if para:
            blocks.append(Block(" ".join(para), para_loc))
            para = []

    for n, (line, loc) in enumerate(lines):
        s = line.strip()
        if not s:
            flush()
            prev = None
            continue
        if s.startswith("#") and re.match(r"^#{1,6}\s+\S", s):  # Markdown heading
            flush()
            blocks.append(Block(s.lstrip("#").strip(), loc, heading=True))
            prev = None
            continue
        if is_noise(s):  # a rule or a lone bullet ends the paragraph; prep drops (and counts) such blocks
            flush()
            blocks.append(Block(s, loc))
            prev = None
            continue
        if detect_headings and looks_like_heading(s, prev, lines[n + 1][0] if n + 1 < len(lines) else None):
            flush()
            guessed.add(len(blocks))
            blocks.append(Block(s, loc, heading=True))
            prev = None
            continue
        if not para:
            para_loc = loc
        # a bullet or table row starts its own line; wrapped prose lines join into one paragraph
        if para and re.match(r"^(?:[-*•·▪]\s|\d+[.)]\s|\|)", s):
            flush()
            para_loc = loc
        para.append(s)
        prev = s
    flush()
    # a guessed heading with no text under it was a short line of text ("Replace it every year"): keep it as text
    for i in guessed:
        if i + 1 == len(blocks) or blocks[i + 1].heading:
            blocks[i].heading = False
    return blocks


def make_sections(blocks: list[Block], chunk_chars: int) -> list[Section]:
    """Group blocks under their heading and cut each group into parts of about `chunk_chars` characters, at
    paragraph boundaries, or at sentence boundaries inside a paragraph that is too long on its own."""
    groups: list[tuple[str | None, list[Block]]] = []
    for b in blocks:
        if b.heading:
            groups.append((b.text, []))
        else:
            if not groups:
                groups.append((None, []))
            groups[-1][1].append(b)
    out: list[Section] = []
    for heading, paras in groups:
        pieces: list[tuple[str, str]] = []  # (text, location)
        for p in paras:
            for chunk in _split_long(p.text, chunk_chars):
                if pieces and len(pieces[-1][0]) + 1 + len(chunk) <= chunk_chars:
                    pieces[-1] = (pieces[-1][0] + "\n" + chunk, pieces[-1][1])
                else:
                    pieces.append((chunk, p.location))
        for k, (text, loc) in enumerate(pieces, 1):
            out.append(Section(heading, text, loc, k, len(pieces)))
    return out


def _split_long(text: str, chunk_chars: int) -> list[str]:
    if len(text) <= chunk_chars * 1.5:
        return [text]
    out, cur = [], ""
    for sent in _SENTENCE_END.split(text):
        if cur and len(cur) + 1 + len(sent) > chunk_chars:
            out.append(cur)
            cur = sent
        else:
            cur = f"{cur} {sent}".strip() if cur else sent
        while len(cur) > chunk_chars * 1.5:  # one enormous "sentence" (a table dump): cut at a space
            cut = cur.rfind(" ", 0, chunk_chars)
            cut = cut if cut > 0 else chunk_chars
            out.append(cur[:cut].strip())
            cur = cur[cut:].strip()
    if cur:
        out.append(cur)
    return out


def first_words(text: str, n: int = 8) -> str:
    words = text.split()
    return " ".join(words[:n]) + ("..." if len(words) > n else "")


# ------------------------------------------------------------------------------------------------- dedup

# `regex`, not `re`: its \w includes combining marks, so Thai "สวัสดี" and Hindi "नमस्ते" stay whole words (`re`
# splits them at every vowel sign and drops the signs). A pinned dependency of transformers already.
_WORD = regex.compile(r"\w+")
# Scripts written without spaces between words: a "word" there is a whole clause, so shingles are characters
_NO_SPACE_SCRIPT = re.compile(r"[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LSH_MAX_MISS = 0.005  # chance that LSH fails to propose a pair exactly at min_jaccard (higher similarity: less)
ESTIMATE_MARGIN = 0.15  # 4+ standard deviations of the signature estimate of J (P=128): below J - this, J is surely lower
CANDIDATE_BLOCK = 1 << 20  # LSH candidate pairs made and screened at a time (8 MB of int64)
VERIFY_CACHE = 2048  # shingle sets similar_pairs keeps while it verifies candidates (~20 KB each for a 1,000-char text)


def dedup_key(text: str) -> str:
    """Equal for texts that differ only in case, punctuation, whitespace or Unicode form."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return hashlib.sha256(" ".join(words).encode()).hexdigest()


def shingles(text: str, words_per_shingle: int = 5, chars_per_shingle: int = 5) -> set[str]:
    """Word 5-grams; character 5-grams when most letters belong to a script written without spaces (Japanese,
    Chinese, Thai, Lao, Khmer, Myanmar). Case, punctuation and whitespace are ignored either way.

    A text shorter than one shingle is one shingle: two short utterances are then near-duplicates only when
    equal, which is right for commands like "turn on the light" vs "turn off the light"."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    if not words:
        return set()
    chars = "".join(words)
    if 2 * len(_NO_SPACE_SCRIPT.findall(chars)) > len(chars):
        k = min(chars_per_shingle, len(chars))
        return {chars[i : i + k] for i in range(len(chars) - k + 1)}
    k = min(words_per_shingle, len(words))
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def lsh_layout(min_jaccard: float, num_perm: int, max_miss: float = LSH_MAX_MISS) -> tuple[int, int]:
    """(bands, rows per band) for MinHash LSH: the most rows per band (fewest chance candidates) for which a
    pair at exactly `min_jaccard` is still missed with probability <= max_miss. A pair of similarity s is a
    candidate unless every band differs: P(miss) = (1 - s**rows) ** bands.

    The usual layout minimizes false positive + false negative area around the threshold, which puts the
    threshold mid-slope: datasketch's threshold=0.8 at 128 permutations misses ~30% of pairs at J=0.85
    (measured, bench/dedup.py). Here the curve's foot sits at the threshold and exact verification removes
    the extra candidates it lets in. 0.8 -> 21 bands x 6 rows (miss 0.2% at 0.8, 0.02% at 0.835)."""
    for rows in range(num_perm, 0, -1):
        if (1 - min_jaccard**rows) ** (num_perm // rows) <= max_miss:
            return num_perm // rows, rows
    return num_perm, 1


def minhash_signatures(shingle_sets: list[set[str]], num_perm: int = 128, seed: int = 1) -> "np.ndarray":
    """(len(shingle_sets), num_perm) uint32 MinHash signatures, all sets at once in numpy.

    A shingle is hashed once to 32 bits (crc32: deterministic across processes, unlike hash()); permutation
    p maps x to the top 32 bits of (a_p * x + b_p) mod 2**64 with a_p odd (multiply-add-shift, a 2-universal
    family). An empty set's signature is all 0xFFFFFFFF."""
    import zlib

    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # (P,) odd
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)  # (P,)
    sizes = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=len(shingle_sets))
    flat = np.fromiter((zlib.crc32(x.encode()) for s in shingle_sets for x in s), dtype=np.uint64, count=int(sizes.sum()))
    offsets = np.r_[0, np.cumsum(sizes)]  # shingles of set d: flat[offsets[d]:offsets[d + 1]]
    sig = np.full((len(shingle_sets), num_perm), 0xFFFFFFFF, dtype=np.uint32)
    # sets in chunks of ~16 MB of (P, shingles) hashes (+ 8 MB as uint32: the transient memory; larger chunks are
    # no faster); a single larger set is one chunk of its own
    chunks, width = [0], 0
    for d, size in enumerate(sizes.tolist()):
        if width + size > (16 << 20) // (8 * num_perm) and d > chunks[-1]:
            chunks.append(d)
            width = 0
        width += size
    chunks.append(len(shingle_sets))
    for d0, d1 in zip(chunks[:-1], chunks[1:]):
        docs = np.flatnonzero(sizes[d0:d1]) + d0  # empty sets keep their all-0xFFFFFFFF row
        if len(docs):
            # (P, shingles): each permutation's row is contiguous, so the per-set minimum (reduceat along
            # axis 1) streams through memory -- 3x faster than the (shingles, P) layout
            h = np.multiply.outer(a, flat[offsets[d0] : offsets[d1]])  # wraps mod 2**64: the point
            h += b[:, None]
            h >>= np.uint64(32)
            sig[docs] = np.minimum.reduceat(h.astype(np.uint32), offsets[docs] - offsets[d0], axis=1).T
    return sig


class LazyShingles:
    """The shingle sets of `texts`, made when one is asked for and not kept: `similar_pairs` over a large corpus
    then holds the (n, P) signatures and one chunk of sets, not every set (a set of 5-word shingles takes ~10x the
    memory of its text)."""

    def __init__(self, texts: Sequence[str]):  # a list, or a sequence that reads each text when asked (from disk)
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> set[str]:
        return shingles(self.texts[i])


def similar_pairs(shingle_sets, min_jaccard: float, num_perm: int = 128, seed: int = 1,
                  chunk: int = 1024) -> list[tuple[int, int, float]]:
    """Pairs (i, j, exact Jaccard) with i < j and Jaccard >= min_jaccard, found with MinHash LSH.

    `shingle_sets`: a list of sets, or a sequence that makes them on access (`LazyShingles`); they are read
    `chunk` at a time for the signatures, and again only for the candidate pairs' exact check.
    LSH only proposes candidates, with a band layout chosen so it misses at most LSH_MAX_MISS of the pairs at
    min_jaccard (`lsh_layout`). Candidates whose signatures agree on far fewer positions than min_jaccard
    (4+ standard deviations below) are dropped cheaply; every other one is checked with the exact Jaccard of
    its shingle sets, so there are no false pairs. A cluster of s near-identical sets has s(s-1)/2 pairs: to
    know only who belongs with whom, `similar_clusters` checks far fewer."""
    pairs = []
    for a, b, _est, made in _candidates(shingle_sets, min_jaccard, num_perm, seed, chunk):
        sim = jaccard(made(a), made(b))
        if sim >= min_jaccard:
            pairs.append((a, b, sim))
    return sorted(pairs)


def similar_clusters(shingle_sets, high: float, low: float, num_perm: int = 128, seed: int = 1,
                     chunk: int = 1024) -> tuple["UnionFind", "UnionFind", int]:
    """The clusters of the sets linked by a chain of pairs with exact Jaccard >= `high`, and of those linked at
    >= `low` (low <= high): the components `similar_pairs` would give at each threshold, found without listing
    every pair. A candidate pair already in one `high` cluster is not checked again, so a cluster of s
    near-identical sets costs about s exact checks, not s(s-1)/2, and memory holds no pair list.
    Returns (high clusters, low clusters, exact checks made); indices are positions in `shingle_sets`."""
    high_uf, low_uf, checked = UnionFind(len(shingle_sets)), UnionFind(len(shingle_sets)), 0
    for a, b, est, made in _candidates(shingle_sets, low, num_perm, seed, chunk):
        if high_uf.find(a) == high_uf.find(b):
            continue  # already joined at high, so at low too
        if est < high - ESTIMATE_MARGIN and low_uf.find(a) == low_uf.find(b):
            continue  # joined at low already, and the signatures say it is far below high (see _candidates)
        sim = jaccard(made(a), made(b))
        checked += 1
        if sim >= low:
            low_uf.union(a, b)
            if sim >= high:
                high_uf.union(a, b)
    return high_uf, low_uf, checked


def _candidates(shingle_sets, min_jaccard: float, num_perm: int, seed: int, chunk: int):
    """LSH candidate pairs for `similar_pairs` / `similar_clusters`: yields (i, j, made) with i < j (positions
    in shingle_sets), one connected group of candidates after another, where made(i) gives set i from a small
    cache."""
    import numpy as np

    # the non-empty sets' signatures, filled in chunk by chunk (a set's signature does not depend on the others
    # in its call); np.empty's pages are only resident once written, so the rows of empty sets cost nothing
    idx = np.empty(len(shingle_sets), dtype=np.int64)  # row -> position in shingle_sets
    sig = np.empty((len(shingle_sets), num_perm), dtype=np.uint32)
    n = 0
    for c0 in range(0, len(shingle_sets), chunk):
        sets = [shingle_sets[i] for i in range(c0, min(c0 + chunk, len(shingle_sets)))]
        nonempty = [k for k, s in enumerate(sets) if s]
        if nonempty:
            idx[n : n + len(nonempty)] = np.array(nonempty) + c0
            sig[n : n + len(nonempty)] = minhash_signatures([sets[k] for k in nonempty], num_perm, seed)
            n += len(nonempty)
    if n < 2:
        return
    idx, sig = idx[:n], sig[:n]  # (n,), (n, P) views
    bands, rows = lsh_layout(min_jaccard, num_perm)
    mix = np.random.default_rng(seed + 1).integers(1, 2**63, rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    # Candidate pairs are i * n + j (positions in idx, i < j). A bucket of s records proposes s(s-1)/2 of them
    # in every band it forms, so they are made in blocks of about CANDIDATE_BLOCK and screened at once: only
    # those whose signatures agree on nearly min_jaccard of their positions are kept (the estimate of J has std
    # sqrt(J(1-J)/P), 0.035 at J=0.8, P=128: ESTIMATE_MARGIN 0.15 loses nothing). Memory stays at a block plus the
    # plausible pairs, however large a bucket of near-identical records gets.
    cand, agree = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)  # agree: signature agreement share
    for band in range(bands):
        with np.errstate(over="ignore"):
            key = sig[:, band * rows : (band + 1) * rows].astype(np.uint64) @ mix  # (n,) a 64-bit bucket key per record
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        lens = np.diff(np.r_[starts, n])
        block, in_block, kept = [], 0, [(cand, agree)]
        for s, size in zip(starts[lens > 1].tolist(), lens[lens > 1].tolist()):
            for part in _bucket_pairs(np.sort(order[s : s + size]), n):
                block.append(part)
                in_block += len(part)
                if in_block >= CANDIDATE_BLOCK:
                    kept.append(_plausible(np.concatenate(block), cand, sig, n, min_jaccard - ESTIMATE_MARGIN))
                    block, in_block = [], 0
        if block:
            kept.append(_plausible(np.concatenate(block), cand, sig, n, min_jaccard - ESTIMATE_MARGIN))
        cand = np.concatenate([c for c, _ in kept])  # no pair twice: _plausible skipped the known ones
        by_pair = np.argsort(cand, kind="stable")
        cand, agree = cand[by_pair], np.concatenate([a for _, a in kept])[by_pair]
    ci, cj = (cand // n).astype(np.int32), (cand % n).astype(np.int32)  # n < 2**31 records
    del sig, cand  # the signatures are not needed for the exact checks
    # One connected group of candidates after another (a cluster of near-duplicates together), with the shingle
    # sets in an LRU cache of VERIFY_CACHE: each set is made about once, and memory holds that many sets rather
    # than every set in some pair (a set of shingles takes ~10x its text).
    linked = UnionFind(n)
    for i, j in zip(map(int, ci), map(int, cj)):
        linked.union(i, j)
    root = np.fromiter((linked.find(i) for i in range(n)), dtype=np.int32, count=n)
    del linked
    order = np.lexsort((cj, ci, root[ci]))
    made = functools.lru_cache(maxsize=VERIFY_CACHE)(shingle_sets.__getitem__)
    for o0 in range(0, len(order), 1 << 16):
        o = order[o0 : o0 + (1 << 16)]
        yield from ((a, b, est, made) for a, b, est in zip(idx[ci[o]].tolist(), idx[cj[o]].tolist(), agree[o].tolist()))


def _bucket_pairs(members, n: int):
    """The pairs of one LSH bucket (`members`: sorted positions) as i * n + j, in blocks of at most about
    CANDIDATE_BLOCK (rows of the upper triangle: row r pairs members[r] with every later member)."""
    import numpy as np

    size = len(members)
    if size * (size - 1) // 2 <= CANDIDATE_BLOCK:
        i, j = np.triu_indices(size, 1)
        yield members[i] * n + members[j]
        return
    r0 = 0
    while r0 < size - 1:
        r1, count = r0 + 1, size - 1 - r0  # rows r0 .. r1-1; row r has size-1-r pairs
        while r1 < size - 1 and count + size - 1 - r1 <= CANDIDATE_BLOCK:
            count += size - 1 - r1
            r1 += 1
        row_of = np.repeat(np.arange(r0, r1), size - 1 - np.arange(r0, r1))  # (count,)
        first = np.r_[0, np.cumsum(size - 1 - np.arange(r0, r1 - 1))]  # where each row starts in the block
        j = np.arange(count) - np.repeat(first, size - 1 - np.arange(r0, r1)) + row_of + 1
        yield members[row_of] * n + members[j]
        r0 = r1


def _plausible(cand, known, sig, n: int, min_agree: float):
    """(candidates, their signature agreement): the candidates (i * n + j) not in `known` (sorted: earlier
    bands' plausible pairs) whose signatures agree on at least `min_agree` of their positions."""
    import numpy as np

    if len(known):
        at = np.searchsorted(known, cand).clip(max=len(known) - 1)
        cand = cand[known[at] != cand]
    agree = np.empty(len(cand), dtype=np.float32)
    for c0 in range(0, len(cand), 1 << 14):  # (16,384, P) uint32 rows at a time: 8 MB per side
        c = cand[c0 : c0 + (1 << 14)]
        agree[c0 : c0 + len(c)] = (sig[c // n] == sig[c % n]).mean(axis=1)
    keep = agree >= min_agree
    return cand[keep], agree[keep]


class UnionFind:
    """Clusters from pairs; the root of a cluster is its smallest index."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
