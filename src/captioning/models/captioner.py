"""The recurrent captioning decoder: image features -> word scores (the courses' model).

``CaptioningRNN`` holds the math: the initial state from the image (``init_state``), one step of the
hand-written core (``step``) and the teacher-forced loss over a whole caption (``forward``). Turning it into
captions — greedy, beam search, sampling — is :mod:`captioning.models.decoding`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bptt import AttentionStep, attention_lstm_replay
from .loss import linear_temporal_softmax_loss, temporal_softmax_loss
from .rnn import LSTM, RNN, AttentionLSTM

__all__ = ["CaptioningRNN", "DecoderState", "CELL_TYPES"]

CELL_TYPES = ("rnn", "lstm", "attention")
FEATURE_POOLS = ("mean", "max", "flatten")


@dataclass
class DecoderState:
    """Recurrent state while decoding; every tensor is batch-first so decoders can reorder rows.

    h, c: (N, H) (c is None for the vanilla RNN); A: (N, H, Dh, Dw) projected feature map (attention only);
    image: (N, W) the image vector fed beside every word (``image_input`` only). ``steps``, when a list, collects
    the attention core's fused steps as they are taken, for :meth:`CaptioningRNN.forward`'s ``replay``.
    """

    h: Tensor
    c: Tensor | None = None
    A: Tensor | None = None
    image: Tensor | None = None
    steps: list[AttentionStep] | None = None

    def index_select(self, index: Tensor) -> DecoderState:
        """Rows picked (and possibly repeated) by index (M,) -> a state of batch M."""
        return DecoderState(*(None if t is None else t.index_select(0, index)
                              for t in (self.h, self.c, self.A, self.image)))

    def regroup(self, rows: Tensor) -> DecoderState:
        """The recurrent rows reordered by rows (M,) where every row stays among the rows of its own image (beam
        search): the projected map A, the same for all of them, is kept as it is instead of copied."""
        return DecoderState(self.h.index_select(0, rows), None if self.c is None else self.c.index_select(0, rows),
                            self.A, None if self.image is None else self.image.index_select(0, rows))


class CaptioningRNN(nn.Module):
    """Show-and-Tell / Show-Attend-Tell decoder of the CS231n and EECS 498 courses.

    Image features (N, D) or a feature map (N, D, h, w) are pooled to a vector v (N, P) and projected to the
    initial hidden state h0 = v W_proj (N, H) — or, for ``cell_type="attention"``, by a 1x1 projection to
    A (N, H, h, w) — and the words of the caption, embedded to (N, T, W), run through the hand-written core
    to hidden states (N, T, H), then to vocabulary scores (N, T, V).

    With ``image_input`` the core also gets v W_img (N, W) beside every word, x_t = [embed(w_t); v W_img]
    (N, 2W): the image is not only h0. A decoder whose only view of the image is h0 learns the captions'
    language but not what is in the picture (on the built-in set it names colours at chance level).

    Args:
        vocab_size: V, the number of words including the special tokens.
        input_dim: D, the channels of the encoder's features.
        wordvec_dim: W, the size of the word embeddings.
        hidden_dim: H, the size of the recurrent state.
        cell_type: ``"rnn"``, ``"lstm"`` or ``"attention"``.
        dropout: dropout on the word embeddings and on the hidden states before the vocabulary projection.
        null_id, start_id, end_id: the special tokens' ids (the vocabulary's: 0, 1, 2).
        loss_normalize: ``"batch"`` (sum over tokens / N, the courses' convention) or ``"tokens"``.
        backward: how the recurrent core is differentiated, ``"autograd"`` or ``"manual"`` (hand-written
            BPTT, ``captioning.models.bptt``); the same numbers either way.
        feature_pool: how a map becomes v for rnn / lstm: ``"mean"`` (the courses'), ``"max"`` (the largest
            response of each channel anywhere) or ``"flatten"`` (average-pooled to ``feature_grid`` x
            ``feature_grid`` positions, concatenated: P = D * feature_grid**2).
        feature_grid: the side of the grid for ``feature_pool="flatten"``.
        image_input: feed v (projected to W) beside every word.
        context_output: for ``cell_type="attention"``, the context z_t the step attended to also enters the
            vocabulary scores, s_t = W_v (h_t + W_z z_t) + b (the deep output of Show, Attend and Tell, eq. 7,
            without its word term). The evidence of the attended region then reaches the scores directly
            instead of only through the gates, where the prefix's prior ("green" -> never "square") is.
            W_z starts at zero: the model starts as the one without it. No effect for ``rnn`` / ``lstm``.

    The training loss never materialises the (N, T, V) scores: the vocabulary projection and the loss are
    fused (``linear_temporal_softmax_loss``) and only the non-``<NULL>`` positions are projected.
    """

    def __init__(
        self,
        vocab_size: int,
        input_dim: int,
        wordvec_dim: int = 128,
        hidden_dim: int = 256,
        cell_type: str = "lstm",
        dropout: float = 0.0,
        null_id: int = 0,
        start_id: int = 1,
        end_id: int = 2,
        loss_normalize: str = "batch",
        backward: str = "manual",
        feature_pool: str = "mean",
        feature_grid: int = 4,
        image_input: bool = False,
        context_output: bool = False,
    ) -> None:
        super().__init__()
        if cell_type not in CELL_TYPES:
            raise ValueError(
                f"Unknown cell_type {cell_type!r}; choose one of {', '.join(CELL_TYPES)} (model.cell_type)."
            )
        for name, value in (("vocab_size", vocab_size), ("input_dim", input_dim),
                            ("wordvec_dim", wordvec_dim), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CaptioningRNN: {name} must be a positive integer, got {value!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"CaptioningRNN: dropout must be in [0, 1), got {dropout!r} (model.dropout).")
        if feature_pool not in FEATURE_POOLS:
            raise ValueError(f"Unknown feature_pool {feature_pool!r}; choose one of {', '.join(FEATURE_POOLS)} "
                             "(model.feature_pool).")
        if not isinstance(feature_grid, int) or feature_grid < 1:
            raise ValueError(f"CaptioningRNN: feature_grid must be a positive integer, got {feature_grid!r}.")
        self.vocab_size, self.input_dim = vocab_size, input_dim
        self.wordvec_dim, self.hidden_dim, self.cell_type = wordvec_dim, hidden_dim, cell_type
        self.null_id, self.start_id, self.end_id = null_id, start_id, end_id
        self.loss_normalize = loss_normalize

        self.feature_pool, self.feature_grid, self.image_input = feature_pool, feature_grid, image_input
        pooled_dim = input_dim * (feature_grid**2 if feature_pool == "flatten" else 1)
        if cell_type == "attention":
            self.feature_proj: nn.Module = nn.Conv2d(input_dim, hidden_dim, kernel_size=1)
        else:
            self.feature_proj = nn.Linear(pooled_dim, hidden_dim)
        self.image_proj = nn.Linear(pooled_dim, wordvec_dim) if image_input else None
        self.embed = nn.Embedding(vocab_size, wordvec_dim)
        core = {"rnn": RNN, "lstm": LSTM, "attention": AttentionLSTM}[cell_type]
        self.core = core(wordvec_dim * (2 if image_input else 1), hidden_dim, backward=backward)
        self.dropout = nn.Dropout(dropout)
        self.vocab_proj = nn.Linear(hidden_dim, vocab_size)
        # rnn / lstm attend to nothing: there the key has no effect (as image_input has none for attention), so
        # a sweep over model.cell_type from the attention config composes
        self.context_output = context_output and cell_type == "attention"
        self.context_proj = nn.Linear(hidden_dim, hidden_dim, bias=False) if self.context_output else None
        if self.context_proj is not None:
            nn.init.zeros_(self.context_proj.weight)

    # ---------------------------------------------------------------------------------------------
    # Training
    def init_state(self, features: Tensor) -> DecoderState:
        """features (N, D) or (N, D, h, w) -> the state before the first word (a decoding starts here, so the core's
        fused steps stack the weights afresh: ``forget_stacked``)."""
        self.core.forget_stacked()
        if self.cell_type == "attention":
            if features.dim() != 4:
                raise ValueError(
                    "cell_type='attention' needs a spatial feature map (N, D, h, w) from the encoder, got "
                    f"features of shape {tuple(features.shape)}; use an encoder that keeps the spatial map."
                )
            A = self.feature_proj(features)
            h0 = A.mean(dim=(2, 3))
            return DecoderState(h=h0, c=h0, A=A)
        pooled = self.pool(features)
        h0 = self.feature_proj(pooled)
        image = self.image_proj(pooled) if self.image_proj is not None else None
        return DecoderState(h=h0, c=torch.zeros_like(h0) if self.cell_type == "lstm" else None, image=image)

    def pool(self, features: Tensor) -> Tensor:
        """features (N, D) or a map (N, D, h, w) -> the image vector (N, P) that h0 is projected from."""
        if features.dim() == 2:
            return features
        if self.feature_pool == "flatten":
            return nn.functional.adaptive_avg_pool2d(features, self.feature_grid).flatten(1)
        if self.feature_pool == "max":
            return features.amax(dim=(2, 3))
        return features.mean(dim=(2, 3))

    def _inputs(self, words: Tensor, state: DecoderState) -> Tensor:
        """The core's input for words (N,) or (N, T): the embedding, and with image_input the image vector."""
        x = self.embed(words)
        if state.image is None:
            return x
        image = state.image if words.dim() == 1 else state.image.unsqueeze(1).expand(-1, words.shape[1], -1)
        return torch.cat([x, image], dim=-1)

    def hidden_states(self, features: Tensor | None, captions_in: Tensor, replay: DecoderState | None = None
                      ) -> Tensor:
        """Teacher-forced hidden states: features, captions_in (N, T) -> h (N, T, H); with ``context_output``
        the vectors the vocabulary projection reads, h_t + W_z z_t.

        ``replay``: the initial state (from ``init_state``, with gradients) of a decoding that recorded its T steps
        in ``replay.steps`` while feeding captions_in (attention only): the steps are differentiated as they
        were taken (``bptt.attention_lstm_replay``) instead of run again; features are not read.
        """
        state = self.init_state(features) if replay is None else replay
        x = self.dropout(self._inputs(captions_in, state))
        if self.cell_type != "attention":
            return self.core(x, state.h)
        if replay is None:
            h = self.core(x, state.A)
        else:
            if replay.steps is None or (self.training and self.dropout.p > 0):
                raise ValueError("CaptioningRNN: replay needs recorded steps (DecoderState.steps) and no dropout "
                                 "(the steps were taken without it).")
            core = self.core
            h = attention_lstm_replay(x, state.A, core.Wx, core.Wh, core.Wattn, core.b, replay.steps)
        if self.context_proj is None:
            return h
        return h + self.context_proj(self.contexts(h, state))

    @staticmethod
    def contexts(h: Tensor, state: DecoderState) -> Tensor:
        """The contexts the teacher-forced steps attended to: h (N, T, H) -> z (N, T, H).

        Step t attends with the previous hidden state (h0 at the first), as the core does:
        z_t = sum_p softmax_p(h_{t-1} . A_p / sqrt(H)) A_p, all steps in two batched products.
        """
        A = state.A.flatten(2)  # (N, H, P)
        prev_h = torch.cat([state.h.unsqueeze(1), h[:, :-1]], dim=1)  # (N, T, H)
        weights = torch.softmax(torch.bmm(prev_h, A) / math.sqrt(A.shape[1]), dim=-1)  # (N, T, P)
        return torch.bmm(weights, A.transpose(1, 2))

    @property
    def never_emitted(self) -> tuple[int, int]:
        """The ids no decoder emits (``<NULL>``, ``<START>``): outside the decoding distribution."""
        return (self.null_id, self.start_id)

    def forward(
        self, features: Tensor, captions: Tensor, return_scores: bool = False, *, inputs: Tensor | None = None,
        weights: Tensor | None = None, decoding_distribution: bool = False, label_smoothing: float = 0.0,
        normalize: str | None = None, replay: DecoderState | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced loss: features (N, D) or (N, D, h, w), captions (N, T+1) -> scalar loss.

        ``captions_in = captions[:, :-1]`` is fed, ``captions_out = captions[:, 1:]`` is predicted;
        ``<NULL>`` targets are ignored. With ``return_scores`` also returns scores (N, T, V).

        ``inputs`` (N, T) feeds other words than ``captions_in`` while still predicting ``captions_out``
        (input noise, scheduled sampling); ``weights`` (N,) scale each caption's loss (self-critical training);
        ``decoding_distribution`` scores under the distribution the decoders draw from (``never_emitted`` left out
        of the softmax, as :meth:`step` does) instead of the courses' full softmax; ``label_smoothing`` as in
        :mod:`.loss`; ``normalize`` overrides ``loss_normalize`` (``"batch"`` or ``"tokens"``); ``replay``, a
        decoding's recorded steps that fed ``captions_in``, as in :meth:`hidden_states`.
        """
        h, captions_out = self._teacher_forced(features, captions, inputs, replay)
        excluded = self.never_emitted if decoding_distribution else ()
        normalize = normalize or self.loss_normalize
        if not return_scores:
            return linear_temporal_softmax_loss(h, self.vocab_proj.weight, self.vocab_proj.bias, captions_out,
                                                self.null_id, normalize, weights, excluded, label_smoothing)
        scores = self.vocab_proj(h)
        loss = temporal_softmax_loss(scores, captions_out, self.null_id, normalize, weights, excluded,
                                     label_smoothing)
        return loss, scores

    def log_probs(self, features: Tensor, captions: Tensor) -> Tensor:
        """log p(caption | image) under the decoding distribution, summed up to ``<END>``: features (N, ...),
        captions (N, L) as the decoders return them (no ``<START>``, ``<NULL>`` after ``<END>``) -> (N,).

        The loss's teacher-forced pass; ``-log_probs(...).mul(w).mean()`` is ``forward(features,
        with_start(captions), weights=w, decoding_distribution=True, normalize="batch")``.
        """
        h, captions_out = self._teacher_forced(features, self.with_start(captions))
        scores = self.mask_never_emitted(self.vocab_proj(h))
        log_p = scores.log_softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        picked = log_p.gather(-1, captions_out.unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(captions_out == self.null_id, 0.0).sum(dim=1)

    def with_start(self, captions: Tensor) -> Tensor:
        """Decoded captions (N, L) -> (N, L+1) with ``<START>`` in front, as ``forward`` takes them."""
        return torch.cat([captions.new_full((captions.shape[0], 1), self.start_id), captions], dim=1)

    def _teacher_forced(self, features: Tensor | None, captions: Tensor, inputs: Tensor | None = None,
                        replay: DecoderState | None = None) -> tuple[Tensor, Tensor]:
        """captions (N, T+1) -> (hidden states (N, T, H) after dropout, captions_out (N, T)); ``inputs`` (N, T)
        fed in place of captions_in."""
        captions_in, captions_out = captions[:, :-1], captions[:, 1:]
        if inputs is not None:
            if inputs.shape != captions_in.shape:
                raise ValueError(f"inputs must have the shape of captions[:, :-1], {tuple(captions_in.shape)}; "
                                 f"got {tuple(inputs.shape)}.")
            captions_in = inputs
        return self.dropout(self.hidden_states(features, captions_in, replay)), captions_out

    def mask_never_emitted(self, scores: Tensor) -> Tensor:
        """scores (..., V) with ``never_emitted`` at -inf (in place)."""
        scores[..., list(self.never_emitted)] = float("-inf")
        return scores

    # ---------------------------------------------------------------------------------------------
    # Decoding
    def step(self, words: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState, Tensor | None]:
        """Feed one word per row: words (N,) -> scores (N, V), next state, attention weights (N, h, w) or None.

        The scores of ``<NULL>`` and ``<START>`` are -inf: a decoder never emits them.
        """
        x = self._inputs(words, state)
        weights = None
        if self.cell_type == "rnn":
            state = DecoderState(h=self.core.step(x, state.h), image=state.image)
        elif self.cell_type == "lstm":
            h, c = self.core.step(x, state.h, state.c)
            state = DecoderState(h=h, c=c, image=state.image)
        elif state.steps is None and not self.core.fuses_steps():
            h, c, weights = self.core.step(x, state.h, state.c, state.A)
            state = DecoderState(h=h, c=c, A=state.A, image=state.image)
            if self.context_proj is not None:
                z = torch.bmm(weights.flatten(1).unsqueeze(1), state.A.flatten(2).transpose(1, 2)).squeeze(1)
                return self.mask_never_emitted(self.vocab_proj(h + self.context_proj(z))), state, weights
        else:
            step = self.core.step_fused(x, state.h, state.c, state.A)
            if state.steps is not None:
                state.steps.append(step)
            weights = step.weights.view(step.h.shape[0], *state.A.shape[2:])
            state = DecoderState(h=step.h, c=step.c, A=state.A, image=state.image, steps=state.steps)
            if self.context_proj is not None:  # the step's context is the attn half of its recurrent input
                z = step.hx[:, self.hidden_dim:]
                return self.mask_never_emitted(self.vocab_proj(step.h + self.context_proj(z))), state, weights
        return self.mask_never_emitted(self.vocab_proj(state.h)), state, weights
