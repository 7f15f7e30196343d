"""The validation scorer: BLEU-1..4 and CIDEr-D of one split's captions, references prepared once."""

from __future__ import annotations

import numpy as np

from .bleu import _coco_bleu, _coco_bleu_rows, corpus_bleu
from .cider import CiderD, _check_predictions
from .tokens import tokenize


class CaptionScorer:
    """BLEU-1..4 and CIDEr-D of predicted captions against one split's references, for every validation.

    The references are tokenised once and their n-gram statistics computed once (CIDEr-D document
    frequencies and tf-idf vectors; BLEU's per-image maximum n-gram counts and reference lengths); a call
    counts the hypotheses' n-grams once, for both metrics, with NumPy. The BLEU statistics are those of
    torchmetrics' BLEU update (matches clipped by the maximum count over an image's references, closest
    reference length) finished with the COCO formula, like :func:`corpus_bleu`, only vectorised; tests
    check that both, and pycocoevalcap, agree.

    references: {image_id: [caption, ...]} of the split.
    bleu: ``"torchmetrics"`` (default) scores BLEU with :func:`corpus_bleu` (torchmetrics' n-gram
        statistics); ``"numpy"`` uses the vectorised statistics shared with CIDEr-D — the same numbers to
        1e-12, about 10x faster on 5,000 images (see benchmarks/bench_metrics.py).
    """

    BLEU_ORDERS = 4
    BLEU_BACKENDS = ("torchmetrics", "numpy")

    def __init__(self, references: dict[int, list[str]], bleu: str = "torchmetrics") -> None:
        if bleu not in self.BLEU_BACKENDS:
            raise ValueError(f"CaptionScorer: bleu={bleu!r} is not one of {', '.join(self.BLEU_BACKENDS)}.")
        self.bleu_backend = bleu
        self.references = references
        self.cider = CiderD(references, n=self.BLEU_ORDERS)
        ngrams, size = self.cider.ngrams, self.cider.ngrams.size
        counts = ngrams.references
        # per (image, n-gram): the largest count in any one reference, which clips the hypothesis' count
        key = self.cider._ref_image[counts.caption] * size + counts.gid
        sort = np.argsort(key, kind="stable")
        key, count = key[sort], counts.count[sort]
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, dtype=np.int64)
        self._clip_key = key[first]
        self._clip_count = np.maximum.reduceat(count, first) if len(first) else count
        self._ref_lengths = counts.lengths  # (R,)

    def constant_bleu(self, captions: list[str], image_ids: list[int]) -> np.ndarray:
        """BLEU-1..4 (C, 4) of each of ``captions`` given as the caption of every image in ``image_ids``: the blind
        baseline's search, all candidates at once. Equal to ``self({i: caption for i in image_ids})`` with the
        NumPy BLEU, caption by caption (tested), without scoring the images once per candidate.

        A caption with an n-gram g c times matches sum_i min(c, m_i(g)) = sum_{k <= c} #{images i: m_i(g) >= k}
        times, m_i(g) the most any one reference of image i holds it: a table per n-gram of the candidates.
        """
        n, size = self.BLEU_ORDERS, self.cider.ngrams.size
        rows = self.cider.rows(list(image_ids))
        M = len(rows)
        counts = self.cider.ngrams.count([tokenize(c) for c in captions])
        known = np.flatnonzero(counts.gid < size)
        grams, entry_gram = np.unique(counts.gid[known], return_inverse=True)
        depth = int(counts.count.max(initial=1))
        # at_least[g, k - 1]: images among ``rows`` whose references hold n-gram g at least k times
        scored = np.zeros(len(self.cider._row), dtype=bool)
        scored[rows] = True
        clip_image, clip_gid = self._clip_key // size, self._clip_key % size
        position = np.minimum(np.searchsorted(grams, clip_gid), max(len(grams) - 1, 0))
        wanted = scored[clip_image] & (grams[position] == clip_gid) if len(grams) else np.zeros(0, dtype=bool)
        at_least = np.zeros((len(grams), depth))
        for k in range(1, depth + 1):
            hits = wanted & (self._clip_count >= k)
            at_least[:, k - 1] = np.bincount(position[hits], minlength=len(grams))
        clipped = np.cumsum(at_least, axis=1)  # clipped[g, c - 1]: the matches of a caption holding g c times
        matched = np.zeros(len(counts.gid))
        matched[known] = clipped[entry_gram, counts.count[known].astype(np.int64) - 1]
        C = len(captions)
        correct = np.bincount(counts.caption * n + counts.order, weights=matched, minlength=C * n).reshape(C, n)
        lengths = counts.lengths.astype(np.float64)
        guess = M * np.maximum(lengths[:, None] - np.arange(n), 0)
        # the closest reference length of every image to each distinct caption length (ties -> the shorter)
        ref_rows = np.flatnonzero(scored[self.cider._ref_image])
        ref_image, ref_lengths = self.cider._ref_image[ref_rows], self._ref_lengths[ref_rows]
        ref_len = np.zeros(C)
        for length in np.unique(counts.lengths):
            scale = int(max(ref_lengths.max(initial=0), length)) + 1
            best = np.full(len(self.cider._row), np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(best, ref_image, np.abs(ref_lengths - length) * scale + ref_lengths)
            ref_len[counts.lengths == length] = float((best[rows] % scale).sum())
        return _coco_bleu_rows(correct, guess, M * lengths, ref_len)

    def __call__(self, predictions: dict[int, str]) -> dict[str, float]:
        """{"bleu1", ..., "bleu4", "cider"} over the predicted images ({image_id: caption})."""
        _check_predictions(predictions, self.cider._row, "CaptionScorer")
        n, size = self.BLEU_ORDERS, self.cider.ngrams.size
        image_ids = list(predictions)
        rows = self.cider.rows(image_ids)
        counts = self.cider.ngrams.count([tokenize(predictions[i]) for i in image_ids])
        cider = float(self.cider._score_counts(rows, counts).mean())
        if self.bleu_backend == "torchmetrics":
            bleu = corpus_bleu([predictions[i] for i in image_ids], [self.references[i] for i in image_ids], n)
            return {**{f"bleu{k + 1}": float(b) for k, b in enumerate(bleu)}, "cider": cider}

        known = counts.gid < size
        key = rows[counts.caption[known]] * size + counts.gid[known]
        pos = np.minimum(np.searchsorted(self._clip_key, key), len(self._clip_key) - 1)
        found = self._clip_key[pos] == key
        clipped = np.minimum(counts.count[known][found], self._clip_count[pos[found]])
        correct = np.bincount(counts.order[known][found], weights=clipped, minlength=n)
        lengths = counts.lengths
        guess = [float(np.maximum(lengths - k, 0).sum()) for k in range(n)]

        # closest reference length per image, ties -> the shorter: minimise (|difference|, length)
        hyp_of_row = np.full(len(self.cider._row), -1, dtype=np.int64)
        hyp_of_row[rows] = np.arange(len(rows))
        ref_hyp = hyp_of_row[self.cider._ref_image]
        scored = np.flatnonzero(ref_hyp >= 0)
        ref_lengths = self._ref_lengths[scored]
        hyp = ref_hyp[scored]
        scale = int(max(ref_lengths.max(initial=0), lengths.max(initial=0))) + 1
        closeness = np.abs(ref_lengths - lengths[hyp]) * scale + ref_lengths
        best = np.full(len(rows), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, hyp, closeness)

        bleu = _coco_bleu(correct.tolist(), guess, float(lengths.sum()), float((best % scale).sum()))
        scores = {f"bleu{k + 1}": float(b) for k, b in enumerate(bleu)}
        scores["cider"] = cider
        return scores
