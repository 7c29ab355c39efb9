"""Distillation losses: pure functions of the student's hidden states / logits and the teacher's soft labels.

The teacher signal is its top-k log-probabilities at temperature T (`stillhouse.softlabels`), so the teacher
distribution is known on k tokens only. Both distributions are compared over the same k + 1 BUCKETS:

    bucket j < k : token teacher_ids[j]    teacher  P_j = exp(teacher_logprobs[j])
                                           student  S_j = softmax(student_logits / T)[teacher_ids[j]]
    bucket k     : every other token       teacher  P_k = 1 - sum_j P_j      (the teacher's tail mass)
                                           student  S_k = 1 - sum_j S_j      (the student's mass off the teacher's ids)

This is exact, not an approximation of the full-vocabulary divergence: it is the divergence between the two
distributions coarsened to those buckets (the teacher's shape inside its tail is unknown, so it is not made
up). With k = V the tail bucket is empty and this is the full-vocabulary divergence. Details that matter:

- The student's tail is log-sum-exp over the complement of the teacher's ids (exact at any size), and the
  teacher's is (1 - p_max) - sum(other p) with 1 - p_max = -expm1(lp_max), clamped at 0: no 1 - sum
  cancellation, so a 1e-9 tail survives fp32 when the top-1 holds nearly everything (the usual case for tiny
  tails). Otherwise fp32 log-probabilities only pin the tail down to ~1e-7, and below that it counts as 0.
- Every bucket log-probability is floored at -100 (probability ~4e-44, zero in fp32): an empty teacher bucket
  contributes 0 (not 0 * -inf = NaN) and an empty student bucket a large finite penalty. The per-position
  divergence is clamped at >= 0 against rounding.
- All of it runs in fp32, whatever the input dtype (bf16 logits lose the tail and make JSD go negative).
- teacher_logprobs must have been taken at the same temperature T as given here: the soft-label shard
  records T, and train refuses a mismatch.

Divergences, per position, over the buckets (P = teacher, S = student):

    forward_kl   KL(P || S)                              mass-covering; the classic KD loss
    reverse_kl   KL(S || P)                              mode-seeking
    jsd          beta * KL(P || M) + (1 - beta) * KL(S || M),  M = beta * P + (1 - beta) * S,  0 < beta < 1
                 beta = 0 -> KL(P || S) (forward), beta = 1 -> KL(S || P) (reverse)

    total_variation  1/2 * sum |P - S|                  bounded in [0, 1], symmetric
    skew_forward_kl  KL(P || a * P + (1 - a) * S)       a = skew_alpha in [0, 1] (DistiLLM, Ko et al. 2024):
                                                        a = 0 is forward KL; a > 0 keeps it finite and its
                                                        gradient tame where the student puts ~0 mass
    skew_reverse_kl  KL(S || a * S + (1 - a) * P)       the same for reverse KL

The jsd endpoints follow TRL's GKD (generalized_jsd_loss): they are defined separately, because the mixture
formula itself goes to 0 at both ends (about beta * KL(P||S) near 0, (1 - beta) * KL(S||P) near 1), so
beta = 1e-6 is a near-zero loss, not "almost forward KL". beta outside [0, 1] is an error, never clamped.

`distill_loss` adds cross-entropy on the true next tokens: loss = (1 - alpha) * CE + alpha * T^2 * KD. The T^2
keeps the KD gradients' scale independent of T (Hinton et al., 2015). It never materializes (N, V) logits:
the LM head and the loss run chunk by chunk, in the forward and in the backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "total_variation", "skew_forward_kl", "skew_reverse_kl")
_LOG_FLOOR = -100.0
# Masks the teacher's ids out of the student's tail. Finite on purpose: if every entry is masked (duplicate ids
# covering V), a log-sum-exp over -inf alone has a NaN gradient; this gives a huge value, floored, gradient 0.
_MASKED = torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------------------------- divergence


def kd_divergence(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Per-position divergence (N,) between the teacher's top-k + tail buckets and the student's, at temperature T.

    student_logits (N, V) raw logits (any dtype; math in fp32); teacher_ids (N, k) int64, ids < V;
    teacher_logprobs (N, k) at temperature T. divergence: forward_kl | reverse_kl | jsd (with beta) |
    total_variation | skew_forward_kl | skew_reverse_kl (with skew_alpha); the buckets, the tail, the floors
    and the jsd endpoints are as in the module docstring.
    """
    _check_options(temperature, divergence, beta, skew_alpha)
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} must be (N, k) "
            f"with N = {student_logits.shape[0]} (student_logits' rows)"
        )
    _check_ids(teacher_ids, student_logits.shape[-1])
    return _bucket_divergence(student_logits, teacher_ids, teacher_logprobs, temperature, divergence, beta, skew_alpha)


def _bucket_divergence(student_logits, teacher_ids, teacher_logprobs, temperature, divergence, beta,
                       skew_alpha) -> Tensor:
    with torch.autocast(student_logits.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
        z = student_logits.float()
        if temperature != 1.0:
            z = z / temperature  # (N, V)
        ids = teacher_ids.long()  # (N, k)
        log_norm = torch.logsumexp(z, -1, keepdim=True)  # (N, 1)
        log_s = z.gather(-1, ids) - log_norm  # (N, k)  student log-probs on the teacher's ids
        log_p = teacher_logprobs.float()  # (N, k)
        if ids.shape[-1] < z.shape[-1]:  # the tail bucket (with k = V it is empty by definition)
            s_tail = torch.logsumexp(z.scatter(-1, ids, _MASKED), -1, keepdim=True) - log_norm  # (N, 1)
            log_s = torch.cat([log_s, s_tail], -1)  # (N, k+1) student buckets
            log_p = torch.cat([log_p, _log_tail(log_p)], -1)  # (N, k+1) teacher buckets
        log_p, log_s = log_p.clamp(min=_LOG_FLOOR), log_s.clamp(min=_LOG_FLOOR)
        if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
            div = _kl(log_p, log_s)
        elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
            div = _kl(log_s, log_p)
        elif divergence == "total_variation":
            div = 0.5 * (log_p.exp() - log_s.exp()).abs().sum(-1)
        elif divergence in ("skew_forward_kl", "skew_reverse_kl"):
            a, b = (log_p, log_s) if divergence == "skew_forward_kl" else (log_s, log_p)
            if skew_alpha == 0.0:
                div = _kl(a, b)
            else:  # KL(A || skew_alpha * A + (1 - skew_alpha) * B), the mixture in log space
                log_mix = torch.logaddexp(a + math.log(skew_alpha), b + math.log1p(-skew_alpha)) if skew_alpha < 1 else a
                div = _kl(a, log_mix)
        else:  # mixture M = beta * P + (1 - beta) * S, in log space
            log_m = torch.logaddexp(log_p + math.log(beta), log_s + math.log1p(-beta))  # (N, k+1)
            div = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_s, log_m)
        return div.clamp(min=0.0)  # (N,)


def _log_tail(logprobs: Tensor) -> Tensor:
    """log(1 - sum(exp(logprobs))) over the last dim, (N, k) -> (N, 1), accurate for tails far below fp32's eps.

    1 - sum in fp32 rounds a 1e-9 tail to 0 (or to 6e-8). Written as (1 - p_max) - sum(others) with
    1 - p_max = -expm1(lp_max), both terms are exact to fp32 precision and their difference keeps the tail.
    """
    top = logprobs.argmax(-1, keepdim=True)  # (N, 1)
    one_minus_max = -torch.expm1(logprobs.gather(-1, top))  # (N, 1)
    others = logprobs.exp().scatter(-1, top, 0.0).sum(-1, keepdim=True)  # (N, 1)
    return torch.log((one_minus_max - others).clamp(min=0.0))


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dim, from log-probabilities (finite: both floored)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _check_options(temperature: float, divergence: str, beta: float, skew_alpha: float = 0.1) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if not 0.0 <= skew_alpha <= 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1] (0 = plain KL), got {skew_alpha}")


def _check_ids(teacher_ids: Tensor, vocab_size: int) -> None:
    if teacher_ids.numel() and (int(teacher_ids.max()) >= vocab_size or int(teacher_ids.min()) < 0):
        raise ValueError(
            f"teacher token id {int(teacher_ids.max())} is outside the student's vocabulary / LM head "
            f"({vocab_size} rows); the teacher and student tokenizers differ"
        )


# ------------------------------------------------------------------------------------- fused head + loss


@dataclass(frozen=True)
class _Options:
    temperature: float
    divergence: str
    beta: float
    skew_alpha: float
    ce_weight: float  # 1 - alpha
    kd_weight: float  # alpha * T^2, 0 without a teacher
    chunk_tokens: int


def distill_loss(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    chunk_tokens: int = 1024,
) -> dict:
    """The training loss from the student's final hidden states, without ever holding (N, V) logits.

    hidden (N, H): hidden states at the N positions that predict a response token (bf16 is fine: the head
    matmul runs in hidden's dtype, or autocast's, the softmax and divergence in fp32); head_weight (V, H): the
    LM head; targets (N,): the true next tokens (no -100: select the positions first); teacher_ids,
    teacher_logprobs (N, k): the teacher's top-k at temperature T, or None for plain cross-entropy.

    Returns {"loss", "ce", "kd"}, scalars, means over N: loss = (1 - alpha) * CE + alpha * T^2 * KD, with
    CE at T = 1 and KD = mean of `kd_divergence` (un-scaled); without a teacher loss = CE and kd = 0. Only
    "loss" carries gradients. Peak memory is O(chunk_tokens * V): ~5 fp32 (chunk_tokens, V) buffers plus the
    (V, H) fp32 head gradient; measured on CPU at V = 49,152, H = 576, N = 2048: +1.2 GB at chunk 1024, +0.33 GB
    at 256, +2.6 GB unchunked (and the fused path is faster: no chunk is recomputed in backward).
    alpha = 1 (no CE at all) is allowed here; pure KD can make a student repeat itself, so the train config
    should keep some CE.
    """
    if hidden.dim() != 2 or head_weight.dim() != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and head_weight (V, H); got {tuple(hidden.shape)} and {tuple(head_weight.shape)}")
    n, vocab = hidden.shape[0], head_weight.shape[0]
    if targets.shape != (n,):
        raise ValueError(f"targets must be (N,) = ({n},), got {tuple(targets.shape)}")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must be token ids in [0, {vocab}) (no -100: pass only the response positions)")
    if (teacher_ids is None) != (teacher_logprobs is None):
        raise ValueError("pass both teacher_ids and teacher_logprobs, or neither")
    if teacher_ids is not None:
        if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() != 2 or teacher_ids.shape[0] != n:
            raise ValueError(f"teacher_ids and teacher_logprobs must both be (N, k) with N = {n}")
        _check_ids(teacher_ids, vocab)
    _check_options(temperature, divergence, beta, skew_alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0 = cross-entropy only), got {alpha}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    opts = _Options(
        temperature=float(temperature),
        divergence=divergence,
        beta=float(beta),
        skew_alpha=float(skew_alpha),
        ce_weight=1.0 - alpha if teacher_ids is not None else 1.0,
        kd_weight=alpha * temperature**2 if teacher_ids is not None else 0.0,
        chunk_tokens=int(chunk_tokens),
    )
    if n == 0:  # nothing to learn from; keep the graph so backward() still works
        zero = (hidden.sum() * 0.0).float()
        return {"loss": zero, "ce": zero.detach(), "kd": zero.detach()}
    if torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad):
        loss, ce, kd = _FusedHeadLoss.apply(hidden, head_weight, targets, teacher_ids, teacher_logprobs, opts)
    else:  # eval: the same chunked forward, no gradients kept
        ce_sum, kd_sum, _, _ = _chunked(hidden, head_weight, targets, teacher_ids, teacher_logprobs, opts, False, False)
        ce, kd = ce_sum / n, kd_sum / n
        loss = opts.ce_weight * ce + opts.kd_weight * kd
    return {"loss": loss, "ce": ce, "kd": kd}


def _chunk_sums(hidden, head_weight, targets, teacher_ids, teacher_logprobs, opts) -> tuple[Tensor, Tensor]:
    """Sums over one chunk of positions: (CE at T=1, KD divergence at T)."""
    logits = hidden @ head_weight.to(hidden.dtype).T  # (c, V) in the input dtype (or autocast's)
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()  # (c, V) fp32
        # CE = logsumexp - logit of the target; written out so no (c, V) log-softmax is kept for backward
        ce = (torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)).sum()
        if teacher_ids is None:
            return ce, ce.new_zeros(())
        kd = _bucket_divergence(logits, teacher_ids, teacher_logprobs, opts.temperature, opts.divergence, opts.beta,
                                opts.skew_alpha).sum()
    return ce, kd


def _chunked(hidden, head_weight, targets, teacher_ids, teacher_logprobs, opts, need_hidden, need_weight):
    """CE and KD sums over all positions, chunk by chunk; with need_*, also d(loss)/d(hidden, head_weight).

    Each chunk's gradient is taken right after its forward, while its (c, V) logits exist, and then they are
    freed: no chunk is ever recomputed, and the (N, V) logits never exist, forward or backward.
    """
    n = hidden.shape[0]
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (N, H)
    grad_weight = torch.zeros_like(head_weight, dtype=torch.float32) if need_weight else None  # (V, H), fp32 sum
    weight = head_weight.detach().requires_grad_(need_weight)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kd_sum = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, n, opts.chunk_tokens):
        b = min(a + opts.chunk_tokens, n)
        h = hidden[a:b].detach().requires_grad_(need_hidden)  # (c, H)
        ids = teacher_ids[a:b] if teacher_ids is not None else None
        lps = teacher_logprobs[a:b] if teacher_logprobs is not None else None
        with torch.enable_grad() if (need_hidden or need_weight) else torch.no_grad():
            ce, kd = _chunk_sums(h, weight, targets[a:b], ids, lps, opts)
            if need_hidden or need_weight:
                # this chunk's share of the mean loss; its gradient is the chunk's part of the total
                chunk_loss = (opts.ce_weight * ce + opts.kd_weight * kd) / n
                wrt = [t for t, need in ((h, need_hidden), (weight, need_weight)) if need]
                grads = list(torch.autograd.grad(chunk_loss, wrt))
                if need_hidden:
                    grad_hidden[a:b] = grads.pop(0)
                if need_weight:
                    grad_weight += grads.pop(0)
        ce_sum += ce.detach()
        kd_sum += kd.detach()
    return ce_sum, kd_sum, grad_hidden, grad_weight


class _FusedHeadLoss(torch.autograd.Function):
    """LM head + distillation loss with the gradient computed in the forward pass (as Liger's fused linear
    cross-entropy does); backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, head_weight, targets, teacher_ids, teacher_logprobs, opts):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ce_sum, kd_sum, grad_hidden, grad_weight = _chunked(
            hidden, head_weight, targets, teacher_ids, teacher_logprobs, opts, need_hidden, need_weight
        )
        n = hidden.shape[0]
        ce, kd = ce_sum / n, kd_sum / n
        loss = opts.ce_weight * ce + opts.kd_weight * kd
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = head_weight.dtype
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None
