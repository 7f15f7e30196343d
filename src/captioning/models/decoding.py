"""Caption decoders over a ``CaptioningRNN``: greedy, beam search and sampling, all batched.

The one home of decoding: greedy decoding and sampling are the argmax and the draw of one step-by-step
loop (:func:`step_decode`), beam search keeps K hypotheses per image. Each returns a ``Decoded``: captions
(N, L) without ``<START>``, ending in ``<END>`` where the model ended them and padded with ``<NULL>``; the
sequence log-probabilities (N,); and for the attention model the attention weights (N, L, h, w) of every
emitted word (else None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .captioner import CaptioningRNN, DecoderState

__all__ = ["Decoded", "CaptionDecoder", "Guided", "step_decode", "greedy_decode", "beam_search", "sample_decode"]

STRATEGIES = ("greedy", "beam", "sample")


class Decoded(NamedTuple):
    captions: Tensor
    log_probs: Tensor
    attn_weights: Tensor | None


# (log-probabilities of the next word (N, V), the words just fed (N,)) -> (the words picked (N,), their
# log-probabilities (N,))
Picker = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@torch.no_grad()
def step_decode(model: CaptioningRNN, features: Tensor, max_length: int, pick: Picker) -> Decoded:
    """The decoding loop every left-to-right decoder shares, batched over the N images.

    Starts each row from ``<START>``, feeds back the word ``pick`` chooses from the step's log-probabilities
    (N, V), and stops each row at its own ``<END>`` (kept in the output); the rest of an ended row is
    ``<NULL>``. The loop ends as soon as every row has ended. ``pick(log_probs, previous) -> (words (N,),
    their log-probability (N,))`` chooses from the step's log-probabilities (N, V) given the words just fed
    (N,; ``<END>`` or ``<NULL>`` for rows that have ended): the argmax for greedy decoding, a draw for
    sampling.
    """
    N = features.shape[0]
    state = model.init_state(features)
    words = features.new_full((N,), model.start_id, dtype=torch.long)
    captions = features.new_full((N, max_length), model.null_id, dtype=torch.long)
    total = features.new_zeros(N, dtype=torch.float32)
    attn = None
    done = torch.zeros(N, dtype=torch.bool, device=features.device)
    for t in range(max_length):
        scores, state, weights = model.step(words, state)
        words, chosen = pick(scores.float().log_softmax(dim=1), words)
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
def greedy_decode(model: CaptioningRNN, features: Tensor, max_length: int = 16) -> Decoded:
    """The most likely word at every step, with the caption's log-probability summed as it decodes."""
    return step_decode(model, features, max_length, _argmax)


@torch.no_grad()
def beam_search(
    model: CaptioningRNN,
    features: Tensor,
    beam_size: int = 3,
    max_length: int = 16,
    length_penalty: float = 0.0,
) -> Decoded:
    """Beam search batched over images and beams: the N*K hypotheses advance in one step call.

    A finished hypothesis stays in its beam with a frozen score (it can only be extended by ``<NULL>`` at no
    cost), so finished and unfinished hypotheses compete on the same footing. Plain beam search can lose
    the greedy caption (pruned early, it may have ended better than every survivor), so the greedy
    hypothesis is kept in the beam: at any step where its extension falls out of the top K it takes the
    last slot. Beam search therefore never returns a less likely caption than greedy. The final pick per image
    maximises ``log p / length ** length_penalty`` (length counts the words and ``<END>``); with
    ``length_penalty = 0`` it is the most likely hypothesis found.
    """
    if beam_size == 1:
        return greedy_decode(model, features, max_length)
    N, K = features.shape[0], beam_size
    device = features.device
    state = model.init_state(features).index_select(torch.arange(N, device=device).repeat_interleave(K))
    words = torch.full((N * K,), model.start_id, dtype=torch.long, device=device)
    captions = torch.full((N, K, max_length), model.null_id, dtype=torch.long, device=device)
    attn = None
    # Only the first beam is live at the start, so the K beams do not all pick the same first word.
    scores = torch.full((N, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    done = torch.zeros(N, K, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, K, device=device)
    greedy_beam = torch.zeros(N, dtype=torch.long, device=device)  # which beam holds the greedy prefix
    images = torch.arange(N, device=device)
    for t in range(max_length):
        logits, state, weights = model.step(words, state)
        V = logits.shape[1]
        log_probs = logits.float().log_softmax(dim=-1).view(N, K, V)
        # An ended hypothesis continues only with <NULL>, at log-probability 0.
        ended = torch.full_like(log_probs[0, 0], float("-inf"))
        ended[model.null_id] = 0.0
        log_probs = torch.where(done.unsqueeze(-1), ended, log_probs)
        candidates = (scores.unsqueeze(-1) + log_probs).view(N, K * V)
        scores, flat = candidates.topk(K, dim=1)  # (N, K)
        greedy_flat = greedy_beam * V + log_probs[images, greedy_beam].argmax(dim=1)  # (N,)
        greedy_kept = flat.eq(greedy_flat.unsqueeze(1))
        lost = ~greedy_kept.any(dim=1)
        flat[lost, K - 1] = greedy_flat[lost]
        scores[lost, K - 1] = candidates[lost, greedy_flat[lost]]
        greedy_beam = flat.eq(greedy_flat.unsqueeze(1)).int().argmax(dim=1)
        beam, words2d = flat // V, flat % V
        rows = (beam + images.unsqueeze(1) * K).view(-1)
        state = state.regroup(rows)  # beams only move within their image's block of rows
        captions = captions.gather(1, beam.unsqueeze(-1).expand(N, K, max_length)).clone()
        captions[:, :, t] = words2d
        if weights is not None:
            if attn is None:
                attn = features.new_zeros((N, K, max_length, *weights.shape[1:]))
            attn = attn.gather(1, beam.view(N, K, 1, 1, 1).expand_as(attn)).clone()
            step_w = weights.view(N, K, *weights.shape[1:]).gather(
                1, beam.view(N, K, 1, 1).expand(N, K, *weights.shape[1:]))
            attn[:, :, t] = step_w.masked_fill(done.gather(1, beam).view(N, K, 1, 1), 0.0)
        prev_done = done.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~prev_done).float()
        done = prev_done | (words2d == model.end_id)
        words = words2d.view(-1)
        if bool(done.all()):
            break
    final = scores / lengths.clamp(min=1) ** length_penalty if length_penalty else scores
    best = final.argmax(dim=1)
    return Decoded(captions[images, best], scores[images, best], None if attn is None else attn[images, best])


@torch.no_grad()
def sample_decode(
    model: CaptioningRNN,
    features: Tensor,
    max_length: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Decoded:
    """Ancestral sampling from ``softmax(scores / temperature)``, restricted to the top_k words if top_k > 0.

    The log-probabilities are those of the distribution sampled from (tempered, top-k).
    """

    def draw(log_probs: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        logits = log_probs / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[1]), dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        tempered = logits.log_softmax(dim=1)
        words = torch.multinomial(tempered.exp(), 1, generator=generator).squeeze(1)
        return words, tempered.gather(1, words.unsqueeze(1)).squeeze(1)

    return step_decode(model, features, max_length, draw)


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


class CaptionDecoder:
    """The decoding strategy chosen by config (``decoding.*``); call it with a model and features.

    Args:
        strategy: ``"greedy"``, ``"beam"`` or ``"sample"``. ``"beam"`` with ``beam_size=1`` is greedy.
        max_length: the most words (including ``<END>``) to emit.
        beam_size, length_penalty: for ``"beam"``.
        temperature, top_k, seed: for ``"sample"`` (top_k = 0 keeps all words).
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
    ) -> None:
        guidance = None if guidance in (None, "auto") else guidance
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, int | float)):
            raise ValueError(f"decoding.guidance={guidance!r} is not a number >= 0 or 'auto'.")
        if strategy not in STRATEGIES:
            raise ValueError(f"decoding.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}.")
        checks = {
            "max_length": max_length >= 1,
            "beam_size": beam_size >= 1,
            "temperature": temperature > 0,
            "top_k": top_k >= 0,
            "length_penalty": length_penalty >= 0,
            "guidance": guidance is None or guidance >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"decoding.{key}={locals()[key]!r} is out of range: max_length and beam_size must be >= 1, "
                    "temperature > 0, top_k >= 0 (0 = all words), length_penalty >= 0, guidance >= 0."
                )
        self.strategy, self.max_length, self.beam_size = strategy, max_length, beam_size
        self.length_penalty, self.temperature, self.top_k, self.seed = length_penalty, temperature, top_k, seed
        self.guidance = None if guidance is None else float(guidance)

    def for_model(self, trained_without_images: bool) -> CaptionDecoder:
        """This decoder with ``guidance="auto"`` settled for a model (trained with image dropout or not)."""
        if self.guidance is not None:
            return self
        guidance = self.AUTO_GUIDANCE if trained_without_images else 0.0
        return CaptionDecoder(self.strategy, self.max_length, self.beam_size, self.length_penalty, self.temperature,
                              self.top_k, self.seed, guidance)

    def __call__(self, model: CaptioningRNN, features: Tensor) -> Decoded:
        if self.guidance:
            model = Guided(model, self.guidance)  # type: ignore[assignment]
        if self.strategy == "greedy":
            return greedy_decode(model, features, self.max_length)
        if self.strategy == "beam":
            return beam_search(model, features, self.beam_size, self.max_length, self.length_penalty)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=features.device).manual_seed(self.seed)
        return sample_decode(model, features, self.max_length, self.temperature, self.top_k, generator)

    def __repr__(self) -> str:
        return (f"CaptionDecoder(strategy={self.strategy!r}, max_length={self.max_length}, "
                f"beam_size={self.beam_size}, length_penalty={self.length_penalty}, "
                f"temperature={self.temperature}, top_k={self.top_k}, guidance={self.guidance})")
