"""Decoded captions gathered from every DDP process, deduplicated by image id (torchmetrics state sync)."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


class DecodedCaptions(Metric):
    """Collects decoded captions (image id, token ids) on every process; ``compute`` gathers and deduplicates.

    Lightning's DistributedSampler pads a split with repeated images so every process gets as many; the
    repeats are dropped here (first occurrence kept), so metrics from the gathered captions equal those of
    one process. Token rows are padded with ``<NULL>`` (0) to ``max_length`` so the states of different
    batches and processes concatenate; ``compute`` strips that trailing padding again.

    Under DDP every process must have called ``update`` before ``compute`` (torchmetrics cannot gather an
    empty state next to filled ones); a DistributedSampler guarantees it for any non-empty split.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, max_length: int, n_best: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"DecodedCaptions: max_length must be a positive integer, got {max_length!r}.")
        self.max_length, self.n_best = max_length, int(n_best)
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("tokens", default=[], dist_reduce_fx="cat")
        if self.n_best > 1:  # the n-best lists, gathered and deduplicated like the captions
            self.add_state("nbest_tokens", default=[], dist_reduce_fx="cat")
            self.add_state("nbest_log_probs", default=[], dist_reduce_fx="cat")
        # {image_id: [(tokens (L,), log p), ...]} of the last compute (n_best > 1)
        self.last_nbest: dict[int, list[tuple[torch.Tensor, float]]] = {}

    def update(self, image_ids: torch.Tensor, tokens: torch.Tensor, nbest: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """image_ids: (N,) integer ids; tokens: (N, L) token ids, L <= max_length, padded with 0; with
        ``n_best`` > 1 also ``nbest`` = (captions (N, K, L), log-probabilities (N, K))."""
        image_ids = torch.as_tensor(image_ids)
        if image_ids.dim() != 1 or tokens.dim() != 2 or tokens.shape[0] != image_ids.shape[0]:
            raise ValueError(
                f"DecodedCaptions.update expects image_ids (N,) and tokens (N, L); got image_ids "
                f"{tuple(image_ids.shape)} and tokens {tuple(tokens.shape)}."
            )
        if image_ids.is_floating_point() or tokens.is_floating_point():
            raise ValueError(
                f"DecodedCaptions.update expects integer image ids and token ids, got {image_ids.dtype} "
                f"and {tokens.dtype}."
            )
        if tokens.shape[1] > self.max_length:
            raise ValueError(
                f"DecodedCaptions: captions of {tokens.shape[1]} tokens exceed max_length={self.max_length}; "
                "construct it with the decoder's maximum caption length."
            )
        padded = torch.nn.functional.pad(tokens.long(), (0, self.max_length - tokens.shape[1]), value=0)
        self.image_ids.append(image_ids.long())
        self.tokens.append(padded)
        if self.n_best > 1:
            if nbest is None or nbest[0].shape[:2] != (tokens.shape[0], self.n_best):
                raise ValueError(f"DecodedCaptions(n_best={self.n_best}).update needs the n-best lists (N, "
                                 f"{self.n_best}, L) of the {tokens.shape[0]} captions.")
            lists = torch.nn.functional.pad(nbest[0].long(), (0, self.max_length - nbest[0].shape[2]), value=0)
            self.nbest_tokens.append(lists.flatten(1))
            self.nbest_log_probs.append(nbest[1].float())

    def compute(self) -> dict[int, torch.Tensor]:
        """{image_id: LongTensor (L,)} on the CPU, ascending ids, trailing <NULL> padding removed."""
        if isinstance(self.image_ids, list) and len(self.image_ids) == 0:
            return {}
        image_ids = dim_zero_cat(self.image_ids).cpu()
        tokens = dim_zero_cat(self.tokens).cpu()
        if image_ids.numel() == 0:
            return {}
        # first occurrence of each id: a stable sort keeps the gathered (rank, batch) order among equals
        order = torch.sort(image_ids, stable=True).indices
        sorted_ids = image_ids[order]
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        keep = order[first]
        nonzero = tokens[keep] != 0
        # length = position of the last non-padding token + 1 (0 for an all-padding row)
        positions = torch.arange(1, tokens.shape[1] + 1)
        lengths = (nonzero * positions).amax(dim=1) if tokens.shape[1] else torch.zeros(len(keep), dtype=torch.long)
        if self.n_best > 1:
            lists = dim_zero_cat(self.nbest_tokens).cpu()[keep].view(len(keep), self.n_best, self.max_length)
            scores = dim_zero_cat(self.nbest_log_probs).cpu()[keep]
            ends = ((lists != 0) * positions).amax(dim=2)  # (M, K): each list entry's length
            self.last_nbest = {
                int(i): [(row[:end].clone(), lp) for row, end, lp in zip(rows, e.tolist(), lps.tolist(), strict=True)
                         if lp > float("-inf")]
                for i, rows, e, lps in zip(image_ids[keep].tolist(), lists, ends, scores, strict=True)
            }
        return {
            int(i): tokens[k, : int(length)].clone()
            for i, k, length in zip(image_ids[keep].tolist(), keep.tolist(), lengths.tolist(), strict=True)
        }
