"""Text in, text out: decoding, cleaning, page furniture, sections, and near-duplicate detection.

Everything here works on strings and lists; reading file formats and writing records is `stages/prep.py`.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------ decoding


def decode_text(data: bytes) -> tuple[str, str]:
    """Bytes of a text file -> (text, encoding used).

    UTF-8 (with or without BOM) first, since it is both the common case and self-validating; then a UTF-16/32
    BOM (Windows "Unicode" exports); else cp1252, the Windows Western code page that "ANSI" files use; latin-1
    last, which decodes any byte (cp1252 leaves five bytes undefined)."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace"), "utf-8-sig"
    for bom, enc in ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
                     (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if data.startswith(bom):
            return data[len(bom):].decode(enc, errors="replace"), enc
    for enc in ("utf-8", "cp1252"):
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), "latin-1"


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
    key = lambda line: re.sub(r"\d+", "#", line.strip().lower())  # noqa: E731
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

_WORD = re.compile(r"\w+")


def dedup_key(text: str) -> str:
    """Equal for texts that differ only in case, punctuation, whitespace or Unicode form."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return hashlib.sha256(" ".join(words).encode()).hexdigest()


def shingles(text: str, words_per_shingle: int = 5, chars_per_shingle: int = 5) -> set[str]:
    """Word 5-grams; character 5-grams for text written without spaces between words (Japanese, Thai, Chinese).

    A text shorter than one shingle is one shingle: two short utterances are then near-duplicates only when
    equal, which is right for commands like "turn on the light" vs "turn off the light"."""
    norm = unicodedata.normalize("NFKC", text).casefold()
    words = _WORD.findall(norm)
    if not words:
        return set()
    if sum(map(len, words)) / len(words) > 12:  # few spaces: CJK / Thai runs
        chars = re.sub(r"\s+", "", norm)
        k = min(chars_per_shingle, len(chars))
        return {chars[i : i + k] for i in range(len(chars) - k + 1)}
    k = min(words_per_shingle, len(words))
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def similar_pairs(shingle_sets: list[set[str]], min_jaccard: float, num_perm: int = 128, seed: int = 1) -> list[tuple[int, int, float]]:
    """Pairs (i, j, exact Jaccard) with i < j and Jaccard >= min_jaccard, found with MinHash LSH.

    LSH only proposes candidates: its band layout misses many pairs just above its threshold (69% recall at
    J=0.85 for threshold 0.8, measured), so it runs 0.2 below `min_jaccard`, where recall at `min_jaccard` is
    ~100%, and every candidate is then checked with the exact Jaccard of its shingle sets, so there are no
    false pairs."""
    from datasketch import MinHash, MinHashLSH

    idx = [i for i, s in enumerate(shingle_sets) if s]
    if len(idx) < 2:
        return []
    hashes = MinHash.bulk([[x.encode() for x in shingle_sets[i]] for i in idx], num_perm=num_perm, seed=seed)
    lsh = MinHashLSH(threshold=max(0.1, min_jaccard - 0.2), num_perm=num_perm)
    pairs = []
    for i, mh in zip(idx, hashes):
        for j in lsh.query(mh):  # earlier records only: each pair once
            sim = jaccard(shingle_sets[i], shingle_sets[j])
            if sim >= min_jaccard:
                pairs.append((j, i, sim))
        lsh.insert(i, mh)
    return sorted(pairs)


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
