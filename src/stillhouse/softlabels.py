"""The soft-label format: the teacher's top-k log-probabilities per response token, written by `label`, read by `train`.

This module is the only code that knows the bytes. A shard is a safetensors file (tensors + a string metadata
dict, never pickle) holding the labels of many records; `write_shard` writes one atomically, `ShardReader`
memory-maps one and decodes a record at a time.

What is stored, per response position (teacher log-probabilities `lp` at temperature T, full-vocabulary
log-softmax first, then top-k, sorted so lp[0] >= lp[1] >= ... >= lp[k-1]; r_j = lp[0] - lp[j] >= 0):

    ids        (k,)    token ids in rank order, bit-packed, ceil(log2 V) bits each   16 bits at V = 49,152
    log_mass   ()      float16: log of the top-k mass, logsumexp(lp) = log(1 - tail)
    head_gaps  (4,)    float16: r_1 .. r_4
    step_code  ()      uint8: grid step s = 2 ** (step_code / 16 - 14)
    gap_codes  (k-5,)  7 bits each, bit-packed: r_5 .. r_{k-1} on a grid of step s, delta-coded

The *shape* of the top-k (the r_j) is quantized and its *level* is never stored: the reader recovers it from
`log_mass`, so sum(exp(lp)) is exactly the stored top-k mass and the tail mass 1 - sum(exp(lp)) that the loss
uses (see `stillhouse.losses`) is as accurate as one float16 of log(1 - tail), whether the tail is 0.5 or 1e-6.
Storing fp16 log-probabilities and deriving the tail as 1 - sum loses it to cancellation when the top-k holds
nearly all the mass.

The ranks that carry most of the probability (and the largest gaps) keep float16 precision in `head_gaps`.
The rest are increasing with small gaps: they are rounded to integer multiples D_j of a per-position step s,
counted from the stored r_4, and stored as the differences D_j - D_{j-1} in 7 bits. s = largest gap / 126,
so each difference fits in 0..127 while the grid spans up to 126 * (k - 5) steps: 7 bits per value for the
resolution of a ~12-bit linear code. Each value is off by at most s / 2 (errors do not accumulate: every D_j
is rounded from the exact r_j).

Bytes per token: ceil(k * id_bits / 8) + 11 + 7 * (k - 5) / 8 = 64 + 11 + 23.6 = 98.6 at k = 32, V = 49,152,
plus a few bytes per record (its offset and id). On real SmolLM2-135M logits (T = 1 and 2) the
reconstruction KL this adds is about half that of float16 log-probabilities + int32 ids (192 bytes per
token); see `reconstruction_kl` and tests/test_softlabels.py.

Log-probabilities below LOGPROB_FLOOR (-100; exp(-100) ~ 4e-44 is zero in fp32) are stored as the floor, and
ranks 5+ more than 24 nats below rank 4 as 24 below (see _CODED_SPAN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stillhouse.errors import StillhouseError
from stillhouse.workspace import atomic_write_bytes

FORMAT_NAME = "stillhouse-softlabels"
FORMAT_VERSION = 1
LOGPROB_FLOOR = -100.0
_HEAD_EXACT = 4  # r_1..r_4 as float16
_GAP_CODE_BITS = 7
_GAP_CODE_MAX = (1 << _GAP_CODE_BITS) - 1
# ranks 5+ more than 24 nats below rank 4 (< 4e-11 of its probability) are stored as 24 below: the step
# then never exceeds 24 / 126 = 0.19 nats, whatever the teacher's tail looks like
_CODED_SPAN = 24.0
# step s = 2 ** (step_code / 16 - 14): 256 codes from 6.1e-5 to 3.8 nats in steps of 2**(1/16) (4.4%).
# The largest step ever needed is _CODED_SPAN / 126 = 0.19, well inside the range.
_STEP_CODES_PER_OCTAVE = 16
_STEP_MIN_LOG2 = -14
_PACK_CHUNK = 1 << 18  # values per packing chunk; a multiple of 8, so every chunk ends on a byte boundary


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


def _id_bits(vocab_size: int) -> int:
    return max(1, (vocab_size - 1).bit_length())  # ceil(log2 V): 16 at 49,152, 18 at 262,144


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers -> a little-endian bit stream of `bits` bits each, as uint8 bytes (last one zero-padded)."""
    values = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    shifts = np.arange(bits, dtype=np.uint64)
    chunks = []
    for start in range(0, len(values), _PACK_CHUNK):  # chunked: the (n, bits) bit matrix stays a few MB
        v = values[start : start + _PACK_CHUNK]
        bit_matrix = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)  # (n, bits), LSB first
        chunks.append(np.packbits(bit_matrix.ravel(), bitorder="little"))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)


def _unpack_bits(buf: np.ndarray, bits: int, count: int, bit_offset: int = 0) -> np.ndarray:
    """Inverse of `_pack_bits`: `count` values starting `bit_offset` bits into `buf` -> int64 (count,)."""
    stream = np.unpackbits(np.asarray(buf, dtype=np.uint8), bitorder="little")[bit_offset : bit_offset + count * bits]
    bit_matrix = stream.reshape(count, bits).astype(np.int64)  # (count, bits)
    return bit_matrix @ (np.int64(1) << np.arange(bits, dtype=np.int64))


# ---------------------------------------------------------------------------------- log-probability codes


def _layout(k: int) -> tuple[int, int]:
    """(float16 head gaps, 7-bit gap codes) per position for top-k."""
    n_head = min(_HEAD_EXACT, k - 1)
    return n_head, k - 1 - n_head


def _step(step_code: np.ndarray) -> np.ndarray:
    return np.exp2(step_code.astype(np.float64) / _STEP_CODES_PER_OCTAVE + _STEP_MIN_LOG2)


def _encode_logprobs(lp: np.ndarray) -> dict[str, np.ndarray]:
    """(N, k) float64 log-probabilities, each row sorted descending -> the per-position fields (module docstring).

    gap_codes comes back as (N, k - 5) integers; the writer bit-packs it.
    """
    n, k = lp.shape
    n_head, n_codes = _layout(k)
    lp = np.maximum(lp, LOGPROB_FLOOR)
    top = lp[:, :1]  # (N, 1) the largest, rows are sorted
    log_mass = np.minimum(top[:, 0] + np.log(np.exp(lp - top).sum(-1)), 0.0)  # (N,) logsumexp, <= 0
    r = top - lp  # (N, k) >= 0, increasing
    head = r[:, 1 : 1 + n_head].astype(np.float16)  # (N, n_head)
    step_code = np.zeros(n, dtype=np.uint8)
    codes = np.zeros((n, n_codes), dtype=np.int64)
    if n_codes:
        # grid origin = the stored (rounded) r_4, so the reader rebuilds exactly the values rounded here
        rel = r[:, n_head:] - head[:, -1:].astype(np.float64)  # (N, n_codes + 1); rel[:, 0] = rounding error
        rel[:, 0] = 0.0
        # one huge gap (e.g. down to the floor) would coarsen every step: clip at _CODED_SPAN below rank 4
        rel = np.minimum(rel, _CODED_SPAN)
        largest_gap = np.diff(rel, axis=-1).max(-1)  # (N,)
        # smallest step on the ladder with largest_gap / step <= 126: a difference of two rounded grid
        # positions is then <= 127 and fits in 7 bits
        with np.errstate(divide="ignore"):
            exponent = np.ceil(_STEP_CODES_PER_OCTAVE * (np.log2(largest_gap / (_GAP_CODE_MAX - 1)) - _STEP_MIN_LOG2))
        step_code = np.clip(np.nan_to_num(exponent, neginf=0.0), 0, 255).astype(np.uint8)
        grid = np.maximum(np.rint(rel / _step(step_code)[:, None]), 0)  # (N, n_codes + 1) non-decreasing
        codes = np.diff(grid, axis=-1).astype(np.int64)  # (N, n_codes)
        assert codes.min() >= 0 and codes.max() <= _GAP_CODE_MAX, "gap code out of range (step choice is wrong)"
    return {"log_mass": log_mass.astype(np.float16), "head_gaps": head, "step_code": step_code, "gap_codes": codes}


def _decode_logprobs(log_mass: np.ndarray, head_gaps: np.ndarray, step_code: np.ndarray, gap_codes: np.ndarray) -> np.ndarray:
    """The per-position fields -> (N, k) float64 log-probabilities with logsumexp == log_mass exactly."""
    n, n_head = head_gaps.shape
    r = np.zeros((n, 1 + n_head + gap_codes.shape[1]))  # (N, k) lp[0] - lp[j]
    r[:, 1 : 1 + n_head] = head_gaps.astype(np.float64)
    if gap_codes.shape[1]:
        r[:, 1 + n_head :] = r[:, n_head : n_head + 1] + _step(step_code)[:, None] * np.cumsum(gap_codes, axis=-1)
    # level: shift the shape so that the top-k mass is the stored one (r[:, 0] = 0 is the largest value)
    log_shape_mass = np.log(np.exp(-r).sum(-1, keepdims=True))  # (N, 1)
    return -r - log_shape_mass + log_mass.astype(np.float64)[:, None]


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
    record_ids, all_ids, all_lp, offsets = [], [], [], [0]
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
        offsets.append(offsets[-1] + ids.shape[0])
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
    # the gap code needs each row in descending order; sort (stable) and carry the ids along
    lp, order = lp.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)

    bits = _id_bits(vocab_size)
    fields = _encode_logprobs(lp.numpy())
    tensors = {
        "ids": _pack_bits(ids.numpy(), bits),  # (ceil(N * k * bits / 8),) uint8
        "offsets": np.asarray(offsets, dtype=np.int64),  # (R + 1,) record r = positions offsets[r]:offsets[r + 1]
        "log_mass": fields["log_mass"],  # (N,) float16
        "head_gaps": fields["head_gaps"],  # (N, min(k - 1, 4)) float16
        "step_code": fields["step_code"],  # (N,) uint8
        "gap_codes": _pack_bits(fields["gap_codes"], _GAP_CODE_BITS),  # (ceil(N * (k - 5) * 7 / 8),) uint8
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "vocab_size": str(vocab_size),
        "topk": str(topk),
        "temperature": repr(float(temperature)),
        "id_bits": str(bits),
        "tokens": str(tokens),
        "record_ids": json.dumps(record_ids, ensure_ascii=False),
    }
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
            raw = self._file.metadata() or {}
        except Exception as e:  # SafetensorError, OSError: the message says which
            raise StillhouseError(f"{self.path}: not a readable soft-label shard ({e}); {redo}") from None
        if raw.get("format") != FORMAT_NAME:
            raise StillhouseError(f"{self.path}: not a stillhouse soft-label shard; {redo}")
        if raw.get("format_version") != str(FORMAT_VERSION):
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
            self._record_ids = json.loads(raw["record_ids"])
            self._offsets = self._file.get_tensor("offsets")  # (R + 1,) int64, small
            self._check_layout()
        except (KeyError, ValueError, TypeError) as e:
            raise StillhouseError(f"{self.path}: corrupt soft-label shard ({e}); {redo}") from None
        self._index = {rid: i for i, rid in enumerate(self._record_ids)}

    def _check_layout(self) -> None:
        m, off = self.meta, self._offsets
        n, k = m["tokens"], m["topk"]
        n_head, n_codes = _layout(k)
        expected = {
            "ids": ((n * k * m["id_bits"] + 7) // 8,),
            "offsets": (len(self._record_ids) + 1,),
            "log_mass": (n,),
            "head_gaps": (n, n_head),
            "step_code": (n,),
            "gap_codes": ((n * n_codes * _GAP_CODE_BITS + 7) // 8,),
        }
        for name, shape in expected.items():
            if name not in self._file.keys():
                raise KeyError(f"tensor {name!r} missing")
            if tuple(self._file.get_slice(name).get_shape()) != shape:
                raise ValueError(f"tensor {name!r} has shape {self._file.get_slice(name).get_shape()}, expected {list(shape)}")
        if off[0] != 0 or off[-1] != n or (np.diff(off) < 0).any():
            raise ValueError("record offsets are inconsistent")
        if m["id_bits"] != _id_bits(m["vocab_size"]):
            raise ValueError("id_bits does not match vocab_size")

    def _read_packed(self, name: str, first: int, last: int, per_row: int, bits: int) -> np.ndarray:
        """Rows first..last-1 of a bit-packed (N, per_row) integer matrix -> (last - first, per_row) int64."""
        if per_row == 0:
            return np.zeros((last - first, 0), dtype=np.int64)
        first_bit, last_bit = first * per_row * bits, last * per_row * bits
        buf = self._file.get_slice(name)[first_bit // 8 : (last_bit + 7) // 8]  # only these bytes are read
        return _unpack_bits(buf, bits, (last - first) * per_row, bit_offset=first_bit % 8).reshape(last - first, per_row)

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
        ids = self._read_packed("ids", a, b, k, self.meta["id_bits"])  # (n, k)
        if ids.max() >= self.meta["vocab_size"]:
            raise StillhouseError(f"{self.path}: corrupt soft-label shard (token id out of range); delete it and re-run `stillhouse label`")
        lp = _decode_logprobs(
            self._file.get_slice("log_mass")[a:b],
            self._file.get_slice("head_gaps")[a:b],
            self._file.get_slice("step_code")[a:b],
            self._read_packed("gap_codes", a, b, _layout(k)[1], _GAP_CODE_BITS),
        )  # (n, k) float64
        return torch.from_numpy(ids), torch.from_numpy(lp.astype(np.float32))
