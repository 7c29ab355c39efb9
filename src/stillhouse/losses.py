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

A dense (online) teacher, run inside the training loop, gives all V log-probabilities: then the buckets are the
V tokens themselves, exactly the k = V case above (no tail). `distill_loss` takes its final hidden states and LM
head and applies that head chunk by chunk too, so neither model's (N, V) logits ever exist. When the two heads
differ only by padding rows (PITFALLS.md), both are cut to the shorter one; real tokens are never padding.

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
        return _divergence(log_p, log_s, divergence, beta, skew_alpha)


def _dense_divergence(student_logits, teacher_logits, temperature, divergence, beta, skew_alpha) -> Tensor:
    """(N,) divergence over all V tokens, from both models' raw logits (N, V): the k = V case, in fp32."""
    with torch.autocast(student_logits.device.type, enabled=False):
        log_s = torch.log_softmax(student_logits.float() / temperature, -1)  # (N, V)
        log_p = torch.log_softmax(teacher_logits.float() / temperature, -1)  # (N, V)
        return _divergence(log_p, log_s, divergence, beta, skew_alpha)


def _divergence(log_p: Tensor, log_s: Tensor, divergence, beta, skew_alpha) -> Tensor:
    """Per-row divergence (N,) between bucket log-probabilities (N, B) of the teacher (log_p) and student (log_s)."""
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
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
) -> dict:
    """The training loss from the student's final hidden states, without ever holding (N, V) logits.

    hidden (N, H): hidden states at the N positions that predict a response token (bf16 is fine: the head
    matmul runs in hidden's dtype, or autocast's, the softmax and divergence in fp32); head_weight (V, H): the
    LM head; targets (N,): the true next tokens (no -100: select the positions first); teacher_ids,
    teacher_logprobs (N, k): the teacher's top-k at temperature T, or None for plain cross-entropy. A dense
    (online) teacher instead: teacher_hidden (N, H_t), its final hidden states at the same positions, and
    teacher_head (V_t, H_t), its LM head; its logits are made chunk by chunk in fp32, without gradients.

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
    if (teacher_ids is None) != (teacher_logprobs is None) or (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("pass both teacher_ids and teacher_logprobs, or both teacher_hidden and teacher_head, or neither")
    teacher = None  # what _chunked needs per chunk: ("topk", ids, logprobs) or ("dense", hidden, head)
    if teacher_ids is not None:
        if teacher_hidden is not None:
            raise ValueError("pass one teacher signal: top-k (teacher_ids, teacher_logprobs) or dense (teacher_hidden, teacher_head)")
        if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() != 2 or teacher_ids.shape[0] != n:
            raise ValueError(f"teacher_ids and teacher_logprobs must both be (N, k) with N = {n}")
        _check_ids(teacher_ids, vocab)
        teacher = ("topk", teacher_ids, teacher_logprobs)
    elif teacher_hidden is not None:
        if teacher_hidden.dim() != 2 or teacher_head.dim() != 2 or teacher_hidden.shape != (n, teacher_head.shape[1]):
            raise ValueError(f"teacher_hidden must be (N, H_t) with N = {n} and teacher_head (V_t, H_t); got "
                             f"{tuple(teacher_hidden.shape)} and {tuple(teacher_head.shape)}")
        # fp32 head once, not per chunk; padding rows beyond the student's vocabulary cut off (module docstring)
        teacher = ("dense", teacher_hidden.detach(), teacher_head.detach()[:vocab].float())
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
        ce_weight=1.0 - alpha if teacher is not None else 1.0,
        kd_weight=alpha * temperature**2 if teacher is not None else 0.0,
        chunk_tokens=int(chunk_tokens),
    )
    if n == 0:  # nothing to learn from; keep the graph so backward() still works
        zero = (hidden.sum() * 0.0).float()
        return {"loss": zero, "ce": zero.detach(), "kd": zero.detach()}
    if torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad):
        loss, ce, kd = _FusedHeadLoss.apply(hidden, head_weight, targets, teacher, opts)
    else:  # eval: the same chunked forward, no gradients kept
        ce_sum, kd_sum, _, _ = _chunked(hidden, head_weight, targets, teacher, opts, False, False)
        ce, kd = ce_sum / n, kd_sum / n
        loss = opts.ce_weight * ce + opts.kd_weight * kd
    return {"loss": loss, "ce": ce, "kd": kd}


def _chunk_sums(logits, targets, teacher, opts) -> tuple[Tensor, Tensor]:
    """Sums over one chunk of positions' logits (c, V): (CE at T=1, KD divergence at T). teacher: this chunk's
    ("topk", ids (c, k), logprobs (c, k)), ("dense", logits (c, V_t <= V)) or None."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()  # (c, V) fp32
        # CE = logsumexp - logit of the target; written out so no (c, V) log-softmax is kept for backward
        ce = (torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)).sum()
        if teacher is None:
            return ce, ce.new_zeros(())
        if teacher[0] == "topk":
            kd = _bucket_divergence(logits, teacher[1], teacher[2], opts.temperature, opts.divergence, opts.beta,
                                    opts.skew_alpha).sum()
        else:  # dense: both cut to the teacher's (possibly shorter) vocabulary
            t_logits = teacher[1]  # (c, V_t)
            kd = _dense_divergence(logits[:, : t_logits.shape[1]], t_logits, opts.temperature, opts.divergence,
                                   opts.beta, opts.skew_alpha).sum()
    return ce, kd


def _chunked(hidden, head_weight, targets, teacher, opts, need_hidden, need_weight):
    """CE and KD sums over all positions, chunk by chunk; with need_*, also d(loss)/d(hidden, head_weight).

    Each chunk's gradient is taken right after its forward, while its (c, V) logits exist, and then they are
    freed: no chunk is ever recomputed, and the (N, V) logits never exist, forward or backward. For the
    default forward KL against top-k labels the gradient w.r.t. the logits is written in closed form
    (`_forward_kl_sums_and_grad`); autograd then only runs through the head matmul.
    """
    n = hidden.shape[0]
    need_grad = need_hidden or need_weight
    closed_form = need_grad and teacher is not None and teacher[0] == "topk" and _is_forward_kl(opts)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (N, H)
    grad_weight = torch.zeros_like(head_weight, dtype=torch.float32) if need_weight else None  # (V, H), fp32 sum
    weight = head_weight.detach().requires_grad_(need_weight)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kd_sum = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, n, opts.chunk_tokens):
        b = min(a + opts.chunk_tokens, n)
        h = hidden[a:b].detach().requires_grad_(need_hidden)  # (c, H)
        if teacher is None:
            part = None
        elif teacher[0] == "topk":
            part = ("topk", teacher[1][a:b], teacher[2][a:b])
        else:  # the dense teacher's logits for this chunk only, (c, V_t) fp32, never part of the graph
            with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
                part = ("dense", teacher[1][a:b].float() @ teacher[2].T)
        with torch.enable_grad() if need_grad else torch.no_grad():
            logits = h @ weight.to(h.dtype).T  # (c, V) in the input dtype (or autocast's)
            if closed_form:
                ce, kd, grad_logits = _forward_kl_sums_and_grad(logits.detach(), targets[a:b], part[1], part[2],
                                                                opts, n)
                chunk_loss, grad_out = logits, grad_logits.to(logits.dtype)
            else:
                ce, kd = _chunk_sums(logits, targets[a:b], part, opts)
                # this chunk's share of the mean loss; its gradient is the chunk's part of the total
                chunk_loss, grad_out = (opts.ce_weight * ce + opts.kd_weight * kd) / n, None
            if need_grad:
                wrt = [t for t, need in ((h, need_hidden), (weight, need_weight)) if need]
                grads = list(torch.autograd.grad(chunk_loss, wrt, grad_out))
                if need_hidden:
                    grad_hidden[a:b] = grads.pop(0)
                if need_weight:
                    grad_weight += grads.pop(0)
        ce_sum += ce.detach()
        kd_sum += kd.detach()
    return ce_sum, kd_sum, grad_hidden, grad_weight


def _is_forward_kl(opts) -> bool:
    """Whether opts' divergence is KL(P || S) itself (jsd at beta 0 and the skew at 0 are defined to be it)."""
    return (opts.divergence == "forward_kl" or (opts.divergence == "jsd" and opts.beta == 0.0)
            or (opts.divergence == "skew_forward_kl" and opts.skew_alpha == 0.0))


def _forward_kl_sums_and_grad(logits, targets, teacher_ids, teacher_logprobs, opts, n):
    """One chunk's (CE sum, forward-KL sum, d(chunk's share of the mean loss)/d(logits) (c, V) fp32), without autograd.

    The values are computed exactly as `_chunk_sums` + `_bucket_divergence` do. The gradient, with u = z / T,
    s = softmax(u), buckets b (the k ids, then the tail) and log S_b the student's bucket log-probabilities:

        loss share = (ce_weight * sum CE + kd_weight * sum KL) / n,   KL = sum_b P_b (log P_b - log S_b)
        d KL / d log S_b = -P_b           (0 where log S_b is under the floor or KL under its clamp at 0:
                                           the floor and the clamp pass no gradient there, as in autograd)
        log S_j = u[id_j] - lse(u)        d / du_v = [v = id_j] - s_v
        log S_tail = lse(u off ids) - lse(u)   d / du_v = [v not an id] * s_v / S_tail - s_v
        d / dz = (1 / T) d / du;  CE: ce_weight / n * (softmax(z) - onehot(target))

    s_v / S_tail is taken as exp(u_v - lse(u off ids)), exact however small the student's tail is. Autograd
    through the same formulas keeps ~4 more (c, V) buffers and twice the passes over them (test_losses.py
    checks both give the same values and gradients).
    """
    with torch.autocast(logits.device.type, enabled=False):
        z = logits.float()  # (c, V); may share memory with logits: never written in place
        t = opts.temperature
        ids = teacher_ids.long()  # (c, k)
        lse_z = torch.logsumexp(z, -1, keepdim=True)  # (c, 1)
        ce = (lse_z.squeeze(-1) - z.gather(-1, targets[:, None]).squeeze(-1)).sum()
        u = z / t if t != 1.0 else z  # (c, V)
        lse_u = torch.logsumexp(u, -1, keepdim=True) if t != 1.0 else lse_z  # (c, 1)
        log_s = u.gather(-1, ids) - lse_u  # (c, k)
        log_p = teacher_logprobs.float()  # (c, k)
        tail = ids.shape[-1] < z.shape[-1]
        if tail:
            off_ids = u.scatter(-1, ids, _MASKED)  # (c, V), the teacher's ids masked out
            lse_off = torch.logsumexp(off_ids, -1, keepdim=True)  # (c, 1)
            log_s = torch.cat([log_s, lse_off - lse_u], -1)  # (c, k+1)
            log_p = torch.cat([log_p, _log_tail(log_p)], -1)  # (c, k+1)
        log_p = log_p.clamp(min=_LOG_FLOOR)
        raw = _kl(log_p, log_s.clamp(min=_LOG_FLOOR))  # (c,) as `_divergence`, before its clamp at 0
        kd = raw.clamp(min=0.0).sum()

        # g_b = d(loss share)/d(log S_b), with the 1/T of d/dz folded in: (c, k+1)
        g = log_p.exp() * (log_s >= _LOG_FLOOR) * (raw >= 0.0)[:, None] * (-opts.kd_weight / (n * t))
        g_sum = g.sum(-1, keepdim=True)  # (c, 1): every bucket also holds -lse(u)
        ce_scale = opts.ce_weight / n
        grad = (z - lse_z).exp_()  # (c, V) softmax(z)
        if t == 1.0:  # s = softmax(z)
            grad.mul_(ce_scale - g_sum)
        else:
            grad.mul_(ce_scale).addcmul_(u.sub_(lse_u).exp_(), -g_sum)  # u is our own buffer here
        if tail:  # off_ids is exactly 0 at the ids (exp(-huge)), or g_tail is 0 (all of V masked: floored)
            grad.addcmul_(off_ids.sub_(lse_off).exp_(), g[:, -1:])
            g = g[:, :-1]
        grad.scatter_add_(-1, ids, g)
        grad.scatter_add_(-1, targets[:, None], grad.new_full((grad.shape[0], 1), -ce_scale))
    return ce, kd, grad


class _FusedHeadLoss(torch.autograd.Function):
    """LM head + distillation loss with the gradient computed in the forward pass (as Liger's fused linear
    cross-entropy does); backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, head_weight, targets, teacher, opts):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ce_sum, kd_sum, grad_hidden, grad_weight = _chunked(hidden, head_weight, targets, teacher, opts, need_hidden,
                                                            need_weight)
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
        return grad_hidden, grad_weight, None, None, None
