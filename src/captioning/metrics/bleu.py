"""BLEU-1..4 as the COCO evaluation computes it, from torchmetrics' n-gram statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.text.bleu import _bleu_score_update

from .tokens import tokenize

# pycocoevalcap's BleuScorer adds these to every ratio, so an n-gram order with no match scores ~0, not 0.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def _coco_bleu(correct: Sequence[float], guess: Sequence[float], hyp_len: float, ref_len: float) -> list[float]:
    """BLEU-1..n from corpus statistics, exactly as pycocoevalcap's ``BleuScorer.compute_score``.

    correct/guess: clipped matches and hypothesis n-gram counts per order; ref_len: the sum over images of
    the reference length closest to the hypothesis length (ties -> the shorter reference).
    """
    scores, product = [], 1.0
    for k, (matched, total) in enumerate(zip(correct, guess, strict=True)):
        product *= (float(matched) + _BLEU_TINY) / (float(total) + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        brevity = math.exp(1 - 1 / ratio)
        scores = [s * brevity for s in scores]
    return scores


def _coco_bleu_rows(correct: np.ndarray, guess: np.ndarray, hyp_len: np.ndarray, ref_len: np.ndarray) -> np.ndarray:
    """:func:`_coco_bleu` for C sets of statistics at once: correct, guess (C, n); hyp_len, ref_len (C,) -> (C, n)."""
    ratios = (correct + _BLEU_TINY) / (guess + _BLEU_SMALL)
    scores = np.cumprod(ratios, axis=1) ** (1.0 / np.arange(1, correct.shape[1] + 1))
    ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return scores * brevity[:, None]


def corpus_bleu(hypotheses: list[str], references: list[list[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n with several references per hypothesis, as pycocoevalcap's ``Bleu(max_n)``.

    Captions are tokenised with :func:`tokenize` and joined by spaces. The n-gram statistics (clipped
    matches, hypothesis n-grams, lengths) come from torchmetrics' BLEU update; two details of the final
    formula differ from COCO's and are corrected here:

    - closest reference length: torchmetrics takes the first of equally close references, COCO the
      shorter one. Each image's references are sorted by length (stable) before torchmetrics sees them, so
      its "first" is COCO's "shorter"; clipping (max over references) does not depend on the order.
    - the score: torchmetrics returns 0 when any order has no match and uses ``preds_len > target_len`` for
      the brevity penalty; COCO adds tiny/small epsilons to every ratio. The score is therefore computed from
      torchmetrics' statistics by :func:`_coco_bleu`, the COCO formula.

    hypotheses: (M,) captions; references: (M,) lists of at least one caption. Returns [BLEU-1, ..., BLEU-n].
    """
    if not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"corpus_bleu: max_n must be a positive integer, got {max_n!r}.")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} reference lists; "
            "pass one list of reference captions per hypothesis, in the same order."
        )
    if not hypotheses:
        raise ValueError("corpus_bleu: no hypotheses to score; pass at least one caption.")
    preds = [" ".join(tokenize(h)) for h in hypotheses]
    target = []
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"corpus_bleu: references[{i}] must be a non-empty list of caption strings, got {refs!r}."
            )
        tokenised = [tokenize(r) for r in refs]
        target.append([" ".join(t) for t in sorted(tokenised, key=len)])
    correct = torch.zeros(max_n, dtype=torch.float64)
    guess = torch.zeros(max_n, dtype=torch.float64)
    hyp_len, ref_len = _bleu_score_update(
        preds,
        target,
        correct,
        guess,
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(0.0, dtype=torch.float64),
        max_n,
    )
    return _coco_bleu(correct.tolist(), guess.tolist(), float(hyp_len), float(ref_len))
