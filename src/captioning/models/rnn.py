"""Hand-written recurrent cores: vanilla RNN, LSTM and attention LSTM.

The plain functions follow the CS231n / EECS 498 conventions (docs/architecture.md, "Contracts"): row-major
activations, weights applied on the right (``x @ Wx``), LSTM gates packed as ``i, f, o, g``. They work for
any float dtype and device and are differentiated by autograd; ``captioning.models.bptt`` adds
hand-written backward passes for the whole-sequence forms.

Wherever the input projection does not depend on the hidden state, it is computed for all T steps in a
single matmul (``x.reshape(N*T, D) @ Wx``); only the recurrence itself loops over time. The loops take
their steps with ``unbind`` rather than indexing: the backward of ``xw[:, t]`` would build a zero tensor
of the whole (N, T, G) projection for every step (O(T^2) memory traffic), ``unbind``'s is one ``stack``.

The modules (``RNN``, ``LSTM``, ``AttentionLSTM``) take ``backward="autograd"|"manual"``: ``"manual"``
runs the same forward as a ``torch.autograd.Function`` with hand-written BPTT (``captioning.models.bptt``).
Their ``step`` is the step function above while autograd records; without gradients (decoding) the LSTM
and attention LSTM take the same step fused, one GEMM over the stacked weights with the gates in place
(``bptt.lstm_step_fused``, ``bptt.attention_lstm_step_fused``: 1.3-1.7x faster at the default size).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .bptt import (
    AttentionStep,
    attention_lstm_forward_manual,
    attention_lstm_step_fused,
    lstm_forward_manual,
    lstm_step_fused,
    rnn_forward_manual,
)

__all__ = [
    "rnn_step_forward",
    "rnn_forward",
    "lstm_step_forward",
    "lstm_forward",
    "dot_product_attention",
    "attention_lstm_step_forward",
    "attention_lstm_forward",
    "RNN",
    "LSTM",
    "AttentionLSTM",
    "BACKWARDS",
]

BACKWARDS = ("autograd", "manual")


def _input_projection(x: Tensor, Wx: Tensor, b: Tensor) -> Tensor:
    """``x Wx + b`` for every time step at once: x (N, T, D) -> (N, T, Wx.shape[1])."""
    N, T, D = x.shape
    return torch.addmm(b, x.reshape(N * T, D), Wx).view(N, T, -1)


def rnn_step_forward(x: Tensor, prev_h: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
    """One vanilla-RNN step: ``next_h = tanh(x Wx + prev_h Wh + b)``.

    x (N, D), prev_h (N, H), Wx (D, H), Wh (H, H), b (H,) -> next_h (N, H).
    """
    return torch.tanh(torch.addmm(b, x, Wx) + prev_h @ Wh)


def rnn_forward(x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
    """Vanilla RNN over a sequence: x (N, T, D), h0 (N, H) -> h (N, T, H)."""
    h, hs = h0, []
    for xw_t in _input_projection(x, Wx, b).unbind(1):
        h = torch.tanh(torch.addmm(xw_t, h, Wh))
        hs.append(h)
    return torch.stack(hs, dim=1)


def _lstm_gates(a: Tensor, prev_c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM cell update from pre-activations a (N, 4H) packed as i, f, o, g."""
    H = prev_c.shape[1]
    ifo = torch.sigmoid(a[:, : 3 * H])
    g = torch.tanh(a[:, 3 * H :])
    i, f, o = ifo[:, :H], ifo[:, H : 2 * H], ifo[:, 2 * H :]
    next_c = torch.addcmul(f * prev_c, i, g)
    next_h = o * torch.tanh(next_c)
    return next_h, next_c


def lstm_step_forward(
    x: Tensor, prev_h: Tensor, prev_c: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """One LSTM step.

    x (N, D), prev_h (N, H), prev_c (N, H), Wx (D, 4H), Wh (H, 4H), b (4H,) -> (next_h, next_c), each (N, H).
    ``a = x Wx + prev_h Wh + b`` split into i, f, o, g; ``next_c = f*prev_c + i*g``; ``next_h = o*tanh(next_c)``.
    """
    a = torch.addmm(b, x, Wx) + prev_h @ Wh
    return _lstm_gates(a, prev_c)


def lstm_forward(x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
    """LSTM over a sequence with c0 = 0: x (N, T, D), h0 (N, H) -> h (N, T, H)."""
    h, c, hs = h0, torch.zeros_like(h0), []
    for xw_t in _input_projection(x, Wx, b).unbind(1):
        h, c = _lstm_gates(torch.addmm(xw_t, h, Wh), c)
        hs.append(h)
    return torch.stack(hs, dim=1)


def dot_product_attention(prev_h: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention of a hidden state over a projected feature map.

    prev_h (N, H), A (N, H, Dh, Dw) -> attn (N, H), attn_weights (N, Dh, Dw), where
    ``scores = prev_h · A / sqrt(H)`` at each of the Dh*Dw positions, ``attn_weights = softmax(scores)``
    and ``attn = sum over positions of attn_weights * A``.
    """
    N, H, Dh, Dw = A.shape
    A_flat = A.reshape(N, H, Dh * Dw)
    scores = torch.bmm(prev_h.unsqueeze(1), A_flat).squeeze(1) / math.sqrt(H)  # (N, Dh*Dw)
    weights = torch.softmax(scores, dim=1)
    # (1, P) @ (P, H) per image: on CPU this row-vector form is ~6x faster than A (H, P) @ w (P, 1)
    attn = torch.bmm(weights.unsqueeze(1), A_flat.transpose(1, 2)).squeeze(1)  # (N, H)
    return attn, weights.view(N, Dh, Dw)


def attention_lstm_step_forward(
    x: Tensor,
    prev_h: Tensor,
    prev_c: Tensor,
    attn: Tensor,
    Wx: Tensor,
    Wh: Tensor,
    Wattn: Tensor,
    b: Tensor,
) -> tuple[Tensor, Tensor]:
    """One attention-LSTM step: the LSTM step with ``attn Wattn`` added to the pre-activations.

    x (N, D), prev_h, prev_c, attn (N, H), Wx (D, 4H), Wh (H, 4H), Wattn (H, 4H), b (4H,) -> (next_h, next_c).
    """
    a = torch.addmm(b, x, Wx) + prev_h @ Wh + attn @ Wattn
    return _lstm_gates(a, prev_c)


def attention_lstm_forward(
    x: Tensor, A: Tensor, Wx: Tensor, Wh: Tensor, Wattn: Tensor, b: Tensor
) -> Tensor:
    """Attention LSTM over a sequence: x (N, T, D), A (N, H, Dh, Dw) -> h (N, T, H).

    h0 = c0 = the mean of A over its spatial positions.
    """
    h = A.mean(dim=(2, 3))
    c = h
    hs = []
    xw = _input_projection(x, Wx, b)
    # In-place addmm_ is not autocast: under bf16/fp16 autocast the gates are in the autocast dtype, so
    # Wattn is cast to it once here (a no-op without autocast).
    Wattn = Wattn.to(xw.dtype)
    for xw_t in xw.unbind(1):
        attn, _ = dot_product_attention(h, A)
        h, c = _lstm_gates(torch.addmm(xw_t, h, Wh).addmm_(attn, Wattn), c)
        hs.append(h)
    return torch.stack(hs, dim=1)


class _Recurrent(nn.Module):
    """Shared parameter set-up: Wx (D, G*H), Wh (H, G*H), b (G*H,) with G gates.

    ``backward`` picks how the whole-sequence forward is differentiated: ``"autograd"`` (through the plain
    functions above) or ``"manual"`` (hand-written BPTT, ``captioning.models.bptt``); same results.
    """

    gates = 1

    def __init__(self, input_dim: int, hidden_dim: int, backward: str = "autograd") -> None:
        super().__init__()
        if input_dim <= 0 or hidden_dim <= 0:
            raise ValueError(
                f"{type(self).__name__} needs positive sizes, got input_dim={input_dim}, "
                f"hidden_dim={hidden_dim}; set model.wordvec_dim / model.hidden_dim to positive integers."
            )
        if backward not in BACKWARDS:
            raise ValueError(
                f"{type(self).__name__}: unknown backward {backward!r}; choose one of {', '.join(BACKWARDS)} "
                "(model.backward): 'autograd' differentiates the hand-written forward with autograd, "
                "'manual' uses the hand-written BPTT backward."
            )
        self.input_dim, self.hidden_dim, self.backward = input_dim, hidden_dim, backward
        G = self.gates * hidden_dim
        self.Wx = nn.Parameter(torch.empty(input_dim, G))
        self.Wh = nn.Parameter(torch.empty(hidden_dim, G))
        self.b = nn.Parameter(torch.empty(G))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The courses' scaling: weights ~ N(0, 1/fan_in) keep pre-activations O(1) at the start.
        with torch.no_grad():
            self.Wx.normal_(0.0, 1.0 / math.sqrt(self.input_dim))
            self.Wh.normal_(0.0, 1.0 / math.sqrt(self.hidden_dim))
            self.b.zero_()

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, backward={self.backward!r}"

    def fuses_steps(self) -> bool:
        """Whether ``step`` takes the fused path: no autograd graph to record, no tracer (the export traces the
        course's step functions), and weights that keep a version counter (not made under inference_mode), by which
        the stacked copy knows it is current."""
        return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                    or self.Wx.is_inference())

    def stacked_weights(self, *weights: Tensor) -> Tensor:
        """The weights stacked row-wise, e.g. [Wx; Wh] (D + H, G), in the dtype the step computes in (autocast's
        when on); kept for the steps of one decoding (:meth:`forget_stacked`) while the weights' version counters
        and storage stay the same."""
        device_type = weights[0].device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weights[0].dtype
        key = (dtype, torch.is_inference_mode_enabled(), *((w._version, w.data_ptr()) for w in weights))
        cached = self.__dict__.get("_stacked")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.cat(weights, dim=0).to(dtype))
            self.__dict__["_stacked"] = cached
        return cached[1]

    def forget_stacked(self) -> None:
        """Drop the stacked copy: the next step stacks the weights as they are then. Every decoding starts with this
        (``CaptioningRNN.init_state``): a fused optimizer (``AdamW(fused=True)``) updates the weights in place
        without bumping their version counters, so between two decodings the counters cannot tell."""
        self.__dict__.pop("_stacked", None)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_stacked", None)  # a cache, not part of the module (pickling, deepcopy)
        return state


class RNN(_Recurrent):
    """Vanilla RNN layer: ``forward(x (N, T, D), h0 (N, H)) -> h (N, T, H)``."""

    def forward(self, x: Tensor, h0: Tensor) -> Tensor:
        forward = rnn_forward_manual if self.backward == "manual" else rnn_forward
        return forward(x, h0, self.Wx, self.Wh, self.b)

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        """x (N, D), h (N, H) -> next h (N, H)."""
        return rnn_step_forward(x, h, self.Wx, self.Wh, self.b)


class LSTM(_Recurrent):
    """LSTM layer with c0 = 0: ``forward(x (N, T, D), h0 (N, H)) -> h (N, T, H)``."""

    gates = 4

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # A forget-gate bias of 1 lets the cell state carry information early in training.
        with torch.no_grad():
            self.b[self.hidden_dim : 2 * self.hidden_dim].fill_(1.0)

    def forward(self, x: Tensor, h0: Tensor) -> Tensor:
        forward = lstm_forward_manual if self.backward == "manual" else lstm_forward
        return forward(x, h0, self.Wx, self.Wh, self.b)

    def step(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, D), h, c (N, H) -> next (h, c)."""
        if not self.fuses_steps():
            return lstm_step_forward(x, h, c, self.Wx, self.Wh, self.b)
        W_xh = self.stacked_weights(self.Wx, self.Wh)
        return lstm_step_fused(*_cast(W_xh.dtype, x, h, c), W_xh, self.b.to(W_xh.dtype))


class AttentionLSTM(LSTM):
    """LSTM attending over a projected feature map A (N, H, Dh, Dw) at every step."""

    def __init__(self, input_dim: int, hidden_dim: int, backward: str = "autograd") -> None:
        super().__init__(input_dim, hidden_dim, backward)
        self.Wattn = nn.Parameter(torch.empty(hidden_dim, 4 * hidden_dim))
        with torch.no_grad():
            self.Wattn.normal_(0.0, 1.0 / math.sqrt(hidden_dim))

    def forward(self, x: Tensor, A: Tensor) -> Tensor:
        """x (N, T, D), A (N, H, Dh, Dw) -> h (N, T, H)."""
        forward = attention_lstm_forward_manual if self.backward == "manual" else attention_lstm_forward
        return forward(x, A, self.Wx, self.Wh, self.Wattn, self.b)

    def step(  # type: ignore[override]
        self, x: Tensor, h: Tensor, c: Tensor, A: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, D), h, c (N, H), A (N, H, Dh, Dw) -> next h, next c (N, H), attention weights (N, Dh, Dw)."""
        if not self.fuses_steps():
            attn, weights = dot_product_attention(h, A)
            h, c = attention_lstm_step_forward(x, h, c, attn, self.Wx, self.Wh, self.Wattn, self.b)
            return h, c, weights
        step = self.step_fused(x, h, c, A)
        return step.h, step.c, step.weights.view(A.shape[0], *A.shape[2:])

    def step_fused(self, x: Tensor, h: Tensor, c: Tensor, A: Tensor) -> AttentionStep:
        """The step without gradients, with what ``bptt.attention_lstm_replay`` needs to differentiate it later."""
        with torch.no_grad():
            W_all = self.stacked_weights(self.Wx, self.Wh, self.Wattn)
            x, h, c, A = _cast(W_all.dtype, x, h, c, A)
            return attention_lstm_step_fused(x, h, c, A.flatten(2), W_all, self.b.to(W_all.dtype))


def _cast(dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(dtype) for t in tensors)
