"""Distillation losses against a float64 reference written straight from the definition, plus invariants.

The reference builds the k + 1 buckets exactly as the module docstring of stillhouse.losses says (teacher's
top-k + its tail mass; student's probabilities on the same ids + its mass on all other tokens; every bucket
floored at exp(-100)) and evaluates each divergence from its textbook formula, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from stillhouse.losses import distill_loss, kd_divergence
from stillhouse.softlabels import topk_logprobs

DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0),
        ("total_variation", 0.5), ("skew_forward_kl", 0.5), ("skew_reverse_kl", 0.5)]  # skew: default skew_alpha 0.1
SKEW_ALPHA = 0.1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine (2 threads there: 40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the reference


def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_b p_b log(p_b / q_b), 0 log 0 = 0; float64."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def divergence64(p, s, divergence, beta, skew_alpha=SKEW_ALPHA):
    """(N,) each divergence from its textbook formula, over float64 distributions p (teacher), s (student)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl64(p, s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl64(s, p)
    if divergence == "total_variation":
        return 0.5 * (p - s).abs().sum(-1)
    if divergence == "skew_forward_kl":
        return _kl64(p, skew_alpha * p + (1 - skew_alpha) * s)
    if divergence == "skew_reverse_kl":
        return _kl64(s, skew_alpha * s + (1 - skew_alpha) * p)
    m = beta * p + (1 - beta) * s
    return beta * _kl64(p, m) + (1 - beta) * _kl64(s, m)


def reference(student_logits, teacher_ids, teacher_logprobs, temperature, divergence, beta, skew_alpha=SKEW_ALPHA):
    """(N,) float64 divergence over the k+1 buckets, from the definitions."""
    s_full = torch.softmax(student_logits.double() / temperature, -1)  # (N, V)
    s_top = s_full.gather(-1, teacher_ids)  # (N, k)
    p_top = teacher_logprobs.double().exp()  # (N, k)
    p, s = p_top, s_top
    if teacher_ids.shape[-1] < student_logits.shape[-1]:  # k = V: the tail bucket is empty by definition
        p_tail = (1 - p_top.sum(-1, keepdim=True)).clamp_min(0)  # all we know of the teacher's tail
        s_tail = s_full.scatter(-1, teacher_ids, 0.0).sum(-1, keepdim=True)  # the student's mass off the ids
        p, s = torch.cat([p_top, p_tail], -1), torch.cat([s_top, s_tail], -1)  # (N, k+1)
    # the documented floor: a bucket has probability >= exp(-100) (so an empty one costs a finite amount)
    p, s = p.clamp_min(math.exp(-100)), s.clamp_min(math.exp(-100))
    return divergence64(p, s, divergence, beta, skew_alpha)


def _problem(n=12, vocab=50, k=6, temperature=2.0, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    ids, lps = topk_logprobs(teacher, k, temperature)
    return student.float(), ids, lps


# ------------------------------------------------------------------------------------------ kd_divergence


@pytest.mark.parametrize("divergence,beta", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_float64_reference(divergence, beta, temperature):
    student, ids, lps = _problem(temperature=temperature)
    got = kd_divergence(student, ids, lps, temperature=temperature, divergence=divergence, beta=beta)
    want = reference(student, ids, lps, temperature, divergence, beta)
    assert got.shape == (12,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert (want > 1e-3).all()  # the comparison is not between two zeros


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_k_equal_to_vocab_is_the_full_vocabulary_divergence(divergence, beta):
    vocab, temperature = 40, 1.5
    student, ids, lps = _problem(vocab=vocab, k=vocab, temperature=temperature)
    teacher_full = torch.zeros(12, vocab, dtype=torch.float64).scatter(-1, ids, lps.double())  # (N, V) log-probs
    p, s = teacher_full.exp(), torch.softmax(student.double() / temperature, -1)
    want = divergence64(p, s, divergence, beta)
    got = kd_divergence(student, ids, lps, temperature=temperature, divergence=divergence, beta=beta)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence,beta", DIVS)
@pytest.mark.parametrize("k", [5, 50])
def test_identical_teacher_and_student_is_zero_with_zero_gradient(divergence, beta, k):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(8, 50, generator=g) * 4).requires_grad_()
    ids, lps = topk_logprobs(logits.detach(), k, 2.0)  # the student's own soft labels
    div = kd_divergence(logits, ids, lps, temperature=2.0, divergence=divergence, beta=beta)
    torch.testing.assert_close(div, torch.zeros(8), atol=2e-6, rtol=0)
    (grad,) = torch.autograd.grad(div.sum(), logits)
    if divergence != "total_variation":  # |P - S| has a kink at P = S: any subgradient (rounding picks one) is valid
        assert grad.abs().max() < 1e-4


def test_jsd_endpoints_and_interior():
    student, ids, lps = _problem()

    def div(name, beta=0.5):
        return kd_divergence(student, ids, lps, temperature=2.0, divergence=name, beta=beta)

    forward, reverse = div("forward_kl"), div("reverse_kl")
    assert not torch.allclose(forward, reverse, rtol=1e-2)  # the two directions really differ here
    torch.testing.assert_close(div("jsd", 0.0), forward)
    torch.testing.assert_close(div("jsd", 1.0), reverse)
    # the endpoints are defined, not limits: the mixture formula vanishes like beta * KL(P||S) near 0 and
    # (1 - beta) * KL(S||P) near 1 (what ms-swift's silent clamp to 1 - 1e-6 turned into a ~0 loss)
    torch.testing.assert_close(div("jsd", 1e-3) / 1e-3, forward, rtol=0.05, atol=0)
    torch.testing.assert_close(div("jsd", 1 - 1e-3) / 1e-3, reverse, rtol=0.05, atol=0)
    # generalized JSD is bounded by the mixture's entropy term: <= H(beta) = -b log b - (1-b) log(1-b)
    for beta in (0.1, 0.5, 0.9):
        assert (div("jsd", beta) <= -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta)) + 1e-6).all()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            div("jsd", bad)
    with pytest.raises(ValueError, match="divergence"):
        div("kl")


def test_total_variation_and_skew_kl_properties():
    student, ids, lps = _problem()

    def div(name, skew_alpha=SKEW_ALPHA):
        return kd_divergence(student, ids, lps, temperature=2.0, divergence=name, skew_alpha=skew_alpha)

    forward, reverse = div("forward_kl"), div("reverse_kl")
    # skew_alpha = 0 is the plain KL; 1 compares a distribution with itself
    torch.testing.assert_close(div("skew_forward_kl", 0.0), forward)
    torch.testing.assert_close(div("skew_reverse_kl", 0.0), reverse)
    torch.testing.assert_close(div("skew_forward_kl", 1.0), torch.zeros(12), atol=1e-6, rtol=0)
    # the mixture keeps it below log(1 / skew_alpha) (and below the plain KL) however far the student is
    for a in (0.1, 0.5):
        skew = div("skew_forward_kl", a)
        assert (skew <= math.log(1 / a) + 1e-6).all() and (skew <= forward + 1e-6).all() and (skew > 0).all()
    # total variation: in [0, 1], symmetric in its definition, and a different number from the KLs
    tv = div("total_variation")
    assert (tv > 0).all() and (tv <= 1).all() and not torch.allclose(tv, forward, rtol=0.1)
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64)
    torch.testing.assert_close(divergence64(p, q, "total_variation", 0), torch.tensor([0.6], dtype=torch.float64))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="skew_alpha"):
            div("skew_forward_kl", bad)


def test_tail_bucket_is_what_is_documented():
    """A teacher that puts half its mass outside its top-k: the student must match that, not renormalize it away."""
    vocab = 10
    ids = torch.tensor([[0, 1]])
    lps = torch.log(torch.tensor([[0.3, 0.2]]))  # teacher tail = 0.5
    # student: the same 0.3 / 0.2 on ids 0, 1 and 0.5 spread over the other 8 any way at all -> divergence 0
    probs = torch.tensor([[0.3, 0.2, 0.4, 0.1, 0, 0, 0, 0, 0, 0]]) + 1e-12
    zero = kd_divergence(probs.log(), ids, lps, temperature=1.0)
    assert zero.abs().max() < 1e-6
    # a student with the top-k renormalized (0.6 / 0.4, nothing else) is far off
    renorm = torch.tensor([[0.6, 0.4] + [1e-9] * (vocab - 2)])
    far = kd_divergence(renorm.log(), ids, lps, temperature=1.0)
    want = 0.3 * math.log(0.3 / 0.6) + 0.2 * math.log(0.2 / 0.4) + 0.5 * math.log(0.5 / (8e-9))
    assert far.item() == pytest.approx(want, rel=1e-3)


def test_no_nan_or_negative_with_bf16_and_extreme_logits():
    g = torch.Generator().manual_seed(2)
    vocab, k = 64, 8
    teacher = torch.randn(16, vocab, generator=g) * 30  # very peaked: tail ~ 0
    teacher[:4, :] = 0.0  # exactly uniform rows
    teacher[4:6, 10:] = -torch.inf  # only 10 tokens possible: the top-k includes -inf log-probs
    ids, lps = topk_logprobs(teacher, k, 1.0)
    students = {
        "huge": (torch.randn(16, vocab, generator=g) * 1e4),
        "bf16": (torch.randn(16, vocab, generator=g) * 20).bfloat16(),
        "one-hot": torch.full((16, vocab), -1e9).scatter(-1, torch.zeros(16, 1, dtype=torch.long), 1e9),
        "identical": teacher.clamp_min(-1e4),
    }
    for name, logits in students.items():
        for divergence, beta in DIVS:
            for t_lps in (lps, lps.bfloat16()):  # bf16 teacher log-probs too
                x = logits.detach().clone().requires_grad_()
                div = kd_divergence(x, ids, t_lps, temperature=1.0, divergence=divergence, beta=beta)
                (grad,) = torch.autograd.grad(div.sum(), x)
                assert torch.isfinite(div).all() and (div >= 0).all(), (name, divergence, beta)
                assert torch.isfinite(grad).all(), (name, divergence, beta)


def test_student_tail_is_accurate_when_tiny():
    """1 - sum(probs) in fp32 cannot see a 1e-9 tail; the complement log-sum-exp can."""
    vocab = 1000
    logits = torch.full((1, vocab), -30.0)
    logits[0, :4] = torch.tensor([0.0, -0.5, -1.0, -1.5])
    ids = torch.arange(4)[None]
    # teacher: same top-4 shape, tail 1e-3
    p_top = torch.softmax(torch.tensor([0.0, -0.5, -1.0, -1.5], dtype=torch.float64), -1) * (1 - 1e-3)
    lps = p_top.log().float()[None]
    got = kd_divergence(logits, ids, lps, temperature=1.0)
    want = reference(logits, ids, lps, 1.0, "forward_kl", 0.5)  # float64 knows the student tail is ~1e-10
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)
    assert want.item() > 0.01  # dominated by the tail term: 1e-3 * log(1e-3 / 1e-10)


# ---------------------------------------------------------------------------------------------- distill_loss


def _head_problem(n=37, hidden_size=16, vocab=300, k=8, temperature=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    teacher = torch.randn(n, vocab, generator=g) * 3
    ids, lps = topk_logprobs(teacher, k, temperature)
    return hidden, weight, targets, ids, lps


def _naive_loss(hidden, weight, targets, ids, lps, temperature, alpha, divergence="forward_kl", beta=0.5):
    """The whole (N, V) logits at once: the thing the chunked version must equal."""
    logits = hidden @ weight.T
    ce = F.cross_entropy(logits.float(), targets)
    if ids is None:
        return ce
    kd = kd_divergence(logits, ids, lps, temperature=temperature, divergence=divergence, beta=beta).mean()
    return (1 - alpha) * ce + alpha * temperature**2 * kd


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("total_variation", 0.5),
                                             ("skew_forward_kl", 0.5), ("skew_reverse_kl", 0.5)])
def test_chunked_equals_unchunked_values_and_gradients(divergence, beta):
    hidden, weight, targets, ids, lps = _head_problem()
    h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = _naive_loss(h0, w0, targets, ids, lps, 2.0, 0.7, divergence, beta)
    want_gh, want_gw = torch.autograd.grad(want, [h0, w0])
    for chunk in (1, 5, 16, 37, 100):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = distill_loss(h, w, targets, ids, lps, temperature=2.0, alpha=0.7, divergence=divergence, beta=beta, chunk_tokens=chunk)
        gh, gw = torch.autograd.grad(out["loss"] * 3.0, [h, w])  # an incoming gradient != 1 must scale both
        torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gh, 3.0 * want_gh, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(gw, 3.0 * want_gw, rtol=1e-4, atol=1e-7)


def test_loss_parts_alpha_endpoints_and_temperature_squared():
    hidden, weight, targets, ids, lps = _head_problem(temperature=2.0)
    ce = F.cross_entropy(hidden @ weight.T, targets)
    kd_t2 = kd_divergence(hidden @ weight.T, ids, lps, temperature=2.0).mean()

    def run(**kw):
        return distill_loss(hidden, weight, targets, ids, lps, chunk_tokens=8, **{"temperature": 2.0, **kw})

    mid = run(alpha=0.5)
    torch.testing.assert_close(mid["ce"], ce)
    torch.testing.assert_close(mid["kd"], kd_t2)  # "kd" is the un-scaled mean divergence
    torch.testing.assert_close(mid["loss"], 0.5 * ce + 0.5 * 4.0 * kd_t2)  # T^2 = 4 is there
    torch.testing.assert_close(run(alpha=0.0)["loss"], ce)  # alpha = 0: cross-entropy only
    torch.testing.assert_close(run(alpha=1.0)["loss"], 4.0 * kd_t2)  # alpha = 1: T^2 * KD only
    # temperature reaches the loss: the same labels scored at T = 1 give another KD value
    kd_t1 = distill_loss(hidden, weight, targets, ids, lps, temperature=1.0, alpha=1.0)["kd"]
    assert abs(kd_t1.item() - kd_t2.item()) > 0.05 * kd_t2.item()
    # no teacher: plain cross-entropy, whatever alpha says
    plain = distill_loss(hidden, weight, targets, temperature=2.0, alpha=0.9)
    torch.testing.assert_close(plain["loss"], ce)
    assert plain["kd"].item() == 0.0


def test_eval_path_equals_train_path():
    """Under no_grad (eval) the same chunked forward runs without gradients: same numbers, not 1000x off."""
    hidden, weight, targets, ids, lps = _head_problem()
    train = distill_loss(hidden.clone().requires_grad_(), weight, targets, ids, lps, temperature=2.0, chunk_tokens=7)
    with torch.no_grad():
        evaluated = distill_loss(hidden, weight, targets, ids, lps, temperature=2.0, chunk_tokens=7)
    for key in ("loss", "ce", "kd"):
        torch.testing.assert_close(evaluated[key], train[key].detach())
    assert not evaluated["loss"].requires_grad


def test_bf16_autocast_is_finite_and_close_to_fp32():
    hidden, weight, targets, ids, lps = _head_problem(vocab=500)
    full = distill_loss(hidden, weight, targets, ids, lps, temperature=2.0, chunk_tokens=9)
    for divergence, beta in DIVS:
        h = hidden.bfloat16().requires_grad_()
        w = weight.clone().requires_grad_()  # fp32 master weights, as in mixed-precision training
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = distill_loss(h, w, targets, ids, lps.bfloat16(), temperature=2.0, divergence=divergence, beta=beta, chunk_tokens=9)
        out["loss"].backward()
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"]) and out["kd"] >= 0
        assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
        assert torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad).all()
        if divergence == "forward_kl":
            torch.testing.assert_close(out["loss"], full["loss"], rtol=0.03, atol=0.03)
    # bf16 hidden without autocast: the matmul runs in bf16, the loss still in fp32
    out = distill_loss(hidden.bfloat16(), weight, targets, ids, lps, temperature=2.0)
    torch.testing.assert_close(out["loss"], full["loss"], rtol=0.03, atol=0.03)


def test_frozen_head_gets_no_gradient_and_empty_batch_is_zero():
    hidden, weight, targets, ids, lps = _head_problem()
    h = hidden.clone().requires_grad_()
    out = distill_loss(h, weight, targets, ids, lps, chunk_tokens=10)  # LoRA: the head is frozen
    out["loss"].backward()
    assert h.grad is not None and weight.grad is None
    h = torch.zeros(0, 16, requires_grad=True)
    empty = distill_loss(h, weight, torch.zeros(0, dtype=torch.long), ids[:0], lps[:0])
    empty["loss"].backward()
    assert empty["loss"].item() == 0.0 and h.grad.shape == (0, 16)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets, ids, lps = _head_problem(vocab=300)
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        distill_loss(hidden, weight[:200], targets.clamp_max(199), ids.clamp_min(250), lps)
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        kd_divergence(torch.randn(37, 200), ids.clamp_min(250), lps, temperature=1.0)
    with pytest.raises(ValueError, match="-100"):
        distill_loss(hidden, weight, torch.full_like(targets, -100), ids, lps)
    with pytest.raises(ValueError, match="both"):
        distill_loss(hidden, weight, targets, ids, None)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(hidden, weight, targets, ids, lps, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(hidden, weight, targets, ids, lps, temperature=0.0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_logits_never_exist_forward_or_backward():
    n, hidden_size, vocab, chunk = 128, 4, 1000, 16
    hidden, weight, targets, ids, lps = _head_problem(n=n, hidden_size=hidden_size, vocab=vocab)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with _LargestTensor() as probe:
        out = distill_loss(h, w, targets, ids, lps, temperature=2.0, chunk_tokens=chunk)
        out["loss"].backward()
    assert probe.largest <= chunk * vocab < n * vocab  # (chunk, V) at most; (N, V) would be 8x that
    assert h.grad is not None and w.grad is not None


# ------------------------------------------------------------------------------------------------ properties


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 9),
    vocab=st.integers(2, 60),
    k_frac=st.floats(0.01, 1.0),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    div=st.sampled_from(DIVS),
    scale=st.sampled_from([0.1, 3.0, 20.0]),
    chunk=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(n, vocab, k_frac, temperature, div, scale, chunk, seed):
    k = max(1, round(k_frac * vocab))
    divergence, beta = div
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, 8, generator=g, dtype=torch.float64) * scale / 3
    targets = torch.randint(0, vocab, (n,), generator=g)
    ids, lps = topk_logprobs(torch.randn(n, vocab, generator=g) * scale, k, temperature)
    logits = (hidden @ weight.T).float()
    div_values = kd_divergence(logits, ids, lps, temperature=temperature, divergence=divergence, beta=beta)
    want = reference(logits, ids, lps, temperature, divergence, beta)
    assert torch.isfinite(div_values).all() and (div_values >= 0).all()
    # compare where fp32 log-probs determine the teacher's tail: below ~1e-6 it is rounding noise (in both)
    tail = 1 - lps.double().exp().sum(-1)
    determined = (tail > 1e-6) | (k == vocab)
    torch.testing.assert_close(div_values.double()[determined], want[determined], rtol=2e-3, atol=2e-5)
    # chunked head + loss == naive, values and gradients
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = distill_loss(h, w, targets, ids, lps, temperature=temperature, alpha=0.4, divergence=divergence, beta=beta, chunk_tokens=chunk)
    h0, w0 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    naive = _naive_loss(h0, w0, targets, ids, lps, temperature, 0.4, divergence, beta)
    torch.testing.assert_close(out["loss"], naive, rtol=1e-4, atol=1e-5)
    for got, expected in zip(torch.autograd.grad(out["loss"], [h, w]), torch.autograd.grad(naive, [h0, w0])):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------ dense (online) teacher


def _dense_problem(n=29, h_student=16, h_teacher=24, vocab=300, seed=1):
    """Student hidden + head, and a teacher with another hidden size (its own final hidden states + head)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h_student, generator=g)
    weight = torch.randn(vocab, h_student, generator=g) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    t_hidden = torch.randn(n, h_teacher, generator=g)
    t_head = torch.randn(vocab, h_teacher, generator=g) * 0.6
    return hidden, weight, targets, t_hidden, t_head


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_dense_teacher_equals_topk_with_k_equal_to_vocab_and_the_float64_reference(divergence, beta):
    """The online teacher's dense path gives the same loss and gradients as its soft labels with k = V, and both
    equal the float64 definition over all V tokens."""
    hidden, weight, targets, t_hidden, t_head = _dense_problem()
    t_logits = t_hidden @ t_head.T  # (N, V)
    vocab = weight.shape[0]
    ids, lps = topk_logprobs(t_logits.double(), vocab, 2.0)  # k = V: every token, no tail
    kw = dict(temperature=2.0, alpha=0.6, divergence=divergence, beta=beta)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    dense = distill_loss(h1, w1, targets, teacher_hidden=t_hidden, teacher_head=t_head, chunk_tokens=7, **kw)
    g_dense = torch.autograd.grad(dense["loss"], [h1, w1])
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    topk = distill_loss(h2, w2, targets, ids, lps, chunk_tokens=100, **kw)
    g_topk = torch.autograd.grad(topk["loss"], [h2, w2])
    torch.testing.assert_close(dense["loss"], topk["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(g_dense, g_topk):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    want = reference(hidden @ weight.T, ids, lps, 2.0, divergence, beta)
    torch.testing.assert_close(dense["kd"].double(), want.mean(), rtol=1e-4, atol=1e-6)


def test_dense_teacher_padding_rows_are_cut_and_bad_inputs_are_named():
    """A teacher head with extra padding rows (Qwen2.5: 151,936 vs 152,064) scores exactly like the unpadded one."""
    hidden, weight, targets, t_hidden, t_head = _dense_problem()
    padded = torch.cat([t_head, torch.randn(64, t_head.shape[1]) * 5])  # 64 rows no tokenizer id maps to
    a = distill_loss(hidden, weight, targets, teacher_hidden=t_hidden, teacher_head=t_head, alpha=1.0, temperature=2.0)
    b = distill_loss(hidden, weight, targets, teacher_hidden=t_hidden, teacher_head=padded, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(a["loss"], b["loss"])
    assert a["kd"].item() > 0.01  # a real divergence, not 0 = 0
    with pytest.raises(ValueError, match="one teacher signal"):
        ids, lps = topk_logprobs(t_hidden @ t_head.T, 4, 2.0)
        distill_loss(hidden, weight, targets, ids, lps, teacher_hidden=t_hidden, teacher_head=t_head)
    with pytest.raises(ValueError, match="teacher_hidden must be"):
        distill_loss(hidden, weight, targets, teacher_hidden=t_hidden[:5], teacher_head=t_head)


@pytest.mark.parametrize("signal", ["topk", "dense"])
def test_temperature_changes_the_gradient_as_the_definition_says(signal):
    """PITFALLS.md: TRL 1.16's GKD loss ignores its temperature. Ours: the gradient at T equals autograd through the
    float64 definition alpha * T^2 * KD_T + (1 - alpha) * CE, and differs from the gradient at T = 1."""
    hidden, weight, targets, t_hidden, t_head = _dense_problem(seed=3)
    t_logits = (t_hidden @ t_head.T).double()  # (N, V)

    def ours(temperature):
        h = hidden.clone().requires_grad_()
        if signal == "dense":
            out = distill_loss(h, weight, targets, teacher_hidden=t_hidden, teacher_head=t_head,
                               temperature=temperature, alpha=0.5, chunk_tokens=8)
        else:
            ids, lps = topk_logprobs(t_logits, 16, temperature)
            out = distill_loss(h, weight, targets, ids, lps, temperature=temperature, alpha=0.5, chunk_tokens=8)
        return torch.autograd.grad(out["loss"], h)[0]

    def definition(temperature):
        h = hidden.double().clone().requires_grad_()
        logits = h @ weight.double().T
        k = weight.shape[0] if signal == "dense" else 16
        ids, lps = topk_logprobs(t_logits, k, temperature)
        kd = reference(logits, ids, lps, temperature, "forward_kl", 0.5).mean()
        loss = 0.5 * F.cross_entropy(logits, targets) + 0.5 * temperature**2 * kd
        return torch.autograd.grad(loss, h)[0].float()

    g1, g4 = ours(1.0), ours(4.0)
    torch.testing.assert_close(g4, definition(4.0), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(g1, definition(1.0), rtol=1e-3, atol=1e-6)
    assert (g4 - g1).norm() > 0.1 * g1.norm()  # T really reaches the gradient, not only the sampling


# ------------------------------------------------------------------- forward KL's closed-form gradient


def _edge_case_logits(temperature, k, vocab=40, seed=5):
    """Student and teacher logits (10, V) whose rows hit every special case of the top-k forward KL."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(10, vocab, generator=g) * 3
    teacher = torch.randn(10, vocab, generator=g) * 3
    teacher[4, 8:] = -torch.inf  # only 8 possible tokens: the teacher's tail is exactly 0 (floored)
    ids, _ = topk_logprobs(teacher, k, temperature)
    on_ids = torch.zeros(10, vocab, dtype=torch.bool).scatter(-1, ids, True)
    # row 5: the student's mass off the ids ~e^-57 (the exact fallback); row 6: ~e^-146, under the floor
    student[5] = torch.where(on_ids[5], 0.0, -60.0 * temperature)
    student[6] = torch.where(on_ids[6], 0.0, -150.0 * temperature)
    student[7] = teacher[7]  # identical: the divergence is ~0 and may be clamped there
    student[8, ids[8]] *= 0.1  # the student nearly flat on the ids
    ids, lps = topk_logprobs(teacher, k, temperature)
    ids[9, 1] = ids[9, 0]  # a duplicated id: gather's gradient adds up
    return student, ids, lps


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("k", [8, 40])
def test_forward_kl_closed_form_gradient_equals_autograd(temperature, alpha, k, monkeypatch):
    """distill_loss writes forward KL's gradient in closed form; it equals autograd through `kd_divergence` (the
    bucket definition with its floors and clamp) + cross-entropy, values and gradients, on every edge case."""
    student, ids, lps = _edge_case_logits(temperature, k)
    vocab = student.shape[1]
    targets = torch.arange(10) * 3 % vocab
    # head = identity, hidden = the logits: the edge cases above reach the loss exactly as written
    h0, w0 = student.clone().requires_grad_(), torch.eye(vocab).requires_grad_()
    want = _naive_loss(h0, w0, targets, ids, lps, temperature, alpha)
    want_grads = torch.autograd.grad(want, [h0, w0])

    from stillhouse import losses

    def no_autograd(*a, **kw):
        raise AssertionError("forward KL took the autograd path")

    monkeypatch.setattr(losses, "_bucket_divergence", no_autograd)  # proves the closed form is what runs
    for chunk in (3, 10):
        h, w = student.clone().requires_grad_(), torch.eye(vocab).requires_grad_()
        out = distill_loss(h, w, targets, ids, lps, temperature=temperature, alpha=alpha, chunk_tokens=chunk)
        torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-5)
        for got, expected in zip(torch.autograd.grad(out["loss"], [h, w]), want_grads):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert want.item() > 0.1  # not a comparison of zeros


def test_forward_kl_aliases_take_the_same_path():
    """jsd at beta 0 and skew_forward_kl at skew_alpha 0 are forward KL: the same loss and gradient."""
    hidden, weight, targets, ids, lps = _head_problem()
    results = []
    for kw in ({}, {"divergence": "jsd", "beta": 0.0}, {"divergence": "skew_forward_kl", "skew_alpha": 0.0}):
        h = hidden.clone().requires_grad_()
        out = distill_loss(h, weight, targets, ids, lps, temperature=2.0, chunk_tokens=10, **kw)
        results.append((out["loss"], torch.autograd.grad(out["loss"], h)[0]))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)
