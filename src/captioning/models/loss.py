"""The masked temporal softmax loss of the courses."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["temporal_softmax_loss"]


def temporal_softmax_loss(
    scores: Tensor, targets: Tensor, ignore_index: int = 0, normalize: str = "batch"
) -> Tensor:
    """Cross-entropy summed over all time steps whose target is not ``ignore_index``.

    scores (N, T, V) unnormalised, targets (N, T) word ids -> scalar loss.

    ``normalize="batch"`` (the default, the courses' convention) divides the sum by N, so the number is
    the per-caption loss and compares with the courses'; ``normalize="tokens"`` divides by the number of
    kept tokens instead (the per-token loss, independent of caption length).
    """
    if scores.dim() != 3 or targets.shape != scores.shape[:2]:
        raise ValueError(
            f"temporal_softmax_loss expects scores (N, T, V) and targets (N, T); got scores "
            f"{tuple(scores.shape)} and targets {tuple(targets.shape)}."
        )
    if normalize not in ("batch", "tokens"):
        raise ValueError(f"normalize must be 'batch' or 'tokens', got {normalize!r}.")
    if scores.dtype in (torch.float16, torch.bfloat16):
        # Mixed precision: score in float32, as a sum over N*T tokens in bf16 (8-bit mantissa) loses the
        # loss's digits; autograd casts the gradient back to the scores' dtype.
        scores = scores.float()
    mask = targets != ignore_index
    # -log p(target) = logsumexp(scores) - score[target]; computed in a numerically stable form.
    log_norm = torch.logsumexp(scores, dim=-1)
    target_scores = scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = (log_norm - target_scores).masked_fill(~mask, 0.0)
    denominator = scores.shape[0] if normalize == "batch" else mask.sum().clamp(min=1)
    return nll.sum() / denominator
