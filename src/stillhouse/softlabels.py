"""The soft-label format: the teacher's top-k log-probabilities per response token, written by `label`, read by `train`.

This module is the only code that knows the bytes. A shard is a safetensors file (tensors + a string metadata
dict, never pickle) holding the labels of many records; `write_shard` writes one atomically, `ShardReader`
memory-maps one and decodes a record at a time. The same entries always give the same bytes (the metadata is one
key holding sorted JSON: safetensors writes several keys in hash order, which changes from process to process), so
a resumed or multi-process labeling run is byte-identical to a single uninterrupted one.

Per record, the index holds its number of positions (`lengths`, in the smallest unsigned integer type that fits:
one byte for responses under 256 tokens) and its id (`record_ids`: the JSON list of ids, zlib-compressed, ~3
bytes per id for sequential ids like `intents-00017`, against ~17 as plain JSON): on short responses (classification
labels are ~5 tokens) a per-record int64 offset and plain id cost ~5 bytes per token.

What is stored, per response position (teacher log-probabilities `lp` at temperature T, full-vocabulary
log-softmax first, then top-k, sorted so lp[0] >= lp[1] >= ... >= lp[k-1]; r_j = lp[0] - lp[j] >= 0):

    ids         (k,)     token ids in rank order, ceil(log2 V) bits each           16 bits at V = 49,152
    tail_logit  ()       float16 log(tail / (1 - tail)); tail = 1 - sum(exp(lp)), the mass outside the top-k
    head_gaps   (4,)     float16 r_1 .. r_4
    step_code   ()       uint8: the grid step s = 2 ** (step_code / 16 - 14)
    gap_codes   (k-5,)   r_5 .. r_{k-1} on a grid, delta-coded: ranks 5-8 in 9 bits with unit s, ranks 9-16 in
                         7 bits with unit 2s, ranks 17+ in 6 bits with unit 3s

The top-k's *shape* (the r_j) is quantized. Its *level* is never stored: the reader recovers it from the tail
mass, so sum(exp(lp)) is exactly 1 - tail. The tail mass (what the loss's extra bucket holds, see
`stillhouse.losses`) is stored as its logit, which one float16 keeps to ~0.1-1% relative error on both the
tail and the top-k mass, whether the tail is 0.9, 0.5 or 1e-9 (the fp32 log-probabilities `get` returns
carry it down to ~1e-7, smaller when the top-1 holds nearly all the mass). Storing fp16 log-probabilities and
deriving the tail as 1 - sum loses it to cancellation when the top-k holds nearly all the mass.

The ranks that carry the most probability (and the largest gaps) keep float16 precision in `head_gaps`. The
rest have small, increasing gaps: each code is the number of grid units from the previous rank's grid position,
rounded against the exact r_j, so every value is off by at most half its unit and errors do not accumulate.
s is the smallest step on a 2**(1/16) ladder for which every code fits its bits; lower ranks get wider units
and fewer bits because they carry less probability.

Bytes per token (k >= 17): k * id_bits / 8 + 11 + (36 + 56 + 6 * (k - 17)) / 8 = 64 + 11 + 22.75 = 97.75 at
k = 32, V = 49,152, plus ~4 bytes per record (the index above) and the header (~0.7 KB per shard). On real SmolLM2-135M logits the
reconstruction KL this adds is 0.3-0.4x that of float16 log-probabilities + int32 ids (192 bytes per token);
see `reconstruction_kl` and tests/test_softlabels.py.

Log-probabilities below LOGPROB_FLOOR (-100; exp(-100) ~ 4e-44 is zero in fp32) are stored as the floor, and
ranks 5+ more than 24 nats below rank 4 (< 4e-11 of its probability) as 24 below, so that one huge gap cannot
coarsen every step.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stillhouse.errors import StillhouseError
from stillhouse.workspace import atomic_write_bytes

FORMAT_NAME = "stillhouse-softlabels"
FORMAT_VERSION = 2  # 2: one sorted-JSON metadata key, per-record lengths + compressed ids (1: int64 offsets)
LOGPROB_FLOOR = -100.0
_HEAD_EXACT = 4  # r_1..r_4 as float16
# gap-code schedule: (last rank of the segment, bits per code, grid unit in steps s); the last runs to k - 1
_CODE_SEGMENTS = ((8, 9, 1.0), (16, 7, 2.0), (None, 6, 3.0))
_CODED_SPAN = 24.0  # nats below rank 4 beyond which ranks 5+ are clipped
# s = 2 ** (step_code / 16 - 14): 256 codes from 6.1e-5 to 3.8 nats; the largest ever needed is 24 / 186 = 0.13
_STEP_CODES_PER_OCTAVE = 16
_STEP_MIN_LOG2 = -14
_PACK_CHUNK_BITS = 1 << 20  # bits per packing chunk: the (rows, row bits) uint64 matrix stays at 8 MB


# ------------------------------------------------------------------------------------------- teacher side


def topk_logprobs(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The teacher's soft labels for a batch of positions.

    (N, V) logits -> ids (N, k) int64 and logprobs (N, k) float32, sorted by logprob, descending:
    log_softmax(logits / T) over the FULL vocabulary first (in fp32), then top-k. Never the other way round:
    renormalizing raw top-k logits makes up a different distribution and loses the tail mass.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in 1..{logits.shape[-1]} (the vocabulary size), got {k}")
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V) fp32
    values, ids = logprobs.topk(k, dim=-1, sorted=True)  # (N, k), (N, k)
    return ids.long(), values


def reconstruction_kl(full_logprobs: Tensor, ids: Tensor, logprobs: Tensor) -> float:
    """How much of the teacher's distribution a stored top-k keeps: mean over positions of KL(p || q), in nats.

    full_logprobs (N, V): the teacher's log-probabilities at T over the full vocabulary; ids, logprobs (N, k):
    what was stored (or any other top-k to compare). q is the distribution the top-k implies: exp(logprobs) on
    the k ids and the tail mass 1 - sum(exp(logprobs)) spread uniformly over the other V - k tokens (the tail
    floored at exp(LOGPROB_FLOOR), as in the loss, and q renormalized, which only matters when a lossy
    top-k claims more than all the mass). Computed in float64. It has two parts: the truncation to k (the
    uniform tail; large, the same for every encoding of the same top-k) and the quantization (small).
    """
    p_log = full_logprobs.double()  # (N, V)
    n, vocab = p_log.shape
    k = ids.shape[-1]
    q_top = logprobs.double().clamp_min(LOGPROB_FLOOR)  # (N, k)
    top_mass = q_top.exp().sum(-1, keepdim=True)  # (N, 1)
    log_tail = torch.log((1.0 - top_mass).clamp_min(math.exp(LOGPROB_FLOOR)))  # (N, 1)
    q_log = (log_tail - math.log(max(vocab - k, 1))).expand(n, vocab).clone()  # (N, V) uniform tail
    q_log.scatter_(1, ids.long(), q_top)
    q_log = q_log - torch.logsumexp(q_log, -1, keepdim=True)  # renormalize: a no-op while the top-k mass is <= 1
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))  # 0 * log 0 = 0
    return float(terms.sum(-1).mean())


# --------------------------------------------------------------------------------------------- bit packing


def _length_dtype(longest: int):
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if longest <= np.iinfo(t).max)


def _id_bits(vocab_size: int) -> int:
    return max(1, (vocab_size - 1).bit_length())  # ceil(log2 V): 16 at 49,152, 18 at 262,144


def _pack_bits(values: np.ndarray, widths: list[int]) -> np.ndarray:
    """(M, C) non-negative integers, column c in widths[c] bits -> one little-endian bit stream, row after row,
    as uint8 bytes (the last one zero-padded). Rows are sum(widths) bits and need not end on a byte."""
    row_bits = sum(widths)
    if row_bits == 0:
        return np.zeros(0, dtype=np.uint8)
    values = np.asarray(values, dtype=np.uint64).reshape(-1, len(widths))
    source = np.repeat(np.arange(len(widths)), widths)  # (row_bits,) the column each bit comes from
    shift = np.concatenate([np.arange(w) for w in widths]).astype(np.uint64)  # (row_bits,) LSB first
    rows_per_chunk = max(8, _PACK_CHUNK_BITS // max(row_bits, 1) // 8 * 8)  # a multiple of 8: whole bytes
    chunks = []
    for start in range(0, len(values), rows_per_chunk):
        bit_matrix = (values[start : start + rows_per_chunk, source] >> shift) & np.uint64(1)  # (rows, row_bits)
        chunks.append(np.packbits(bit_matrix.astype(np.uint8).ravel(), bitorder="little"))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)


def _unpack_bits(buf: np.ndarray, widths: list[int], rows: int, bit_offset: int = 0) -> np.ndarray:
    """Inverse of `_pack_bits`: `rows` rows starting `bit_offset` bits into `buf` -> (rows, C) int64."""
    row_bits = sum(widths)
    stream = np.unpackbits(np.asarray(buf, dtype=np.uint8), bitorder="little")[bit_offset : bit_offset + rows * row_bits]
    bit_values = stream.reshape(rows, row_bits).astype(np.int64) << np.concatenate([np.arange(w) for w in widths])
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])  # (C,) first bit of each column
    return np.add.reduceat(bit_values, starts, axis=1) if rows else np.zeros((0, len(widths)), dtype=np.int64)


# ---------------------------------------------------------------------------------- log-probability codes


def _code_layout(k: int) -> list[tuple[int, int, float]]:
    """Per position, the gap codes of ranks 5..k-1 as segments: [(count, bits, unit in steps)]."""
    layout, first = [], _HEAD_EXACT + 1
    for last, bits, unit in _CODE_SEGMENTS:
        last = k - 1 if last is None else min(last, k - 1)
        if last >= first:
            layout.append((last - first + 1, bits, unit))
            first = last + 1
    return layout


def _code_widths(k: int) -> list[int]:
    return [bits for count, bits, _ in _code_layout(k) for _ in range(count)]


def _code_units(k: int) -> np.ndarray:
    return np.array([unit for count, _, unit in _code_layout(k) for _ in range(count)], dtype=np.float64)


def _step(step_code: np.ndarray) -> np.ndarray:
    return np.exp2(step_code.astype(np.float64) / _STEP_CODES_PER_OCTAVE + _STEP_MIN_LOG2)


def _encode_logprobs(lp: np.ndarray) -> dict[str, np.ndarray]:
    """(N, k) float64 log-probabilities, each row sorted descending -> the per-position fields (module docstring).

    gap_codes comes back as (N, k - 5) integers; the writer bit-packs it.
    """
    n, k = lp.shape
    n_head = min(_HEAD_EXACT, k - 1)
    lp = np.maximum(lp, LOGPROB_FLOOR)
    top = lp[:, :1]  # (N, 1) the largest, rows are sorted
    tail = np.maximum(-np.expm1(top[:, 0]) - np.exp(lp[:, 1:]).sum(-1), 0.0)  # (N,) (1 - p_max) - others: no cancellation
    with np.errstate(divide="ignore"):
        tail_logit = np.log(tail) - np.log1p(-tail)  # (N,), -inf for an empty tail
    r = top - lp  # (N, k) >= 0, increasing
    head = r[:, 1 : 1 + n_head].astype(np.float16)  # (N, n_head)
    units = _code_units(k)  # (k - 5,)
    step_code = np.zeros(n, dtype=np.uint8)
    codes = np.zeros((n, len(units)), dtype=np.int64)
    if len(units):
        # positions are counted from the stored (rounded) r_4, so the reader rebuilds exactly what is rounded here
        rel = np.minimum(r[:, n_head:] - head[:, -1:].astype(np.float64), _CODED_SPAN)  # (N, k - 4)
        rel[:, 0] = 0.0
        gaps = np.diff(rel, axis=-1)  # (N, k - 5)
        # a code of gap / unit + 1 (rounding) must fit in its bits: code <= 2**bits - 1
        limits = np.array([(1 << bits) - 2 for bits in _code_widths(k)], dtype=np.float64) * units  # (k - 5,) steps
        needed = (gaps / limits).max(-1)  # (N,) smallest step that fits every code
        with np.errstate(divide="ignore"):
            exponent = np.ceil(_STEP_CODES_PER_OCTAVE * (np.log2(needed) - _STEP_MIN_LOG2))
        step_code = np.clip(np.nan_to_num(exponent, neginf=0.0), 0, 255).astype(np.uint8)
        unit = _step(step_code)[:, None] * units  # (N, k - 5) nats per code
        position = np.zeros(n)  # (N,) grid position of the previous rank, relative to r_4
        for j in range(len(units)):  # sequential over ranks, vectorized over positions
            # round against the exact value: the error stays below half a unit, it never accumulates (units never
            # shrink with rank, so the previous overshoot is < half of this unit and the code is never negative)
            codes[:, j] = np.maximum(np.rint((rel[:, j + 1] - position) / unit[:, j]), 0)
            position = position + codes[:, j] * unit[:, j]
        assert (codes < (1 << np.array(_code_widths(k)))).all(), "gap code out of range (step choice is wrong)"
    return {"tail_logit": tail_logit.astype(np.float16), "head_gaps": head, "step_code": step_code, "gap_codes": codes}


def _decode_logprobs(tail_logit: np.ndarray, head_gaps: np.ndarray, step_code: np.ndarray, gap_codes: np.ndarray) -> np.ndarray:
    """The per-position fields -> (N, k) float64 log-probabilities whose probabilities sum to 1 - tail exactly."""
    n, n_head = head_gaps.shape
    k = 1 + n_head + gap_codes.shape[1]
    r = np.zeros((n, k))  # (N, k) lp[0] - lp[j]
    r[:, 1 : 1 + n_head] = head_gaps.astype(np.float64)
    if gap_codes.shape[1]:
        unit = _step(step_code)[:, None] * _code_units(k)  # (N, k - 5)
        r[:, 1 + n_head :] = r[:, n_head : n_head + 1] + np.cumsum(gap_codes * unit, axis=-1)
    # level: shift the shape so that the top-k mass is the stored one (r[:, 0] = 0 is the largest value)
    log_top_mass = -np.logaddexp(0.0, tail_logit.astype(np.float64))[:, None]  # (N, 1) log(1 - tail)
    log_shape_mass = np.log(np.exp(-r).sum(-1, keepdims=True))  # (N, 1)
    return -r - log_shape_mass + log_top_mass


# ------------------------------------------------------------------------------------------------- writer


def write_shard(path: Path, entries: list[tuple[str, Tensor, Tensor]], *, vocab_size: int, topk: int, temperature: float) -> dict:
    """Write one shard of soft labels, atomically (temp file + rename).

    entries: (record_id, ids (n_i, k), logprobs (n_i, k)) per record, n_i = its number of response positions
    (0 is allowed); logprobs are the teacher's log-probabilities at `temperature` (as from `topk_logprobs`; rows
    need not be sorted). Returns {"tokens", "bytes", "bytes_per_token"} for the manifest.
    """
    path = Path(path)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 1 <= topk <= vocab_size:
        raise ValueError(f"topk must be in 1..vocab_size ({vocab_size}), got {topk}")
    record_ids, all_ids, all_lp, lengths = [], [], [], []
    for record_id, ids, logprobs in entries:
        if not isinstance(record_id, str):
            raise ValueError(f"record id must be a string, got {record_id!r}")
        ids = torch.as_tensor(ids).detach().cpu().long()
        logprobs = torch.as_tensor(logprobs).detach().cpu().double()
        if ids.dim() != 2 or ids.shape[1] != topk or logprobs.shape != ids.shape:
            raise ValueError(f"record {record_id!r}: ids and logprobs must both be (n, {topk}), got {tuple(ids.shape)} and {tuple(logprobs.shape)}")
        record_ids.append(record_id)
        all_ids.append(ids)
        all_lp.append(logprobs)
        lengths.append(ids.shape[0])
    if len(set(record_ids)) != len(record_ids):
        raise ValueError(f"{path}: duplicate record ids in one shard")
    ids = torch.cat(all_ids) if all_ids else torch.zeros(0, topk, dtype=torch.long)  # (N, k)
    lp = torch.cat(all_lp) if all_lp else torch.zeros(0, topk, dtype=torch.float64)  # (N, k)
    tokens = ids.shape[0]
    if tokens:
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"{path}: token id {int(ids.max())} outside the vocabulary (size {vocab_size})")
        if torch.isnan(lp).any() or lp.max() > 1e-4:
            raise ValueError(f"{path}: logprobs must be log-probabilities (<= 0, no NaN); got logits?")
        if torch.logsumexp(lp, -1).max() > 1e-3:
            raise ValueError(f"{path}: the top-k probabilities sum to more than 1; pass log_softmax over the full vocabulary, then top-k")
    # the codes need each row in descending order; sort (stable) and carry the ids along
    lp, order = lp.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)

    bits = _id_bits(vocab_size)
    fields = _encode_logprobs(lp.numpy())
    tensors = {
        "ids": _pack_bits(ids.numpy(), [bits] * topk),  # (ceil(N * k * bits / 8),) uint8
        "lengths": np.asarray(lengths, dtype=_length_dtype(max(lengths, default=0))),  # (R,) positions per record
        # (zlib: the stdlib's, deterministic for a given input and level; sequential ids shrink ~6x)
        "record_ids": np.frombuffer(zlib.compress(json.dumps(record_ids, ensure_ascii=False).encode(), 9), dtype=np.uint8),
        "tail_logit": fields["tail_logit"],  # (N,) float16
        "head_gaps": fields["head_gaps"],  # (N, min(k - 1, 4)) float16
        "step_code": fields["step_code"],  # (N,) uint8
        "gap_codes": _pack_bits(fields["gap_codes"], _code_widths(topk)),  # (ceil(N * code bits / 8),) uint8
    }
    header = {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "topk": topk,
              "temperature": float(temperature), "id_bits": bits, "tokens": tokens}
    metadata = {FORMAT_NAME: json.dumps(header, sort_keys=True)}  # one key: the bytes do not depend on hash order
    from safetensors.numpy import save

    data = save(tensors, metadata=metadata)
    atomic_write_bytes(path, data)
    return {"tokens": tokens, "bytes": len(data), "bytes_per_token": len(data) / tokens if tokens else 0.0}


# ------------------------------------------------------------------------------------------------- reader


class ShardReader:
    """One soft-label shard, memory-mapped: opening it reads the header, `get` reads one record's bytes.

    meta: {"vocab_size", "topk", "temperature", "format_version", "id_bits", "tokens"}. A missing, truncated or
    foreign file, or one written by another format version, raises StillhouseError naming the file.
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        redo = "delete it and re-run `stillhouse label` to write it again"
        try:
            self._file = safe_open(str(self.path), framework="numpy")  # mmap; slices are read on demand
            metadata = self._file.metadata() or {}
        except Exception as e:  # SafetensorError, OSError: the message says which
            raise StillhouseError(f"{self.path}: not a readable soft-label shard ({e}); {redo}") from None
        try:
            raw = json.loads(metadata[FORMAT_NAME])
        except (KeyError, ValueError):
            raw = None
        if not isinstance(raw, dict):
            if metadata.get("format") != FORMAT_NAME:  # (version 1 kept its fields as separate keys)
                raise StillhouseError(f"{self.path}: not a stillhouse soft-label shard; {redo}")
            raw = {"format_version": metadata.get("format_version")}
        if raw.get("format_version") != FORMAT_VERSION:
            raise StillhouseError(
                f"{self.path}: soft-label format version {raw.get('format_version')}, this stillhouse reads version "
                f"{FORMAT_VERSION}; {redo}"
            )
        try:
            self.meta = {
                "vocab_size": int(raw["vocab_size"]),
                "topk": int(raw["topk"]),
                "temperature": float(raw["temperature"]),
                "format_version": FORMAT_VERSION,
                "id_bits": int(raw["id_bits"]),
                "tokens": int(raw["tokens"]),
            }
            self._record_ids = json.loads(zlib.decompress(self._file.get_tensor("record_ids").tobytes()))
            lengths = self._file.get_tensor("lengths").astype(np.int64)  # (R,) small
            self._offsets = np.concatenate([[0], np.cumsum(lengths)])  # (R + 1,) record r = offsets[r]:offsets[r + 1]
            self._check_layout()
        except (KeyError, ValueError, TypeError, zlib.error) as e:
            raise StillhouseError(f"{self.path}: corrupt soft-label shard ({e}); {redo}") from None
        self._index = {rid: i for i, rid in enumerate(self._record_ids)}

    def _check_layout(self) -> None:
        m, off = self.meta, self._offsets
        n, k = m["tokens"], m["topk"]
        expected = {
            "ids": ((n * k * m["id_bits"] + 7) // 8,),
            "lengths": (len(self._record_ids),),
            "tail_logit": (n,),
            "head_gaps": (n, min(_HEAD_EXACT, k - 1)),
            "step_code": (n,),
            "gap_codes": ((n * sum(_code_widths(k)) + 7) // 8,),
        }
        for name, shape in expected.items():
            if name not in self._file.keys():
                raise KeyError(f"tensor {name!r} missing")
            if tuple(self._file.get_slice(name).get_shape()) != shape:
                raise ValueError(f"tensor {name!r} has shape {self._file.get_slice(name).get_shape()}, expected {list(shape)}")
        if off[-1] != n:
            raise ValueError(f"record lengths add up to {off[-1]} positions, the header says {n}")
        if m["id_bits"] != _id_bits(m["vocab_size"]) or not 1 <= k <= m["vocab_size"]:
            raise ValueError("id_bits, topk and vocab_size do not agree")

    def _read_packed(self, name: str, first: int, last: int, widths: list[int]) -> np.ndarray:
        """Rows first..last-1 of a bit-packed integer matrix -> (last - first, len(widths)) int64."""
        if not widths:
            return np.zeros((last - first, 0), dtype=np.int64)
        row_bits = sum(widths)
        first_bit, last_bit = first * row_bits, last * row_bits
        buf = self._file.get_slice(name)[first_bit // 8 : (last_bit + 7) // 8]  # only these bytes are read
        return _unpack_bits(buf, widths, last - first, bit_offset=first_bit % 8)

    def record_ids(self) -> list[str]:
        """The records in this shard, in the order they were written."""
        return list(self._record_ids)

    def get(self, record_id: str) -> tuple[Tensor, Tensor]:
        """One record's labels: ids (n, k) int64 and logprobs (n, k) float32 (dequantized), sorted by logprob."""
        try:
            i = self._index[record_id]
        except KeyError:
            raise KeyError(f"record {record_id!r} is not in {self.path}") from None
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        k = self.meta["topk"]
        if a == b:  # (an empty slice at the very end of a tensor is an error in safetensors)
            return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k, dtype=torch.float32)
        ids = self._read_packed("ids", a, b, [self.meta["id_bits"]] * k)  # (n, k)
        if ids.max() >= self.meta["vocab_size"]:
            raise StillhouseError(f"{self.path}: corrupt soft-label shard (token id out of range); delete it and re-run `stillhouse label`")
        lp = _decode_logprobs(
            self._file.get_slice("tail_logit")[a:b],
            self._file.get_slice("head_gaps")[a:b],
            self._file.get_slice("step_code")[a:b],
            self._read_packed("gap_codes", a, b, _code_widths(k)),
        )  # (n, k) float64
        return torch.from_numpy(ids), torch.from_numpy(lp.astype(np.float32))
