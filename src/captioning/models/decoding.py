"""Caption decoders over a ``CaptioningRNN``: greedy, beam search (diverse or not) and sampling, all batched.

The one home of decoding: greedy decoding and sampling are the argmax and the draw of one step-by-step
loop (:func:`step_decode`), beam search keeps K hypotheses per image (in G groups kept apart by a diversity
penalty, Vijayakumar et al. 2016). Every strategy shares the same :class:`StepRules` (n-gram blocking, a
repetition penalty, no ``<END>`` after a bad ending word), and any ``model`` offering ``init_state`` / ``step``
decodes: a :class:`CaptioningRNN`, :class:`Guided` or an :class:`Ensemble`.

Each returns a ``Decoded``: captions (N, L) without ``<START>``, ending in ``<END>`` where the model ended them
and padded with ``<NULL>``; the sequence log-probabilities (N,) under the decoding distribution (the model's,
after the step rules, tempering and truncation); for the attention model the attention weights (N, L, h, w) of
every emitted word (else None); and, when asked for, the n-best list (:class:`NBest`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .captioner import CaptioningRNN, DecoderState

__all__ = [
    "BAD_ENDINGS", "CaptionDecoder", "Decoded", "Ensemble", "Guided", "NBest", "StepRules", "beam_search",
    "greedy_decode", "keyed_uniform", "length_normalized", "sample_decode", "step_decode",
]

STRATEGIES = ("greedy", "beam", "sample")
LENGTH_NORMS = ("power", "gnmt")
# Words a caption should not end on; captions trained on CIDEr-D learn to end on them ("a man riding a")
# because the n-grams they complete still score.
BAD_ENDINGS = ("a", "an", "the", "with", "and", "of", "on", "in", "to", "at", "its", "his", "her", "their",
               "for", "is", "are", "while", "from", "by", "near")


class NBest(NamedTuple):
    """The K best captions per image, best first: captions (N, K, L), log_probs (N, K) (-inf: no K-th caption,
    e.g. when diverse groups found the same one twice; its row is all ``<NULL>``)."""

    captions: Tensor
    log_probs: Tensor


class Decoded(NamedTuple):
    captions: Tensor
    log_probs: Tensor
    attn_weights: Tensor | None
    nbest: NBest | None = None


# (log-probabilities of the next word (N, V), the words just fed (N,)) -> (the words picked (N,), their
# log-probabilities (N,))
Picker = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class StepRules:
    """Rules every decoder applies to a step's log-probabilities (R, V) given the words each row emitted so far.

    - ``block_ngrams=n`` (n >= 1): a word that would repeat an n-gram already in the caption is not allowed
      (``-inf``; n = 3 is the trigram blocking of Paulus et al. 2018);
    - ``repetition_penalty=θ`` (CTRL, Keskar et al. 2019, as Hugging Face applies it to log-probabilities):
      the log-probability of a word already emitted is multiplied by θ (θ > 1 lowers it; all are <= 0);
    - ``bad_ids``: ``<END>`` may not follow these words (the bad-ending rule of SCST's ``bad_ending=forbid``).

    The result is renormalised, so it stays a distribution the sequence log-probabilities are summed from.
    """

    def __init__(self, block_ngrams: int = 0, repetition_penalty: float = 1.0, bad_ids: Tensor | None = None,
                 end_id: int = 2) -> None:
        self.block_ngrams, self.repetition_penalty = int(block_ngrams), float(repetition_penalty)
        self.bad_ids = None if bad_ids is None or len(bad_ids) == 0 else bad_ids.long()
        self.end_id = end_id

    @property
    def active(self) -> bool:
        return bool(self.block_ngrams or self.repetition_penalty != 1.0 or self.bad_ids is not None)

    def __call__(self, log_probs: Tensor, history: Tensor) -> Tensor:
        """log_probs (R, V) of the next word; history (R, t): the words each row emitted so far."""
        if not self.active or history.shape[1] == 0:
            return log_probs
        log_probs = log_probs.clone()
        rows = torch.arange(log_probs.shape[0], device=log_probs.device)
        if self.repetition_penalty != 1.0:
            seen = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(1, history, True)
            log_probs = torch.where(seen, log_probs * self.repetition_penalty, log_probs)
        n = self.block_ngrams
        if n and history.shape[1] >= n - 1:
            t = history.shape[1]
            if n == 1:
                log_probs.scatter_(1, history, float("-inf"))
            elif t >= n:
                windows = history.unfold(1, n, 1)  # (R, t - n + 1, n): every n-gram so far
                prefix = history[:, t - n + 1:]  # (R, n - 1): the words a new n-gram would start with
                match = (windows[:, :, :-1] == prefix.unsqueeze(1)).all(dim=2)  # (R, M)
                if bool(match.any()):
                    r, m = match.nonzero(as_tuple=True)
                    log_probs[r, windows[r, m, -1]] = float("-inf")
        if self.bad_ids is not None:
            after_bad = torch.isin(history[:, -1], self.bad_ids.to(history.device))
            log_probs[rows[after_bad], self.end_id] = float("-inf")
        # a row the rules left no word may still end (only n = 1 blocking on a tiny vocabulary gets here)
        log_probs[rows[torch.isinf(log_probs).all(dim=1)], self.end_id] = 0.0
        return log_probs.log_softmax(dim=1)

    def __repr__(self) -> str:
        return (f"StepRules(block_ngrams={self.block_ngrams}, repetition_penalty={self.repetition_penalty}, "
                f"bad_endings={0 if self.bad_ids is None else len(self.bad_ids)})")


@torch.no_grad()
def step_decode(model: CaptioningRNN, features: Tensor, max_length: int, pick: Picker,
                rules: StepRules | None = None, state: DecoderState | None = None) -> Decoded:
    """The decoding loop every left-to-right decoder shares, batched over the N images.

    Starts each row from ``<START>``, feeds back the word ``pick`` chooses from the step's log-probabilities
    (N, V; after ``rules``), and stops each row at its own ``<END>`` (kept in the output); the rest of an ended
    row is ``<NULL>``. The loop ends as soon as every row has ended. ``pick(log_probs, previous) -> (words (N,),
    their log-probability (N,))`` chooses given the words just fed (N,; ``<END>`` or ``<NULL>`` for rows that
    have ended): the argmax for greedy decoding, a draw for sampling. ``state``: the state to start from
    (default ``model.init_state(features)``).
    """
    N = features.shape[0]
    state = model.init_state(features) if state is None else state
    words = features.new_full((N,), model.start_id, dtype=torch.long)
    captions = features.new_full((N, max_length), model.null_id, dtype=torch.long)
    total = features.new_zeros(N, dtype=torch.float32)
    attn = None
    done = torch.zeros(N, dtype=torch.bool, device=features.device)
    for t in range(max_length):
        scores, state, weights = model.step(words, state)
        log_probs = scores.float().log_softmax(dim=1)
        if rules is not None:
            log_probs = rules(log_probs, captions[:, :t])
        words, chosen = pick(log_probs, words)
        words = words.masked_fill(done, model.null_id)
        total += chosen.masked_fill(done, 0.0)
        captions[:, t] = words
        if weights is not None:
            if attn is None:
                attn = features.new_zeros((N, max_length, *weights.shape[1:]))
            attn[:, t] = weights.masked_fill(done.view(N, 1, 1), 0.0)
        done = done | (words == model.end_id)
        if bool(done.all()):
            break
    return Decoded(captions, total, attn)


def _argmax(log_probs: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
    best, words = log_probs.max(dim=1)
    return words, best


@torch.no_grad()
def greedy_decode(model: CaptioningRNN, features: Tensor, max_length: int = 16,
                  rules: StepRules | None = None) -> Decoded:
    """The most likely word at every step, with the caption's log-probability summed as it decodes."""
    return step_decode(model, features, max_length, _argmax, rules)


def length_normalized(log_probs: Tensor, lengths: Tensor, alpha: float, norm: str = "power") -> Tensor:
    """The score a finished hypothesis is ranked by: ``log p / lp(|Y|)``, with ``lp = |Y| ** alpha`` (``"power"``)
    or Google NMT's ``((5 + |Y|) / 6) ** alpha`` (``"gnmt"``, Wu et al. 2016); |Y| counts the words and
    ``<END>``. alpha = 0: log p itself."""
    if not alpha:
        return log_probs
    lengths = lengths.clamp(min=1)
    penalty = lengths ** alpha if norm == "power" else ((5.0 + lengths) / 6.0) ** alpha
    return log_probs / penalty


class _Hypotheses(NamedTuple):
    captions: Tensor  # (N, B, L)
    log_probs: Tensor  # (N, B) under the decoding distribution
    lengths: Tensor  # (N, B) words + <END>
    attn: Tensor | None  # (N, B, L, h, w)


@torch.no_grad()
def _beam_hypotheses(model: CaptioningRNN, features: Tensor, beam_size: int, max_length: int, groups: int = 1,
                     diversity: float = 0.0, rules: StepRules | None = None) -> _Hypotheses:
    """The B = ``beam_size`` final hypotheses of every image, in G = ``groups`` groups of B / G (group-major).

    All N*B hypotheses advance in one step call. A finished hypothesis stays in its beam with a frozen score
    (it can only be extended by ``<NULL>`` at no cost), so finished and unfinished hypotheses compete on the
    same footing. At each step the groups choose in turn (Vijayakumar et al. 2016): group g ranks its
    extensions by their log-probability minus ``diversity`` times the number of earlier groups that chose the
    same word at this step (Hamming diversity), summed over the steps. Plain beam search can lose the greedy
    caption (pruned early, it may have ended better than every survivor), so each group keeps its greedy
    hypothesis (the argmax extension, under its own scores) in its last slot when it falls out of the top.
    """
    N, B, G = features.shape[0], beam_size, groups
    Bg = B // G
    device = features.device
    state = model.init_state(features).index_select(torch.arange(N, device=device).repeat_interleave(B))
    words = torch.full((N * B,), model.start_id, dtype=torch.long, device=device)
    captions = torch.full((N, B, max_length), model.null_id, dtype=torch.long, device=device)
    attn = None
    # Only the first beam of each group is live at the start, so a group's beams do not all pick the same word.
    chosen = torch.full((N, G, Bg), float("-inf"), device=device)  # what the groups rank by (with diversity)
    chosen[:, :, 0] = 0.0
    log_p = chosen.clone()  # the hypotheses' log-probabilities
    done = torch.zeros(N, B, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, B, device=device)
    greedy_beam = torch.zeros(N, G, dtype=torch.long, device=device)  # which beam of a group holds its greedy
    images = torch.arange(N, device=device)
    for t in range(max_length):
        logits, state, weights = model.step(words, state)
        V = logits.shape[1]
        log_probs = logits.float().log_softmax(dim=-1)
        if rules is not None:
            log_probs = rules(log_probs, captions.view(N * B, max_length)[:, :t])
        # An ended hypothesis continues only with <NULL>, at log-probability 0.
        ended = torch.full_like(log_probs[0], float("-inf"))
        ended[model.null_id] = 0.0
        log_probs = torch.where(done.view(N * B, 1), ended, log_probs).view(N, G, Bg, V)
        counts = torch.zeros(N, V, device=device) if diversity and G > 1 else None
        beams, picked = [], []
        for g in range(G):
            group_lp = log_probs[:, g]  # (N, Bg, V)
            ranked = group_lp
            if counts is not None and g > 0:
                ranked = torch.where(done.view(N, G, Bg)[:, g].unsqueeze(-1), ended,
                                     group_lp - diversity * counts.unsqueeze(1))
            candidates = (chosen[:, g].unsqueeze(-1) + ranked).view(N, Bg * V)
            top, flat = candidates.topk(Bg, dim=1)  # (N, Bg)
            gb = greedy_beam[:, g]
            greedy_flat = gb * V + ranked[images, gb].argmax(dim=1)  # (N,)
            lost = ~flat.eq(greedy_flat.unsqueeze(1)).any(dim=1)
            flat[lost, Bg - 1] = greedy_flat[lost]
            top[lost, Bg - 1] = candidates[lost, greedy_flat[lost]]
            greedy_beam[:, g] = flat.eq(greedy_flat.unsqueeze(1)).int().argmax(dim=1)
            chosen[:, g] = top
            log_p[:, g] = (log_p[:, g].unsqueeze(-1) + group_lp).view(N, Bg * V).gather(1, flat)
            beam, word = flat // V, flat % V
            if counts is not None:
                live = ~done.view(N, G, Bg)[:, g].gather(1, beam) & torch.isfinite(top)
                counts.scatter_add_(1, word, live.float())
            beams.append(beam + g * Bg)
            picked.append(word)
        beam, words2d = torch.cat(beams, dim=1), torch.cat(picked, dim=1)  # (N, B)
        rows = (beam + images.unsqueeze(1) * B).view(-1)
        state = state.regroup(rows)  # beams only move within their image's block of rows
        captions = captions.gather(1, beam.unsqueeze(-1).expand(N, B, max_length)).clone()
        captions[:, :, t] = words2d
        prev_done = done.gather(1, beam)
        if weights is not None:
            if attn is None:
                attn = features.new_zeros((N, B, max_length, *weights.shape[1:]))
            attn = attn.gather(1, beam.view(N, B, 1, 1, 1).expand_as(attn)).clone()
            step_w = weights.view(N, B, *weights.shape[1:]).gather(
                1, beam.view(N, B, 1, 1).expand(N, B, *weights.shape[1:]))
            attn[:, :, t] = step_w.masked_fill(prev_done.view(N, B, 1, 1), 0.0)
        lengths = lengths.gather(1, beam) + (~prev_done).float()
        done = prev_done | (words2d == model.end_id)
        words = words2d.view(-1)
        if bool(done.all()):
            break
    return _Hypotheses(captions, log_p.view(N, B), lengths, attn)


def _nbest(captions: Tensor, log_probs: Tensor, rank: Tensor, n: int) -> NBest:
    """The n best distinct captions (N, n, L) of the candidates (N, M, L), ranked by ``rank`` (N, M)."""
    same = (captions.unsqueeze(2) == captions.unsqueeze(1)).all(dim=-1)  # (N, M, M)
    order = rank.argsort(dim=1, descending=True, stable=True)
    same = same.gather(1, order.unsqueeze(-1).expand_as(same)).gather(2, order.unsqueeze(1).expand_as(same))
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)  # [i, j]: j is ranked before i
    repeat = (same & earlier).any(dim=2)  # (N, M) in ranked order
    ranked = rank.gather(1, order).masked_fill(repeat, float("-inf"))
    keep = order.gather(1, ranked.argsort(dim=1, descending=True, stable=True))[:, :n]
    missing = (ranked.sort(dim=1, descending=True, stable=True).values[:, :n] == float("-inf"))
    out = captions.gather(1, keep.unsqueeze(-1).expand(-1, -1, captions.shape[2])).masked_fill(
        missing.unsqueeze(-1), 0)
    return NBest(out, log_probs.gather(1, keep).masked_fill(missing, float("-inf")))


@torch.no_grad()
def beam_search(
    model: CaptioningRNN,
    features: Tensor,
    beam_size: int = 3,
    max_length: int = 16,
    length_penalty: float = 0.0,
    *,
    groups: int = 1,
    diversity: float = 0.0,
    length_norm: str = "power",
    n_best: int = 1,
    rules: StepRules | None = None,
) -> Decoded:
    """Beam search batched over images and beams (diverse with ``groups`` > 1 and ``diversity`` > 0).

    The final pick per image maximises :func:`length_normalized` ``(log p, |Y|, length_penalty, length_norm)``
    over all ``beam_size`` hypotheses of all groups (diversity decides what is explored, the model what wins);
    with ``length_penalty = 0`` it is the most likely hypothesis found, never less likely than greedy's.
    ``n_best`` > 1 also returns the ``n_best`` best distinct hypotheses in that order (``Decoded.nbest``).
    """
    if beam_size == 1 and n_best == 1:
        return greedy_decode(model, features, max_length, rules)
    found = _beam_hypotheses(model, features, beam_size, max_length, groups, diversity, rules)
    rank = length_normalized(found.log_probs, found.lengths, length_penalty, length_norm)
    best = rank.argmax(dim=1)
    images = torch.arange(features.shape[0], device=features.device)
    nbest = _nbest(found.captions, found.log_probs, rank, n_best) if n_best > 1 else None
    return Decoded(found.captions[images, best], found.log_probs[images, best],
                   None if found.attn is None else found.attn[images, best], nbest)


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 tensors holding values < 2**32; the multipliers
    are < 2**31 so no product leaves int64."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def keyed_uniform(keys: Tensor, step: int, size: int, seed: int) -> Tensor:
    """Uniform numbers in (0, 1), (R, size), that depend only on (seed, each row's key, step, column): a row
    draws the same numbers whichever batch, position or process it is decoded in."""
    words = torch.arange(size, device=keys.device, dtype=torch.long)
    salt = _mix32(torch.tensor([seed, step + 0x632BE5AB], device=keys.device, dtype=torch.long))
    x = _mix32(_mix32(keys.long() ^ salt[0]) ^ salt[1])
    x = _mix32(_mix32(x.unsqueeze(1) ^ _mix32(words + 0x9E3779B9)))
    return (x.double() + 0.5) / 2.0**32


@torch.no_grad()
def sample_decode(
    model: CaptioningRNN,
    features: Tensor,
    max_length: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    *,
    top_p: float = 1.0,
    n_best: int = 1,
    rules: StepRules | None = None,
    keys: Tensor | None = None,
    seed: int = 0,
) -> Decoded:
    """Ancestral sampling from ``softmax(scores / temperature)``, restricted to the top_k words if top_k > 0 and
    to the nucleus (the fewest most likely words whose probability sums to >= top_p, Holtzman et al. 2020) if
    top_p < 1. The log-probabilities are those of the distribution sampled from (tempered, truncated).

    ``n_best`` > 1 draws that many captions per image; the returned caption is the most likely of them and
    ``Decoded.nbest`` holds all of them, most likely first (repeats kept: how often a caption is drawn is
    what the sampler thinks of it).

    With ``keys`` (N,) (e.g. the image ids) every row draws by the Gumbel-max trick from noise of
    :func:`keyed_uniform` ``(seed, key, step)``: an image gets the same captions in any batch and under DDP with
    any number of processes. Otherwise ``torch.multinomial`` draws from ``generator``.
    """
    N = features.shape[0]
    if keys is not None:
        keys = keys.to(features.device).long()
        if n_best > 1:  # each draw of an image its own key
            keys = keys.repeat_interleave(n_best) * n_best + torch.arange(n_best, device=keys.device).repeat(N)
    step = [0]

    def draw(log_probs: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        logits = log_probs / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[1]), dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=1, descending=True)
            before = sorted_logits.softmax(dim=1).cumsum(dim=1) - sorted_logits.softmax(dim=1)
            # keep a word while the words ranked above it hold less than top_p (the first is always kept)
            cut = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, before >= top_p)
            logits = logits.masked_fill(cut, float("-inf"))
        tempered = logits.log_softmax(dim=1)
        if keys is None:
            words = torch.multinomial(tempered.exp(), 1, generator=generator).squeeze(1)
        else:
            gumbel = -torch.log(-torch.log(keyed_uniform(keys, step[0], tempered.shape[1], seed)))
            words = (tempered.double() + gumbel).argmax(dim=1)
        step[0] += 1
        return words, tempered.gather(1, words.unsqueeze(1)).squeeze(1)

    if n_best == 1:
        return step_decode(model, features, max_length, draw, rules)
    drawn = step_decode(model, features.repeat_interleave(n_best, dim=0), max_length, draw, rules)
    log_probs = drawn.log_probs.view(N, n_best)
    order = log_probs.argsort(dim=1, descending=True, stable=True)
    captions = drawn.captions.view(N, n_best, -1).gather(1, order.unsqueeze(-1).expand(-1, -1, max_length))
    log_probs = log_probs.gather(1, order)
    attn = None
    if drawn.attn_weights is not None:
        attn = drawn.attn_weights.view(N, n_best, *drawn.attn_weights.shape[1:])[torch.arange(N, device=order.device), order[:, 0]]
    return Decoded(captions[:, 0], log_probs[:, 0], attn, NBest(captions, log_probs))


class GuidedState:
    """The decoding state of :class:`Guided`: the rows with their images (first ``n``) and the same rows without
    (the last ``n``), advanced together as one batch."""

    def __init__(self, inner: DecoderState, n: int) -> None:
        self.inner, self.n = inner, n

    def index_select(self, index: Tensor) -> GuidedState:
        return GuidedState(self.inner.index_select(torch.cat([index, index + self.n])), index.shape[0])

    def regroup(self, rows: Tensor) -> GuidedState:
        return GuidedState(self.inner.regroup(torch.cat([rows, rows + self.n])), self.n)


class Guided:
    """A decoder steered away from its language prior: classifier-free guidance (Ho & Salimans 2022) for captions.

    Each step scores the words with the image and without it (zero features: how ``objective.image_dropout``
    trains the model to caption with no image) and decodes with

        log p(w | image, prefix) + weight * (log p(w | image, prefix) - log p(w | prefix)),

    so a word the image supports but the captions seen so far make unlikely ("star" after "red" when training
    never showed a red star) is not lost to the prior. It offers ``init_state`` and ``step`` like the model, so
    every decoder runs with it unchanged; a step costs one model step on twice the rows.
    """

    def __init__(self, model: CaptioningRNN, weight: float) -> None:
        self.model, self.weight = model, float(weight)
        self.start_id, self.null_id, self.end_id = model.start_id, model.null_id, model.end_id

    def init_state(self, features: Tensor) -> GuidedState:
        both = torch.cat([features, torch.zeros_like(features)])
        return GuidedState(self.model.init_state(both), features.shape[0])

    def step(self, words: Tensor, state: GuidedState) -> tuple[Tensor, GuidedState, Tensor | None]:
        n = state.n
        scores, inner, weights = self.model.step(torch.cat([words, words]), state.inner)
        log_probs = scores.float().log_softmax(dim=-1)
        with_image, prior = log_probs[:n], log_probs[n:]
        guided = with_image + self.weight * (with_image - prior)
        guided = guided.masked_fill(torch.isinf(with_image), float("-inf"))  # <NULL>, <START>: never emitted
        return guided, GuidedState(inner, n), None if weights is None else weights[:n]


class EnsembleState:
    """The decoding states of an :class:`Ensemble`'s members, reordered together."""

    def __init__(self, states: Sequence[Any]) -> None:
        self.states = list(states)

    def index_select(self, index: Tensor) -> EnsembleState:
        return EnsembleState([state.index_select(index) for state in self.states])

    def regroup(self, rows: Tensor) -> EnsembleState:
        return EnsembleState([state.regroup(rows) for state in self.states])


class Ensemble(nn.Module):
    """Several trained captioners decoding as one: each step's log-probabilities are the mean of the members'
    (the log of their renormalised geometric mean), so every decoder runs on it unchanged.

    It decodes from images: each member reads them with its own encoder. Members must share the vocabulary
    (checked where checkpoints are loaded, :func:`captioning.module.load_ensemble`). One member decodes exactly
    as that member alone. ``guidance`` holds each member's classifier-free guidance weight (0: none).

    Args:
        encoders: the members' encoders, images (N, 3, S, S) -> features.
        decoders: the members' ``CaptioningRNN`` decoders.
        guidance: a weight per member (:class:`Guided`), or None for none.
    """

    def __init__(self, encoders: Sequence[nn.Module], decoders: Sequence[CaptioningRNN],
                 guidance: Sequence[float] | None = None) -> None:
        super().__init__()
        if not encoders or len(encoders) != len(decoders):
            raise ValueError(f"Ensemble: {len(encoders)} encoders for {len(decoders)} decoders; give one of each "
                             "per member.")
        self.encoders, self.decoders = nn.ModuleList(encoders), nn.ModuleList(decoders)
        self.guidance = [float(g) for g in guidance] if guidance is not None else [0.0] * len(decoders)
        first = decoders[0]
        self.start_id, self.null_id, self.end_id = first.start_id, first.null_id, first.end_id
        self.cell_type = first.cell_type

    def _members(self) -> list[Any]:
        return [Guided(d, g) if g else d for d, g in zip(self.decoders, self.guidance, strict=True)]

    def init_state(self, images: Tensor) -> EnsembleState:
        return EnsembleState([m.init_state(e(images)) for m, e in zip(self._members(), self.encoders, strict=True)])

    def step(self, words: Tensor, state: EnsembleState) -> tuple[Tensor, EnsembleState, Tensor | None]:
        members = self._members()
        if len(members) == 1:
            scores, inner, weights = members[0].step(words, state.states[0])
            return scores, EnsembleState([inner]), weights
        outs = [m.step(words, s) for m, s in zip(members, state.states, strict=True)]
        log_probs = torch.stack([scores.float().log_softmax(dim=-1) for scores, _, _ in outs]).mean(dim=0)
        maps = [w for _, _, w in outs]
        weights = None
        if all(w is not None for w in maps) and len({tuple(w.shape) for w in maps}) == 1:
            weights = torch.stack(maps).mean(dim=0)
        return log_probs, EnsembleState([s for _, s, _ in outs]), weights


class CaptionDecoder:
    """The decoding strategy chosen by config (``decoding.*``); call it with a model and features.

    Args:
        strategy: ``"greedy"``, ``"beam"`` or ``"sample"``. ``"beam"`` with ``beam_size=1`` is greedy.
        max_length: the most words (including ``<END>``) to emit.
        beam_size, length_penalty, length_norm: for ``"beam"``; the final pick maximises ``log p / lp(|Y|)`` with
            ``lp = |Y| ** length_penalty`` (``length_norm="power"``) or Google NMT's ``((5 + |Y|) / 6) **
            length_penalty`` (``"gnmt"``).
        groups, diversity: diverse beam search: ``beam_size`` split into ``groups`` groups kept apart by a
            Hamming diversity penalty of weight ``diversity`` (groups = 1: plain beam search).
        temperature, top_k, top_p, seed: for ``"sample"`` (top_k = 0 keeps all words, top_p = 1 the whole
            distribution).
        n_best: return this many captions per image (``Decoded.nbest``): the best distinct beams (<= beam_size),
            or this many samples.
        block_ngrams, repetition_penalty, bad_endings: :class:`StepRules`, for every strategy (0, 1.0 and
            false: off). ``bad_endings``: true for ``BAD_ENDINGS`` or a list of words ``<END>`` may not follow.
        guidance: the weight of classifier-free guidance (:class:`Guided`; 0 = none), for any strategy; it needs
            a model trained with ``objective.image_dropout`` > 0, which taught it to caption without an image.
            ``"auto"`` (or None): ``AUTO_GUIDANCE`` for such a model, 0 for any other (the LightningModule decides,
            :meth:`for_model`).
    """

    AUTO_GUIDANCE = 1.0  # measured on the built-in set's held-out pairs (README, "Generalisation")

    def __init__(
        self,
        strategy: str = "greedy",
        max_length: int = 20,
        beam_size: int = 1,
        length_penalty: float = 0.0,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        guidance: float | str | None = "auto",
        *,
        length_norm: str = "power",
        groups: int = 1,
        diversity: float = 0.0,
        top_p: float = 1.0,
        n_best: int = 1,
        block_ngrams: int = 0,
        repetition_penalty: float = 1.0,
        bad_endings: bool | Sequence[str] | None = False,
    ) -> None:
        guidance = None if guidance in (None, "auto") else guidance
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, int | float)):
            raise ValueError(f"decoding.guidance={guidance!r} is not a number >= 0 or 'auto'.")
        if strategy not in STRATEGIES:
            raise ValueError(f"decoding.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}.")
        if length_norm not in LENGTH_NORMS:
            raise ValueError(f"decoding.length_norm={length_norm!r} is not one of {', '.join(LENGTH_NORMS)}.")
        checks = {
            "max_length": max_length >= 1,
            "beam_size": beam_size >= 1,
            "temperature": temperature > 0,
            "top_k": top_k >= 0,
            "top_p": 0 < top_p <= 1,
            "length_penalty": length_penalty >= 0,
            "guidance": guidance is None or guidance >= 0,
            "groups": groups >= 1,
            "diversity": diversity >= 0,
            "n_best": n_best >= 1,
            "block_ngrams": block_ngrams >= 0,
            "repetition_penalty": repetition_penalty > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"decoding.{key}={locals()[key]!r} is out of range: max_length, beam_size, groups and n_best "
                    "must be >= 1, temperature > 0, top_k >= 0 (0 = all words), 0 < top_p <= 1, length_penalty, "
                    "diversity, block_ngrams (0 = off) and guidance >= 0, repetition_penalty > 0 (1 = off)."
                )
        if groups > 1 and strategy != "beam":
            raise ValueError(f"decoding.groups={groups} is diverse beam search: it needs decoding=beam.")
        if beam_size % groups:
            raise ValueError(f"decoding.beam_size={beam_size} does not split into decoding.groups={groups} equal "
                             "groups: pass a beam_size that is a multiple of groups (e.g. groups=2 beam_size=6).")
        if n_best > 1 and strategy == "greedy":
            raise ValueError(f"decoding.n_best={n_best} needs several captions per image: use decoding=beam "
                             f"(decoding.beam_size >= {n_best}) or decoding=sample.")
        if strategy == "beam" and n_best > beam_size:
            raise ValueError(f"decoding.n_best={n_best} is more than the decoding.beam_size={beam_size} hypotheses "
                             "a beam search keeps: raise beam_size or lower n_best.")
        if isinstance(bad_endings, str) or not (isinstance(bad_endings, bool | None) or all(
                isinstance(w, str) for w in bad_endings)):
            raise ValueError(f"decoding.bad_endings={bad_endings!r}: pass true (the usual English function words), "
                             "false, or a list of words (quote on / no / yes in YAML, which reads them as booleans).")
        self.strategy, self.max_length, self.beam_size = strategy, max_length, beam_size
        self.length_penalty, self.temperature, self.top_k, self.seed = length_penalty, temperature, top_k, seed
        self.guidance = None if guidance is None else float(guidance)
        self.length_norm, self.groups, self.diversity = length_norm, int(groups), float(diversity)
        self.top_p, self.n_best = float(top_p), int(n_best)
        self.block_ngrams, self.repetition_penalty = int(block_ngrams), float(repetition_penalty)
        if bad_endings is True:
            bad_endings = BAD_ENDINGS
        self.bad_endings: tuple[str, ...] = tuple(bad_endings or ())
        self.bad_ids: Tensor | None = None  # the ids of bad_endings in a vocabulary (:meth:`for_model`)

    def for_model(self, trained_without_images: bool, vocab: Any = None) -> CaptionDecoder:
        """This decoder settled for a model: ``guidance="auto"`` by whether it was trained with image dropout, and
        the bad ending words as ids of its vocabulary (words it does not have are left out)."""
        settled = copy.copy(self)
        if self.guidance is None:
            settled.guidance = self.AUTO_GUIDANCE if trained_without_images else 0.0
        if vocab is not None and self.bad_endings:
            index = vocab.word_to_idx
            settled.bad_ids = torch.tensor([index[w] for w in self.bad_endings if w in index], dtype=torch.long)
        return settled

    def rules(self, model: Any) -> StepRules | None:
        if self.bad_endings and self.bad_ids is None:
            raise RuntimeError("decoding.bad_endings needs the model's vocabulary: settle the decoder with "
                               "for_model(..., vocab) first (the LightningModule does).")
        rules = StepRules(self.block_ngrams, self.repetition_penalty, self.bad_ids, model.end_id)
        return rules if rules.active else None

    def __call__(self, model: CaptioningRNN, features: Tensor, keys: Tensor | None = None) -> Decoded:
        """Decode the N images of ``features``; ``keys`` (N,), their image ids, make seeded sampling give each image
        the same captions in any batch and process (:func:`sample_decode`)."""
        if self.guidance and not isinstance(model, Ensemble):  # an ensemble guides each member itself
            model = Guided(model, self.guidance)  # type: ignore[assignment]
        rules = self.rules(model)
        if self.strategy == "greedy":
            return greedy_decode(model, features, self.max_length, rules)
        if self.strategy == "beam":
            return beam_search(model, features, self.beam_size, self.max_length, self.length_penalty,
                               groups=self.groups, diversity=self.diversity, length_norm=self.length_norm,
                               n_best=self.n_best, rules=rules)
        generator = None
        if self.seed is not None and keys is None:
            generator = torch.Generator(device=features.device).manual_seed(self.seed)
        return sample_decode(model, features, self.max_length, self.temperature, self.top_k, generator,
                             top_p=self.top_p, n_best=self.n_best, rules=rules,
                             keys=keys if self.seed is not None else None, seed=self.seed or 0)

    def __repr__(self) -> str:
        parts = [f"strategy={self.strategy!r}", f"max_length={self.max_length}"]
        if self.strategy == "beam":
            parts += [f"beam_size={self.beam_size}", f"length_penalty={self.length_penalty}"]
            if self.length_norm != "power":
                parts.append(f"length_norm={self.length_norm!r}")
            if self.groups > 1:
                parts += [f"groups={self.groups}", f"diversity={self.diversity}"]
        if self.strategy == "sample":
            parts += [f"temperature={self.temperature}", f"top_k={self.top_k}", f"top_p={self.top_p}"]
        if self.n_best > 1:
            parts.append(f"n_best={self.n_best}")
        if self.block_ngrams:
            parts.append(f"block_ngrams={self.block_ngrams}")
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition_penalty={self.repetition_penalty}")
        if self.bad_endings:
            parts.append(f"bad_endings={len(self.bad_endings)} words")
        parts.append(f"guidance={self.guidance}")
        return f"CaptionDecoder({', '.join(parts)})"
