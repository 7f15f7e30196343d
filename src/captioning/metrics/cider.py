"""CIDEr-D (pycocoevalcap's ``Cider``), vectorised with NumPy; the n-gram table BLEU's fast path shares."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np

from .tokens import tokenize


def _check_references(references: Mapping[int, Sequence[str]] | Sequence[Sequence[str]]) -> dict[int, list[str]]:
    """references as {image_id: [caption, ...]}, validated; a list is keyed by position."""
    if isinstance(references, Mapping):
        items = list(references.items())
    elif isinstance(references, Sequence) and not isinstance(references, str):
        items = list(enumerate(references))
    else:
        raise TypeError(
            f"references must be a dict image_id -> list of captions or a list of caption lists, "
            f"got {type(references).__name__}."
        )
    if not items:
        raise ValueError("references is empty: pass the reference captions of at least one image.")
    checked: dict[int, list[str]] = {}
    for image_id, captions in items:
        if isinstance(captions, str) or not isinstance(captions, Sequence) or len(captions) == 0:
            raise ValueError(
                f"references[{image_id!r}] must be a non-empty list of caption strings, got {captions!r}."
            )
        for caption in captions:
            if not isinstance(caption, str):
                raise ValueError(f"references[{image_id!r}] holds a non-string caption: {caption!r}.")
        checked[image_id] = list(captions)
    return checked


def _check_predictions(predictions: Mapping[int, str], known: Mapping[int, object], where: str) -> None:
    if not isinstance(predictions, Mapping):
        raise TypeError(f"{where}: predictions must be a dict image_id -> caption, got {type(predictions).__name__}.")
    if not predictions:
        raise ValueError(f"{where}: no predictions to score; pass at least one image_id -> caption.")
    missing = [i for i in predictions if i not in known]
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} predicted image ids have no reference captions (e.g. {missing[:5]}); "
            "score predictions of the same split the references come from."
        )
    bad = [(i, c) for i, c in predictions.items() if not isinstance(c, str)]
    if bad:
        raise ValueError(f"{where}: predictions must be caption strings; image {bad[0][0]} has {bad[0][1]!r}.")


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: for int64 keys NumPy 2.3+'s default hash-based unique is several times slower."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


class _NgramCounts(NamedTuple):
    """Term frequencies of the n-grams of C captions: one entry per (caption, distinct n-gram)."""

    caption: np.ndarray  # (E,) caption index
    gid: np.ndarray  # (E,) n-gram id; ids >= _NgramTable.size are n-grams absent from the references
    order: np.ndarray  # (E,) n-gram order - 1
    count: np.ndarray  # (E,) float64 term frequency
    lengths: np.ndarray  # (C,) tokens per caption


class _NgramTable:
    """Integer ids for the n-grams (orders 1..n) of reference captions; counts the n-grams of any captions.

    Words get integer ids; an order-k n-gram is the pair (id of its first k-1 words, id of its last word),
    made compact per order with ``np.unique``. No Python runs per n-gram, only per word (a dict look-up).
    """

    def __init__(self, references: list[list[str]], n: int) -> None:
        self.n = n
        self.vocab: dict[str, int] = {}
        for tokens in references:
            for word in tokens:
                self.vocab.setdefault(word, len(self.vocab))
        self._keys: list[np.ndarray] = []  # per order k >= 2: sorted keys (prefix id * V + last word id)
        self._offsets: list[int] = []  # per order: the global id of its first n-gram
        self.size = 0  # distinct n-grams in the references
        self.references = self.count(references, build=True)

    def count(self, captions: list[list[str]], build: bool = False) -> _NgramCounts:
        """n-gram term frequencies of tokenised ``captions``."""
        n, vocab_size = self.n, len(self.vocab)
        lengths = np.fromiter(map(len, captions), dtype=np.int64, count=len(captions))
        flat = list(chain.from_iterable(captions))
        get = self.vocab.get
        words = np.fromiter((get(w, -1) for w in flat), dtype=np.int64, count=len(flat))
        unknown = np.flatnonzero(words < 0)
        if len(unknown):  # words absent from the references: ids >= V, one per distinct word
            _, inverse = np.unique(np.asarray([flat[i] for i in unknown]), return_inverse=True)
            words[unknown] = vocab_size + inverse
        base = int(words.max()) + 1 if len(words) else 1
        caption = np.repeat(np.arange(len(captions), dtype=np.int64), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        room = np.repeat(lengths, lengths) - (np.arange(len(words)) - starts)  # words left from here on

        entry_caption, entry_gid, entry_order = [], [], []
        local, seen = words, words < vocab_size  # per-order ids of the n-gram starting at each word
        num_seen, unseen_total = vocab_size, 0
        for k in range(1, n + 1):
            valid = room >= k
            if k > 1:
                last = words[np.minimum(np.arange(len(words)) + k - 1, max(len(words) - 1, 0))]
                prefix, prefix_seen = local, seen
                key = prefix * vocab_size + last
                if build:
                    self._keys.append(_sorted_unique(key[valid]))
                table = self._keys[k - 2]
                num_seen = len(table)
                index = np.minimum(np.searchsorted(table, key), max(num_seen - 1, 0))
                seen = valid & prefix_seen & (last < vocab_size)
                seen = seen & (table[index] == key) if num_seen else np.zeros_like(seen)
                local = np.where(seen, index, 0)
                unseen = valid & ~seen
                if unseen.any():  # one id per distinct unseen n-gram, after the seen ones
                    _, inverse = np.unique(prefix[unseen] * base + last[unseen], return_inverse=True)
                    local[unseen] = num_seen + inverse
            if build:
                self._offsets.append(self.size)
                self.size += num_seen
            unseen = valid & ~seen
            # (in build mode every reference n-gram is seen, so self.size is only read once it is final)
            gid = np.where(seen, self._offsets[k - 1] + local, self.size + unseen_total + local - num_seen)
            unseen_total += int(local[unseen].max()) - num_seen + 1 if unseen.any() else 0
            entry_caption.append(caption[valid])
            entry_gid.append(gid[valid])
            entry_order.append(np.full(int(valid.sum()), k - 1, dtype=np.int64))
        span = max(self.size + unseen_total, 1)
        order = np.concatenate(entry_order)
        key, count = np.unique(
            (np.concatenate(entry_caption) * n + order) * span + np.concatenate(entry_gid), return_counts=True
        )
        return _NgramCounts(
            caption=key // span // n,
            gid=key % span,
            order=(key // span) % n,
            count=count.astype(np.float64),
            lengths=lengths,
        )


class CiderD:
    """CIDEr-D, the metric pycocoevalcap's ``Cider`` computes, vectorised with NumPy.

    For each image, the hypothesis and every reference become tf-idf vectors over n-grams of each order
    1..n (term frequency x (log #images - log df), df = number of images whose references contain the
    n-gram). Per order: sum over the hypothesis n-grams of min(w_hyp, w_ref) * w_ref (clipped counts),
    divided by both norms, times a Gaussian length penalty exp(-delta^2 / (2 sigma^2)); averaged over
    orders and references, x10. Like pycocoevalcap, "length" is the number of bigrams of a caption.

    Document frequencies come from all references given here, computed once. pycocoevalcap computes them
    from the references of the images being scored, so the two agree exactly when the whole split is scored
    (as validation does); scoring a subset keeps the split's statistics.

    references: {image_id: [caption, ...]} or a list of caption lists (keyed 0..M-1).
    """

    def __init__(
        self,
        references: dict[int, list[str]] | list[list[str]],
        n: int = 4,
        sigma: float = 6.0,
    ) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"CiderD: n must be a positive integer, got {n!r}.")
        if not sigma > 0:
            raise ValueError(f"CiderD: sigma must be positive, got {sigma!r}.")
        refs = _check_references(references)
        self.n = n
        self.sigma = float(sigma)
        #: {image_id: [tokens of each reference]}
        self.reference_tokens: dict[int, list[list[str]]] = {i: [tokenize(c) for c in caps] for i, caps in refs.items()}
        self._row = {image_id: row for row, image_id in enumerate(self.reference_tokens)}
        num_images = len(self._row)
        flat = [tokens for captions in self.reference_tokens.values() for tokens in captions]
        self.ngrams = _NgramTable(flat, n)
        size = self.ngrams.size
        self._ref_image = np.repeat(  # (R,) image row of each reference
            np.arange(num_images), [len(c) for c in self.reference_tokens.values()]
        )
        self._refs_per_image = np.bincount(self._ref_image, minlength=num_images).astype(np.float64)
        counts = self.ngrams.references
        entry_image = self._ref_image[counts.caption]

        # df: number of images whose references contain each n-gram (an image counts once)
        image_gid = _sorted_unique(entry_image * size + counts.gid)
        df = np.bincount(image_gid % size, minlength=size).astype(np.float64)
        self._log_num_images = math.log(float(num_images))
        self._idf = self._log_num_images - np.log(np.maximum(df, 1.0))  # (G,)

        num_refs = len(self._ref_image)
        weight = counts.count * self._idf[counts.gid]
        self._ref_norm = np.sqrt(
            np.bincount(counts.caption * n + counts.order, weights=weight**2, minlength=num_refs * n)
        ).reshape(num_refs, n)
        self._ref_bigrams = np.maximum(counts.lengths - 1, 0).astype(np.float64) if n >= 2 else np.zeros(num_refs)
        self._entry_ref, self._entry_order, self._entry_weight = counts.caption, counts.order, weight
        self._entry_key = entry_image * size + counts.gid  # joins a reference n-gram with the hypothesis'

    @property
    def image_ids(self) -> list[int]:
        """The image ids of the references, in the order given."""
        return list(self._row)

    def rows(self, image_ids: list[int]) -> np.ndarray:
        """(H,) positions of ``image_ids`` among the references."""
        return np.fromiter((self._row[i] for i in image_ids), dtype=np.int64, count=len(image_ids))

    def score(self, hypotheses: dict[int, str]) -> tuple[float, dict[int, float]]:
        """CIDEr-D of ``hypotheses`` ({image_id: caption}, a subset of the references' ids).

        Returns (mean over the images, {image_id: score}).
        """
        _check_predictions(hypotheses, self._row, "CiderD.score")
        image_ids = list(hypotheses)
        per_image = self.score_tokens(image_ids, [tokenize(hypotheses[i]) for i in image_ids])
        return float(per_image.mean()), dict(zip(image_ids, per_image.tolist(), strict=True))

    def score_tokens(self, image_ids: Sequence[int], hypotheses: list[list[str]]) -> np.ndarray:
        """CIDEr-D (H,) of already tokenised hypotheses, one per image id (distinct ids among the references')."""
        return self._score_counts(self.rows(list(image_ids)), self.ngrams.count(hypotheses))

    def _score_counts(self, rows: np.ndarray, counts: _NgramCounts) -> np.ndarray:
        """Per-image CIDEr-D (H,) of the hypotheses of image rows ``rows`` (H,), given their n-gram counts."""
        n, size = self.n, self.ngrams.size
        num_hyps = len(rows)
        known = counts.gid < size
        idf = np.full(len(counts.gid), self._log_num_images)  # n-grams no reference has: df = 0
        idf[known] = self._idf[counts.gid[known]]
        weight = counts.count * idf
        hyp_norm = np.sqrt(
            np.bincount(counts.caption * n + counts.order, weights=weight**2, minlength=num_hyps * n)
        ).reshape(num_hyps, n)
        hyp_bigrams = np.maximum(counts.lengths - 1, 0).astype(np.float64) if n >= 2 else np.zeros(num_hyps)

        # the references of the scored images, each linked to its hypothesis
        hyp_of_row = np.full(len(self._row), -1, dtype=np.int64)
        hyp_of_row[rows] = np.arange(num_hyps)
        ref_hyp = hyp_of_row[self._ref_image]  # (R,), -1 for images not scored
        scored = np.flatnonzero(ref_hyp[self._entry_ref] >= 0)

        # each reference n-gram meets the same n-gram of its image's hypothesis (a join on sorted keys)
        hyp_key = rows[counts.caption[known]] * size + counts.gid[known]
        sort = np.argsort(hyp_key)
        hyp_key, hyp_weight = hyp_key[sort], weight[known][sort]
        ref_key = self._entry_key[scored]
        pos = np.minimum(np.searchsorted(hyp_key, ref_key), max(len(hyp_key) - 1, 0))
        found = hyp_key[pos] == ref_key if len(hyp_key) else np.zeros(len(ref_key), dtype=bool)
        matched = scored[found]
        ref_weight = self._entry_weight[matched]
        clipped = np.minimum(hyp_weight[pos[found]], ref_weight) * ref_weight
        num_refs = len(self._ref_image)
        dot = np.bincount(
            self._entry_ref[matched] * n + self._entry_order[matched], weights=clipped, minlength=num_refs * n
        ).reshape(num_refs, n).astype(np.float64, copy=False)  # (bincount of nothing is int64)

        ref_ids = np.flatnonzero(ref_hyp >= 0)
        hyp_ids = ref_hyp[ref_ids]
        norms = hyp_norm[hyp_ids] * self._ref_norm[ref_ids]
        dot = dot[ref_ids]
        # pycocoevalcap leaves the dot product undivided when a norm is 0 (it is then 0 too)
        similarity = np.divide(dot, norms, out=dot.copy(), where=norms != 0)
        delta = hyp_bigrams[hyp_ids] - self._ref_bigrams[ref_ids]
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2))
        per_ref = similarity.mean(axis=1) * penalty
        total = np.bincount(hyp_ids, weights=per_ref, minlength=num_hyps)
        return total / self._refs_per_image[rows] * 10.0
