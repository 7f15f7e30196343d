"""The masked temporal softmax loss of the courses, and the same loss fused with the vocabulary projection.

``temporal_softmax_loss`` is the courses' function on scores (N, T, V). ``linear_temporal_softmax_loss``
fuses ``scores = h W^T + b`` with it, as training uses it: it only projects the non-``<NULL>`` positions,
works through them in row chunks so the (N*T, V) score matrix never exists, and computes the gradients of
h, W and b while the chunk's scores are at hand (softmax minus one-hot, in place), so backward only scales
them by the incoming gradient. Under autocast it falls back to the unfused autograd form.

Both take optional per-caption ``weights`` (N,), which scale each caption's summed cross-entropy (the
policy-gradient loss of self-critical training is this loss with weight = the sample's advantage),
``excluded`` word ids whose scores count as -inf (the decoders never emit ``<NULL>`` / ``<START>``, so the
log-probability of a sampled caption is over the other words), and ``label_smoothing`` eps (Szegedy et al.
2016): the target distribution is (1 - eps) one-hot + eps uniform over the words not excluded, so a token's
loss is ``(1 - eps) (-log p(target)) + eps mean_v (-log p(v))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import gemm

__all__ = ["temporal_softmax_loss", "linear_temporal_softmax_loss"]


def temporal_softmax_loss(
    scores: Tensor, targets: Tensor, ignore_index: int = 0, normalize: str = "batch",
    weights: Tensor | None = None, excluded: Sequence[int] = (), label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy summed over all time steps whose target is not ``ignore_index``.

    scores (N, T, V) unnormalised, targets (N, T) word ids -> scalar loss.

    ``normalize="batch"`` (the default, the courses' convention) divides the sum by N, so the number is
    the per-caption loss and compares with the courses'; ``normalize="tokens"`` divides by the number of
    kept tokens instead (the per-token loss, independent of caption length). ``weights`` (N,) scale each
    caption's terms; ``excluded`` word ids are left out of the softmax; ``label_smoothing`` (see the module
    docstring) in [0, 1).
    """
    if scores.dim() != 3 or targets.shape != scores.shape[:2]:
        raise ValueError(
            f"temporal_softmax_loss expects scores (N, T, V) and targets (N, T); got scores "
            f"{tuple(scores.shape)} and targets {tuple(targets.shape)}."
        )
    if normalize not in ("batch", "tokens"):
        raise ValueError(f"normalize must be 'batch' or 'tokens', got {normalize!r}.")
    _check_smoothing(label_smoothing)
    if scores.dtype in (torch.float16, torch.bfloat16):
        # Mixed precision: score in float32, as a sum over N*T tokens in bf16 (8-bit mantissa) loses the
        # loss's digits; autograd casts the gradient back to the scores' dtype.
        scores = scores.float()
    if excluded:
        scores = scores.index_fill(-1, torch.as_tensor(list(excluded), device=scores.device), float("-inf"))
    mask = targets != ignore_index
    # -log p(target) = logsumexp(scores) - score[target]; computed in a numerically stable form.
    log_norm = torch.logsumexp(scores, dim=-1)
    target_scores = scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = log_norm - target_scores
    if label_smoothing:
        allowed = torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
        if excluded:
            allowed[list(excluded)] = False
        uniform = log_norm - scores[..., allowed].mean(dim=-1)  # mean over the allowed words of -log p(v)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    nll = nll.masked_fill(~mask, 0.0)
    if weights is not None:
        nll = nll * _check_weights(weights, scores.shape[0]).to(nll.dtype).unsqueeze(1)
    denominator = scores.shape[0] if normalize == "batch" else mask.sum().clamp(min=1)
    return nll.sum() / denominator


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")


def _check_weights(weights: Tensor, n: int) -> Tensor:
    if weights.shape != (n,):
        raise ValueError(f"weights must hold one value per caption, shape ({n},); got {tuple(weights.shape)}.")
    return weights.detach()


# ---------------------------------------------------------------------------------------------------
# Fused vocabulary projection + temporal softmax loss
_CHUNK_ELEMENTS = 1 << 22  # scores per chunk: 16 MiB in float32, reused by the allocator between chunks


class _LinearSoftmaxLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, ignore_index: int, per_token: bool,
        batch: int, row_weights: Tensor | None, excluded: Tensor | None, smoothing: float,
    ) -> Tensor:
        """h (M, H) rows, targets (M,); the sum of w_row * -log p(target) / (kept rows if per_token else
        batch), with the ``excluded`` columns' scores -inf; with ``smoothing`` eps, -log p(target) is
        (1 - eps) -log p(target) + eps mean over the allowed words of -log p(v)."""
        need_dh, need_dW, need_db = ctx.needs_input_grad[:3]
        need_grad = need_dh or need_dW or need_db
        V = weight.shape[0]
        allowed = V - (0 if excluded is None else excluded.numel())
        rows = (targets != ignore_index).nonzero().squeeze(1)  # only kept positions are projected at all
        h_kept, t_kept = h.index_select(0, rows), targets.index_select(0, rows)
        w_kept = None if row_weights is None else row_weights.index_select(0, rows).to(h.dtype).unsqueeze(1)
        K = rows.shape[0]
        denom = float(max(K, 1)) if per_token else float(batch)
        chunk = max(1, min(K, _CHUNK_ELEMENTS // V))
        total = h.new_zeros(())
        dh_kept = torch.empty_like(h_kept) if need_dh else None
        dW = torch.zeros_like(weight) if need_dW else None
        db = torch.zeros_like(bias) if need_db else None
        for start in range(0, K, chunk):
            hc, tc = h_kept[start : start + chunk], t_kept[start : start + chunk]
            s = gemm.linear(hc, weight, bias)
            if smoothing:  # the sum of the allowed words' scores, before the excluded ones become -inf
                score_sum = s.sum(dim=1, keepdim=True)
                if excluded is not None:
                    score_sum -= s.index_select(1, excluded).sum(dim=1, keepdim=True)
            if excluded is not None:
                s.index_fill_(1, excluded, float("-inf"))
            target_scores = s.gather(1, tc.unsqueeze(1))
            m = s.amax(dim=1, keepdim=True)
            sumexp = s.sub_(m).exp_().sum(dim=1, keepdim=True)
            # -log p(target) = log sum exp(s) - s_target
            log_norm = m + sumexp.log()
            nll = log_norm - target_scores
            if smoothing:
                nll = (1.0 - smoothing) * nll + smoothing * (log_norm - score_sum / allowed)
            wc = None if w_kept is None else w_kept[start : start + chunk]
            total += (nll if wc is None else nll * wc).sum()
            if not need_grad:
                continue
            # d loss / d scores = w (softmax - target distribution) / denominator, made in place from exp(s - m)
            scale = sumexp.reciprocal_().mul_(1.0 / denom)
            s.mul_(scale if wc is None else scale.mul_(wc))
            step = torch.full_like(target_scores, 1.0 / denom) if wc is None else wc / denom
            s.scatter_add_(1, tc.unsqueeze(1), -(1.0 - smoothing) * step)
            if smoothing:
                s.sub_(step * (smoothing / allowed))
                if excluded is not None:  # an excluded word is not in the target distribution either
                    s.index_fill_(1, excluded, 0.0)
            if need_dh:
                dh_kept[start : start + chunk] = gemm.mm(s, weight)
            if need_dW:
                dW += gemm.mm(s.t(), hc)
            if need_db:
                db += s.sum(dim=0)
        dh = None
        if need_dh:
            dh = torch.zeros_like(h).index_copy_(0, rows, dh_kept)
        ctx.save_for_backward(*(t for t in (dh, dW, db) if t is not None))
        ctx.has = (need_dh, need_dW, need_db)
        return total / denom

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple:
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if has else None for has in ctx.has]
        return (*grads, None, None, None, None, None, None, None)


def linear_temporal_softmax_loss(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    targets: Tensor,
    ignore_index: int = 0,
    normalize: str = "batch",
    weights: Tensor | None = None,
    excluded: Sequence[int] = (),
    label_smoothing: float = 0.0,
) -> Tensor:
    """``temporal_softmax_loss(h @ weight.T + bias, targets, ignore_index, normalize, weights, excluded,
    label_smoothing)`` without the scores.

    h (N, T, H), weight (V, H), bias (V,) (an ``nn.Linear(H, V)``'s parameters), targets (N, T) -> scalar
    loss, differentiable in h, weight and bias (not twice). Positions whose target is ``ignore_index`` are
    never projected. Under autocast, or for dtypes other than float32/float64, it computes the unfused
    form with autograd instead (the softmax of the fused form runs in the input dtype).
    """
    if h.dim() != 3 or targets.shape != h.shape[:2] or weight.dim() != 2 or weight.shape[1] != h.shape[2]:
        raise ValueError(
            f"linear_temporal_softmax_loss expects h (N, T, H), targets (N, T), weight (V, H); got h "
            f"{tuple(h.shape)}, targets {tuple(targets.shape)}, weight {tuple(weight.shape)}."
        )
    if normalize not in ("batch", "tokens"):
        raise ValueError(f"normalize must be 'batch' or 'tokens', got {normalize!r}.")
    _check_smoothing(label_smoothing)
    fusable = (
        h.dtype in (torch.float32, torch.float64)
        and weight.dtype == h.dtype == bias.dtype
        and not torch.is_autocast_enabled(h.device.type)
    )
    if not fusable:
        return temporal_softmax_loss(F.linear(h, weight, bias), targets, ignore_index, normalize, weights, excluded,
                                     label_smoothing)
    N, T, H = h.shape
    row_weights = None if weights is None else _check_weights(weights, N).repeat_interleave(T)
    excluded_ids = torch.as_tensor(list(excluded), dtype=torch.long, device=h.device) if excluded else None
    return _LinearSoftmaxLossFunction.apply(
        h.reshape(N * T, H), weight, bias, targets.reshape(N * T), ignore_index, normalize == "tokens", N,
        row_weights, excluded_ids, float(label_smoothing),
    )
