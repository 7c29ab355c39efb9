"""The soft-label format: what goes in comes out (ids exactly, log-probabilities within the documented error),
the bytes it promises, a reconstruction error below fp16 + int32, a memory-mapped reader, clear errors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stillhouse.errors import StillhouseError
from stillhouse.softlabels import (
    FORMAT_VERSION,
    ShardReader,
    _pack_bits,
    _unpack_bits,
    reconstruction_kl,
    topk_logprobs,
    write_shard,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lm_like_logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(n, V) logits shaped like a real LM's: 1.5 * Gumbel noise gives, at T = 1, a top-1 probability ~0.5,
    top-1/top-2 gap ~1.2 nats, top-32 tail mass ~0.09 (measured on SmolLM2-135M-Instruct: 0.49, 1.1, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, vocab, generator=g, dtype=torch.float64).clamp_min(1e-300)
    return -torch.log(-torch.log(u)) * 1.5


def _entries(ids, lps, lengths):
    out, start = [], 0
    for i, n in enumerate(lengths):
        out.append((f"rec-{i}", ids[start : start + n], lps[start : start + n]))
        start += n
    return out


def _round_trip(tmp_path, ids, lps, lengths, vocab, name="s.safetensors"):
    path = tmp_path / name
    stats = write_shard(path, _entries(ids, lps, lengths), vocab_size=vocab, topk=ids.shape[1], temperature=1.0)
    reader = ShardReader(path)
    got = [reader.get(rid) for rid in reader.record_ids()]
    return stats, reader, torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])


# ---------------------------------------------------------------------------------------------- topk_logprobs


def test_topk_logprobs_is_full_softmax_then_topk_at_temperature():
    logits = _lm_like_logits(6, 500).float()
    ids, lps = topk_logprobs(logits.bfloat16(), 8, 2.0)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and ids.shape == lps.shape == (6, 8)
    full = torch.log_softmax(logits.bfloat16().float() / 2.0, -1)
    torch.testing.assert_close(lps, full.gather(-1, ids))  # full-vocabulary log-softmax, at T = 2
    assert (lps[:, :-1] >= lps[:, 1:]).all()  # sorted, best first
    assert (lps.exp().sum(-1) < 0.99).all()  # not renormalized over the top-k: the tail mass is still there
    ids_t1, lps_t1 = topk_logprobs(logits, 8, 1.0)
    assert torch.equal(ids_t1, topk_logprobs(logits, 8, 2.0)[0]) and not torch.allclose(lps_t1, lps, atol=0.1)


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip_ids_exact_logprobs_close_tail_kept(tmp_path):
    vocab = 49_152
    ids, lps = topk_logprobs(_lm_like_logits(60, vocab), 32, 1.0)
    lengths = [0, 17, 1, 0, 30, 12, 0]  # empty records first, in the middle and last
    stats, reader, got_ids, got_lps = _round_trip(tmp_path, ids, lps, lengths, vocab)
    assert reader.record_ids() == [f"rec-{i}" for i in range(len(lengths))]
    assert [reader.get(f"rec-{i}")[0].shape[0] for i in range(len(lengths))] == lengths
    assert torch.equal(got_ids, ids) and got_ids.dtype == torch.int64 and got_lps.dtype == torch.float32
    assert (got_lps - lps).abs().max() < 0.01
    tail = 1 - lps.double().exp().sum(-1)
    got_tail = 1 - got_lps.double().exp().sum(-1)
    torch.testing.assert_close(got_tail, tail, rtol=2e-3, atol=1e-6)  # the stored tail mass, not 1 - sum of roundings
    assert reader.meta == {"vocab_size": vocab, "topk": 32, "temperature": 1.0, "format_version": FORMAT_VERSION, "id_bits": 16, "tokens": 60}
    assert stats["tokens"] == 60 and stats["bytes"] == (tmp_path / "s.safetensors").stat().st_size
    with pytest.raises(KeyError, match="nope"):
        reader.get("nope")


def test_tiny_tails_survive(tmp_path):
    """Tails of 1e-6 .. 1e-3 next to top-k entries of ~1e-3: the stored tail keeps its size; deriving it from
    fp16 log-probabilities (abs. error ~2e-3 at -7) as 1 - sum does not."""
    vocab, k = 1000, 8
    p = torch.zeros(4, vocab, dtype=torch.float64)
    p[:, 1:k] = 1e-3 * (1 + torch.arange(k - 1, dtype=torch.float64) / 10)  # ranks 1..7, ~1e-3 each
    true_tail = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3], dtype=torch.float64)
    p[:, k:] = true_tail[:, None] / (vocab - k)
    p[:, 0] = 1 - p[:, 1:].sum(-1)
    lps = p[:, :k].log()
    _, _, _, got = _round_trip(tmp_path, torch.arange(k).expand(4, k), lps.float(), [4], vocab)
    got_tail = 1 - got.double().exp().sum(-1)
    torch.testing.assert_close(got_tail, true_tail, rtol=0.02, atol=0)
    fp16_tail = 1 - lps.half().double().exp().sum(-1)
    assert ((fp16_tail - true_tail).abs() / true_tail)[:2].min() > 0.2  # the baseline loses the smallest


@pytest.mark.parametrize(
    "vocab,bits",
    [(2, 1), (3, 2), (255, 8), (256, 8), (257, 9), (1000, 10), (49_152, 16), (65_537, 17), (262_144, 18)],
)
def test_ids_packed_to_the_bits_the_vocabulary_needs(tmp_path, vocab, bits):
    k = min(vocab, 5)
    g = torch.Generator().manual_seed(vocab)
    n = 13  # 13 * 5 * bits is rarely a whole number of bytes: records straddle byte boundaries
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    ids[0, 0], ids[1, 0] = vocab - 1, 0  # the extremes
    lps = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.5
    lps, order = lps.sort(-1, descending=True)
    ids = ids.gather(-1, order)
    _, reader, got_ids, _ = _round_trip(tmp_path, ids, lps, [4, 0, 5, 4], vocab)
    assert torch.equal(got_ids, ids)
    assert reader.meta["id_bits"] == bits
    header = _header(tmp_path / "s.safetensors")
    begin, end = header["ids"]["data_offsets"]
    assert end - begin == math.ceil(n * k * bits / 8)


@pytest.mark.parametrize("widths", [[1], [3, 3], [7], [13, 2, 18], [31], [9, 9, 7, 6, 6]])
def test_bit_packing_mixed_widths_at_odd_offsets(widths):
    g = np.random.default_rng(0)
    rows, row_bits = 101, sum(widths)
    values = np.stack([g.integers(0, 2**w, size=rows, dtype=np.int64) for w in widths], axis=1)  # (rows, C)
    values[0] = [2**w - 1 for w in widths]  # all ones
    buf = _pack_bits(values, widths)
    assert len(buf) == math.ceil(rows * row_bits / 8)
    assert np.array_equal(_unpack_bits(buf, widths, rows), values)
    start = 37  # read rows 37..59, starting in the middle of a byte
    first_bit = start * row_bits
    window = buf[first_bit // 8 : ((start + 23) * row_bits + 7) // 8]
    assert np.array_equal(_unpack_bits(window, widths, 23, bit_offset=first_bit % 8), values[start : start + 23])


@pytest.mark.parametrize("k", [1, 2, 4, 5, 6, 9, 17, 64])
def test_any_k(tmp_path, k):
    ids, lps = topk_logprobs(_lm_like_logits(9, 64), k, 1.0)
    _, _, got_ids, got_lps = _round_trip(tmp_path, ids, lps, [4, 5], 64)
    assert torch.equal(got_ids, ids)
    assert (got_lps - lps).abs().max() < 0.02  # the exact bound, which depends on the gaps: the property test


def test_writer_sorts_rows_and_rejects_what_is_not_log_probabilities(tmp_path):
    ids, lps = topk_logprobs(_lm_like_logits(5, 300), 6, 1.0)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # e.g. a server that returns top-k unordered
    _, reader, got_ids, got_lps = _round_trip(tmp_path, ids[:, perm], lps[:, perm], [5], 300)
    assert torch.equal(got_ids, ids) and (got_lps - lps).abs().max() < 2e-3
    path = tmp_path / "bad.safetensors"
    kw = dict(vocab_size=300, topk=6, temperature=1.0)
    with pytest.raises(ValueError, match="logits"):
        write_shard(path, [("a", ids, lps + 3.0)], **kw)  # logits, not log-probabilities
    with pytest.raises(ValueError, match="sum to more than 1"):
        write_shard(path, [("a", ids[:1], torch.log(torch.tensor([[0.6, 0.5, 0.1, 0.05, 0.01, 0.01]])))], **kw)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_shard(path, [("a", ids + 300, lps)], **kw)
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(path, [("a", ids, lps), ("a", ids, lps)], **kw)
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        write_shard(path, [("a", ids[:, :5], lps[:, :5])], **kw)
    assert not path.exists()


# -------------------------------------------------------------------------------------- size and accuracy


def test_bytes_per_token_at_most_100_at_k32_smollm2_vocab(tmp_path):
    vocab = 49_152
    ids, lps = topk_logprobs(_lm_like_logits(120, vocab, seed=3).float(), 32, 2.0)
    ids, lps = ids.repeat(10, 1), lps.repeat(10, 1)  # the size depends on the layout, not on the values
    lengths = [60] * 20  # 20 records of 60 response tokens
    stats = write_shard(tmp_path / "s.safetensors", _entries(ids, lps, lengths), vocab_size=vocab, topk=32, temperature=2.0)
    payload = 64 + 2 + 8 + 1 + (4 * 9 + 8 * 7 + 15 * 6) / 8  # ids, tail logit, 4 head gaps, step, codes = 97.75
    assert stats["tokens"] == 1200
    assert payload <= stats["bytes_per_token"] <= 100, stats
    assert 192 / stats["bytes_per_token"] > 1.9  # vs fp16 log-probabilities + int32 ids


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reconstruction_kl_below_fp16_plus_int32(tmp_path, temperature):
    vocab, k = 49_152, 32
    full = torch.log_softmax(_lm_like_logits(48, vocab, seed=1) / temperature, -1)  # (N, V) float64
    ids, lps = topk_logprobs(full, k, 1.0)  # full is already at T
    _, _, got_ids, got_lps = _round_trip(tmp_path, ids, lps, [20, 28], vocab)
    exact = reconstruction_kl(full, ids, lps.double())  # the truncation to k alone
    ours = reconstruction_kl(full, got_ids, got_lps) - exact
    fp16 = reconstruction_kl(full, ids, lps.half()) - exact  # the baseline: fp16 log-probs (+ int32 ids, exact)
    assert exact > 0.05  # top-32 of this teacher drops real mass: the comparison is not vacuous
    assert 0 < ours < 0.75 * fp16, (ours, fp16)  # measured 0.3-0.62x over 8 seeds at T = 1, 0.25-0.34x at T = 2
    assert ours < 1e-5 * exact  # quantization is noise next to the truncation itself


def test_reconstruction_kl_definition():
    vocab = 6
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]], dtype=torch.float64)
    ids = torch.tensor([[0, 1]])
    # top-2 kept, tail 0.3 spread uniformly over the other 4 tokens: q = [0.5, 0.2, 0.075 x 4]
    q = torch.tensor([[0.5, 0.2, 0.075, 0.075, 0.075, 0.075]], dtype=torch.float64)
    want = float((p * (p / q).log()).sum())
    assert reconstruction_kl(p.log(), ids, p.log().gather(-1, ids)) == pytest.approx(want, rel=1e-12)
    assert reconstruction_kl(p.log(), torch.arange(vocab)[None], p.log()) == pytest.approx(0.0, abs=1e-12)  # k = V


def test_labels_read_back_give_the_same_kd_loss(tmp_path):
    from stillhouse.losses import kd_divergence

    vocab = 5000
    ids, lps = topk_logprobs(_lm_like_logits(40, vocab, seed=4), 32, 2.0)
    _, _, got_ids, got_lps = _round_trip(tmp_path, ids, lps, [15, 25], vocab)
    student = _lm_like_logits(40, vocab, seed=5).float()
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        want = kd_divergence(student, ids, lps, temperature=2.0, divergence=divergence)
        got = kd_divergence(student, got_ids, got_lps, temperature=2.0, divergence=divergence)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-5)


# -------------------------------------------------------------------------------------------- reader, errors


def test_reader_memory_maps_and_reads_lazily(tmp_path):
    ids, lps = topk_logprobs(_lm_like_logits(30, 2000), 16, 1.0)
    path = tmp_path / "mapped.safetensors"
    write_shard(path, _entries(ids, lps, [10, 20]), vocab_size=2000, topk=16, temperature=1.0)
    reader = ShardReader(path)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) in maps.read_text()  # the file is mapped, not read into memory
    first_ids, first_lps = reader.get("rec-0")
    again = ShardReader(path).get("rec-0")
    assert torch.equal(first_ids, again[0]) and torch.equal(first_lps, again[1])
    assert torch.equal(first_ids, ids[:10]) and (first_lps - lps[:10]).abs().max() < 5e-3


def test_written_atomically(tmp_path):
    ids, lps = topk_logprobs(_lm_like_logits(4, 100), 4, 1.0)
    path = tmp_path / "labels" / "shard-00000.safetensors"
    write_shard(path, [("a", ids, lps)], vocab_size=100, topk=4, temperature=1.0)
    write_shard(path, [("b", ids, lps)], vocab_size=100, topk=4, temperature=1.0)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    assert ShardReader(path).record_ids() == ["b"]


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size])


def _rewrite(path: Path, edit_header=None, tensors=None, cut: int = 0, metadata=None) -> None:
    """Rewrite a shard with an edited header (the JSON under the format's key), other tensors or metadata, or cut
    bytes off its end."""
    from safetensors.numpy import load, save

    raw = path.read_bytes()
    if edit_header or tensors or metadata:
        meta = _header(path)["__metadata__"]
        arrays = load(raw)
        if edit_header:
            fields = json.loads(meta["stillhouse-softlabels"])
            edit_header(fields)
            meta = {"stillhouse-softlabels": json.dumps(fields)}
        arrays.update(tensors or {})
        raw = save(arrays, metadata=metadata or meta)
    path.write_bytes(raw[: len(raw) - cut])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: _rewrite(p, cut=10), "not a readable soft-label shard"),
        (lambda p: p.write_bytes(b"\x00" * 40), "not a readable soft-label shard"),
        (lambda p: p.unlink(), "not a readable soft-label shard"),
        (lambda p: _rewrite(p, edit_header=lambda m: m.update(format_version=99)), "format version 99"),
        (lambda p: _rewrite(p, metadata={"format": "stillhouse-softlabels", "format_version": "1"}), "format version 1"),
        (lambda p: _rewrite(p, metadata={"format": "something-else"}), "not a stillhouse soft-label shard"),
        (lambda p: _rewrite(p, edit_header=lambda m: m.pop("topk")), "corrupt"),
        (lambda p: _rewrite(p, edit_header=lambda m: m.update(tokens="99")), "corrupt"),
        (lambda p: _rewrite(p, tensors={"lengths": np.array([9, 4], dtype=np.uint8)}), "corrupt"),
        (lambda p: _rewrite(p, tensors={"record_ids": np.array([1, 2, 3], dtype=np.uint8)}), "corrupt"),
    ],
)
def test_corrupt_or_foreign_shard_is_a_clear_error(tmp_path, damage, message):
    ids, lps = topk_logprobs(_lm_like_logits(8, 100), 6, 1.0)
    path = tmp_path / "shard-00003.safetensors"
    write_shard(path, _entries(ids, lps, [4, 4]), vocab_size=100, topk=6, temperature=1.0)
    damage(path)
    with pytest.raises(StillhouseError, match=message) as err:
        ShardReader(path)
    assert str(path) in str(err.value) and "stillhouse label" in str(err.value)


# ------------------------------------------------------------------------------------------------ properties


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 12),
    vocab=st.integers(2, 3000),
    k=st.integers(1, 40),
    scale=st.sampled_from([0.01, 1.0, 3.0, 10.0, 40.0]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_property_round_trip(tmp_path_factory, n, vocab, k, scale, temperature, seed):
    k = min(k, vocab)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * scale
    ids, lps = topk_logprobs(logits, k, temperature)
    path = tmp_path_factory.mktemp("prop") / "s.safetensors"
    write_shard(path, [("r", ids, lps)], vocab_size=vocab, topk=k, temperature=temperature)
    got_ids, got_lps = ShardReader(path).get("r")
    assert torch.equal(got_ids, ids)
    assert torch.isfinite(got_lps).all() and (got_lps <= 0).all()
    # each log-probability within its documented error: fp16 rounding of r_1..r_4 (2**-11 relative), half a
    # grid unit for the rest, the fp16 tail logit, plus the level's share of all of them
    lp = lps.double().clamp_min(-100)
    r = lp[:, :1] - lp  # (n, k)
    # half a grid unit: unit <= 3 * step and step <= largest gap / 186 * 2**(1/16) (6-bit codes, unit 3)
    gaps = (r[:, 5:] - r[:, 4:-1]).clamp(max=24) if k > 5 else torch.zeros(n, 1)
    half_unit = 1.5 * gaps.max(-1, keepdim=True).values / 186 * 2 ** (1 / 16)
    fp16 = r[:, : min(k, 5)].max(-1, keepdim=True).values * 2**-11  # float16 head gaps
    tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp(1e-12, 1 - 1e-12)
    level = tail * (tail.log() - (-tail).log1p()).abs() * 2**-11  # float16 tail logit -> log(1 - tail)
    bound = 2 * (half_unit + fp16) + level + 1e-4  # own error + the level's (a weighted mean of them) + fp32
    near = r < 20  # beyond, stored values may be clipped (probability < 2e-9 of the best)
    assert ((got_lps.double() - lp).abs() <= bound)[near].all()


def test_short_records_at_most_100_bytes_per_token_with_the_index(tmp_path):
    """The demo's classification responses are ~5 tokens: the per-record index (length and id) and the header must
    not push a full shard (256 records) over 100 bytes per token."""
    vocab = 49_152
    ids, lps = topk_logprobs(_lm_like_logits(256 * 5, vocab, seed=4).float(), 32, 2.0)
    entries = [(f"intents-{3 * i:05d}", ids[5 * i : 5 * i + 5], lps[5 * i : 5 * i + 5]) for i in range(256)]
    stats = write_shard(tmp_path / "s.safetensors", entries, vocab_size=vocab, topk=32, temperature=2.0)
    assert stats["tokens"] == 1280 and stats["bytes_per_token"] <= 100, stats
    reader = ShardReader(tmp_path / "s.safetensors")
    assert reader.record_ids() == [e[0] for e in entries]
    assert torch.equal(reader.get("intents-00021")[0], ids[35:40])
    assert _header(tmp_path / "s.safetensors")["lengths"]["dtype"] == "U8"  # one byte per record


def test_same_entries_same_bytes_in_another_process(tmp_path):
    """safetensors writes several metadata keys in hash order, which differs between processes: a resumed or
    multi-process labeling run would then not be byte-identical. The writer must not depend on it."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from stillhouse.softlabels import topk_logprobs, write_shard\n"
        "g = torch.Generator().manual_seed(0)\n"
        "ids, lps = topk_logprobs(torch.randn(12, 300, generator=g), 8, 2.0)\n"
        "write_shard(sys.argv[1], [('a', ids[:5], lps[:5]), ('b', ids[5:], lps[5:])], vocab_size=300, topk=8, temperature=2.0)\n"
    )
    paths = [tmp_path / f"s{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=120)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
