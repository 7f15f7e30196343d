"""Caption metrics: BLEU-1..4 (torchmetrics), CIDEr-D, the official COCO evaluation, and a DDP collector.

Two ways to score captions live here:

- Fast, pure Python/NumPy, no Java (validation every epoch): :func:`tokenize`, :func:`corpus_bleu`,
  :class:`CiderD` and :class:`CaptionScorer`. On the same tokenised captions they give the numbers of
  pycocoevalcap's ``Bleu(4)`` and ``Cider`` (which *is* CIDEr-D): the targets are 1e-4 and 1e-3, the tests
  find agreement to 1e-12 and 1e-9.
- Paper-comparable (``src/eval.py``): :func:`coco_caption_eval`, the official pycocoevalcap pipeline
  (Stanford PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr, optional SPICE), which runs Java.

:class:`DecodedCaptions` gathers decoded token ids from every DDP process and deduplicates them by
image id, so metrics under DDP equal those of one process.

Metrics score strings: this module never imports ``captioning.models`` or ``captioning.data``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.functional.text.bleu import _bleu_score_update
from torchmetrics.utilities.data import dim_zero_cat

# ---------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------

# With `-lowerCase`, PTBTokenizer writes brackets as "-lrb-" etc.; pycocoevalcap only removes the upper-case
# spellings, so the official pipeline keeps these tokens. We keep them too, to give the same n-grams.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = frozenset({"'s", "'m", "'d", "'ll", "'re", "'ve", "n't"})
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"], "gotta": ["got", "ta"]}
# Abbreviations whose final period PTBTokenizer keeps (besides letter-period runs such as "u.s." or "p.m.").
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. st. jr. sr. vs. etc. co. inc. no. mt. ltd. corp. bros. gen. gov. rev. sen. rep. "
    "jan. feb. mar. apr. aug. sep. sept. oct. nov. dec. ave. blvd. rd. ft. prof. capt. col. lt. sgt.".split()
)
_KEEP_TOKENS = frozenset(_BRACKETS.values()) | _CLITICS
_ACRONYM = re.compile(r"^(?:[^\W\d_]\.)+$")
_BRACKET_RE = re.compile(r"[()\[\]{}]")
_QUOTES_RE = re.compile(r'["`]')
_SYMBOLS_RE = re.compile(r"([+=*~^|\\%]|[#$](?=\d))")
_COMMA_COLON_RE = re.compile(r"(?<!\d)[,:]|[,:](?!\d)|;")
_NT_RE = re.compile(r"(?<=\w)(n't)\b")
_CLITIC_RE = re.compile(r"(?<=\w)('s|'m|'d|'ll|'re|'ve)\b")
_PUNCT_ONLY_RE = re.compile(r"^(?:[.'`\-]+|[?!])$")
_LEADING_CLITIC_RE = re.compile(r"^(?:'s|'m|'d|'ll|'re|'ve)(?!\w)")
_TRAILING_EXCLAIM_RE = re.compile(r"^(.*?\w.*?)([?!]+)$")
_NEEDS_REWRITE_RE = re.compile(r"[()\[\]{}\"`+=*~^|\\%#$,:;']")  # most captions hold none of these


def tokenize(caption: str) -> list[str]:
    """Lower-case and split ``caption`` the way pycocoevalcap's ``PTBTokenizer`` + punctuation removal does.

    A fast, Java-free approximation of the official tokenisation, for validation: brackets become
    ``-lrb-``/``-rrb-``..., clitics are split (``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``), the
    punctuation tokens pycocoevalcap removes (``. , ; : ? ! - -- ... ' '' ` ``) are dropped, while numbers
    (``3.5``, ``1,000``, ``5:30``), hyphenated words and abbreviations (``u.s.``, ``mr.``, ``etc.``) stay one
    token. It agrees with the Java tokenizer on ordinary captions (tests check a list against it); rare
    symbols may differ, so paper numbers come from :func:`coco_caption_eval`. Idempotent on its output.
    """
    if not isinstance(caption, str):
        raise TypeError(f"tokenize expects a caption string, got {type(caption).__name__}: {caption!r}")
    text = caption.lower()
    if _NEEDS_REWRITE_RE.search(text):
        text = _BRACKET_RE.sub(lambda m: f" {_BRACKETS[m.group()]} ", text)
        text = _QUOTES_RE.sub(" ", text)
        text = _SYMBOLS_RE.sub(r" \1 ", text)
        text = _COMMA_COLON_RE.sub(" ", text)
        text = _NT_RE.sub(r" \1", text)
        text = _CLITIC_RE.sub(r" \1", text)
    tokens: list[str] = []
    for word in text.split():
        if word.isalnum() and word not in _SPLIT_WORDS:
            tokens.append(word)
        else:
            tokens.extend(_clean_token(word))
    return tokens


def _clean_token(word: str) -> list[str]:
    """Strip the punctuation PTBTokenizer splits off one whitespace-delimited word (and pycocoevalcap drops)."""
    if word in _KEEP_TOKENS:
        return [word]
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    if _PUNCT_ONLY_RE.match(word):
        return []
    tail: list[str] = []
    while True:
        before = word
        # a leading quote or dash is punctuation unless it starts a clitic or a year ("'90s")
        if word.startswith("'") and not _LEADING_CLITIC_RE.match(word) and not word[1:2].isdigit():
            word = word[1:]
        word = word.lstrip("-")
        if word.endswith("'") and word not in _CLITICS:
            word = word[:-1]
        word = word.rstrip("-")
        match = _TRAILING_EXCLAIM_RE.match(word)
        if match:
            word, marks = match.groups()
            if len(marks) > 1:  # "!!" and "?!" are not in pycocoevalcap's punctuation list
                tail.insert(0, marks)
        if word.endswith("."):
            stem = word.rstrip(".")
            # "..." is an ellipsis token of its own; "u.s.." is "u.s." plus a sentence-final period
            if stem and len(word) - len(stem) < 3 and (_ACRONYM.match(stem + ".") or (stem + ".") in _ABBREVIATIONS):
                word = stem + "."
                break
            word = stem
        if word == before:
            break
    if not word or _PUNCT_ONLY_RE.match(word):
        return tail
    return [word, *tail]


# ---------------------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Validation scorer
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Official COCO caption evaluation (Java)
# ---------------------------------------------------------------------------------------------------------

_SPICE_CORENLP = "stanford-corenlp-3.6.0"
_SPICE_ZIP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "The official COCO caption evaluation runs Stanford's PTB tokenizer and METEOR in Java, but no "
            "`java` is on PATH. Install a Java runtime (e.g. `apt-get install openjdk-17-jre-headless`), or "
            "use the Java-free CaptionScorer (BLEU + CIDEr-D) instead."
        )


def _require_spice_models() -> None:
    """SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first use; fail fast offline."""
    import pycocoevalcap.spice as spice_pkg

    lib = os.path.join(os.path.dirname(os.path.abspath(spice_pkg.__file__)), "lib")
    needed = [os.path.join(lib, f"{_SPICE_CORENLP}{suffix}.jar") for suffix in ("", "-models")]
    missing = [path for path in needed if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use, and it is not "
            f"installed: missing {', '.join(missing)}. On a machine with internet, download {_SPICE_ZIP_URL}, "
            f"and copy {_SPICE_CORENLP}.jar and {_SPICE_CORENLP}-models.jar from it into {lib}/ "
            "(or run `python -m pycocoevalcap.spice.get_stanford_models` there). SPICE also needs ~8 GB of "
            "Java heap. Or evaluate without SPICE (spice=False)."
        )


def _one_line(caption: str) -> str:
    # PTBTokenizer is fed one caption per line; any line break inside a caption would shift all later ones
    return " ".join(caption.split())


def coco_caption_eval_detailed(
    predictions: dict[int, str],
    references: dict[int, list[str]],
    spice: bool = False,
    meteor: bool = True,
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """The official COCO caption evaluation, corpus and per image.

    pycocoevalcap's PTBTokenizer (Java) on predictions and references, then Bleu(4), Meteor (Java, when
    ``meteor``), Rouge, Cider and, when ``spice``, Spice, over the predicted image ids (each must have
    references). As in pycocoevalcap, CIDEr's document frequencies come from those images' references.

    Returns ({"bleu1".."bleu4", "meteor", "rouge_l", "cider"[, "spice"]}, {image_id: same keys}).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = _check_references(references)
    _check_predictions(predictions, refs, "coco_caption_eval")
    _require_java()
    if spice:
        _require_spice_models()
    image_ids = sorted(predictions)
    tokenizer = PTBTokenizer()
    try:
        gts = tokenizer.tokenize({i: [{"caption": _one_line(c)} for c in refs[i]] for i in image_ids})
        res = tokenizer.tokenize({i: [{"caption": _one_line(predictions[i])}] for i in image_ids})
    except OSError as error:
        raise RuntimeError(
            f"pycocoevalcap's PTBTokenizer failed ({error}); it writes a temporary file next to its jar, so "
            "the pycocoevalcap/tokenizer folder of the installed package must be writable."
        ) from error
    # an empty caption may come back as a missing line; it scores as the empty caption
    res = {i: res.get(i, [""]) for i in image_ids}
    gts = {i: gts.get(i, [""]) for i in image_ids}

    corpus: dict[str, float] = {}
    per_image: dict[int, dict[str, float]] = {i: {} for i in image_ids}

    def record(name: str, score: float, scores: Sequence[float]) -> None:
        corpus[name] = float(score)
        for image_id, value in zip(image_ids, scores, strict=True):
            per_image[image_id][name] = float(value)

    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        record(f"bleu{k + 1}", bleu[k], bleu_per_image[k])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            record("meteor", *scorer.compute_score(gts, res))
        finally:
            del scorer  # its __del__ stops the Java process now rather than at interpreter exit
    record("rouge_l", *Rouge().compute_score(gts, res))
    record("cider", *Cider().compute_score(gts, res))
    if spice:
        from pycocoevalcap.spice.spice import Spice

        try:
            score, scores = Spice().compute_score(gts, res)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(
                f"SPICE's Java process failed (exit code {error.returncode}); SPICE 1.0 needs ~8 GB of heap "
                "and was written for Java 8 — see its output above. Evaluate with spice=False to skip it."
            ) from error
        record("spice", score, [s["All"]["f"] for s in scores])
    return corpus, per_image


def coco_caption_eval(
    predictions: dict[int, str],
    references: dict[int, list[str]],
    spice: bool = False,
    meteor: bool = True,
) -> dict[str, float]:
    """Corpus scores of the official COCO caption evaluation; see :func:`coco_caption_eval_detailed`."""
    return coco_caption_eval_detailed(predictions, references, spice=spice, meteor=meteor)[0]


# ---------------------------------------------------------------------------------------------------------
# Distributed collection of decoded captions
# ---------------------------------------------------------------------------------------------------------


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

    def __init__(self, max_length: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"DecodedCaptions: max_length must be a positive integer, got {max_length!r}.")
        self.max_length = max_length
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("tokens", default=[], dist_reduce_fx="cat")

    def update(self, image_ids: torch.Tensor, tokens: torch.Tensor) -> None:
        """image_ids: (N,) integer ids; tokens: (N, L) token ids, L <= max_length, padded with 0."""
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
        return {
            int(i): tokens[k, : int(length)].clone()
            for i, k, length in zip(image_ids[keep].tolist(), keep.tolist(), lengths.tolist(), strict=True)
        }
