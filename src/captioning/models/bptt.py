"""Hand-written backward passes: backpropagation through time for the recurrent cores.

``rnn_forward_manual``, ``lstm_forward_manual`` and ``attention_lstm_forward_manual`` compute exactly what
``captioning.models.rnn``'s ``rnn_forward``, ``lstm_forward`` and ``attention_lstm_forward`` compute, but
as ``torch.autograd.Function``s whose backward is BPTT written out as in the courses' ``rnn_backward`` /
``lstm_backward``: walk the steps backwards carrying ``dh`` (and ``dc``) and produce the pre-activation
gradient ``da`` of every step. Unlike the courses, nothing is accumulated per step: ``da`` of all steps
lands in one (T, N, G*H) buffer, and the parameter gradients are then ONE matmul each over all steps::

    dWx = x_flat^T @ da_flat        dWh = h_prev_flat^T @ da_flat        db = da_flat.sum(0)
    dx  = da_flat @ Wx^T            (x_flat, h_prev_flat, da_flat: the (T*N, .) views of the buffers)

so only ``da_t @ Wh^T`` (the recurrence itself) remains inside the backward loop. Why it is fast:

- Buffers are time-major (T, N, .), so every step's slice is contiguous and the all-steps views are free.
- The forward computes the input projection of all steps in one matmul into the gate buffer, adds
  ``h_{t-1} Wh`` into it in place, and applies the gate non-linearities in place: the buffer ends up
  holding the gate activations, which is what backward needs. The RNN and LSTM loops allocate nothing.
- The forward keeps every step's tanh(c_t) (one (T, N, H) buffer); backward recomputes the other cheap
  things (the gate derivatives) step by step from the saved activations, on slices that are in cache,
  into scratch buffers allocated once: the loop body is a few in-place element-wise ops and one matmul.
- On CPU, tanh of large tensors and of the g gate's strided slice is computed as 2 sigmoid(2x) - 1:
  torch's tanh kernel costs ~6x a sigmoid, and ~3x more again on a strided slice.

All of them work in any float dtype. Under autocast they run in the autocast dtype (as autocast would run
the matmuls). The hand-written backward is not itself differentiable (no double backward). The fused
vocabulary projection + loss, the other hand-written backward, is in :mod:`captioning.models.loss`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import gemm

__all__ = [
    "AttentionStep",
    "attention_lstm_replay",
    "attention_lstm_step_fused",
    "lstm_step_fused",
    "rnn_forward_manual",
    "lstm_forward_manual",
    "attention_lstm_forward_manual",
]


# ---------------------------------------------------------------------------------------------------
# Input handling shared by the public functions
def _prepare(name: str, tensors: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], str]:
    """Check the inputs share one float dtype and device; under autocast cast them to the autocast dtype.

    Returns the (possibly cast) tensors and the device type, whose autocast the caller switches off
    around the Function: its in-place ops into preallocated buffers need one dtype throughout.
    """
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        tensors = tuple(t.to(dtype) for t in tensors)
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) != 1 or not tensors[0].is_floating_point() or len(devices) != 1:
        raise ValueError(
            f"{name}: all inputs must be floating-point tensors of one dtype on one device, got dtypes "
            f"{sorted(str(d) for d in dtypes)} on {sorted(str(d) for d in devices)}; cast the model and its "
            "inputs together (model.to(dtype)) or use autocast."
        )
    return tensors, device_type


def _check_sequence(name: str, x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor, gates: int) -> None:
    if x.dim() != 3 or h0.dim() != 2 or h0.shape[0] != x.shape[0] or x.shape[1] == 0:
        raise ValueError(f"{name}: expected x (N, T, D) with T >= 1 and h0 (N, H), got {tuple(x.shape)} and "
                         f"{tuple(h0.shape)}.")
    D, H = x.shape[2], h0.shape[1]
    expected = {"Wx": (D, gates * H), "Wh": (H, gates * H), "b": (gates * H,)}
    for key, tensor in (("Wx", Wx), ("Wh", Wh), ("b", b)):
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"{name}: {key} must have shape {expected[key]} for x {tuple(x.shape)} and "
                             f"h0 {tuple(h0.shape)}, got {tuple(tensor.shape)}.")


def _compiled(t: Tensor):
    """The compiled loops (kernels.py) for this tensor, or None: imported here so that
    ``python -m captioning.models.kernels`` runs a module not yet imported."""
    from .kernels import for_tensor

    return for_tensor(t)


def _onednn(t: Tensor) -> bool:
    """Whether the compiled loop's products go to oneDNN, as gemm.py's would for this tensor."""
    return gemm.onednn_available() and gemm.onednn_dtype(t.dtype)


def _time_major(x: Tensor) -> Tensor:
    """x (N, T, D) -> a contiguous time-major copy viewed as (T*N, D): row t*N + n is x[n, t]."""
    N, T, D = x.shape
    return x.transpose(0, 1).reshape(T * N, D)


def _batch_major(h_tm: Tensor) -> Tensor:
    """Time-major (T, N, H) -> a fresh contiguous (N, T, H), so callers never hold a view of saved buffers."""
    return h_tm.transpose(0, 1).contiguous()


def _input_gradients(ctx_needs: tuple[bool, ...], x_tm: Tensor, da: Tensor, Wx: Tensor, N: int) -> tuple:
    """dx (N, T, D), dWx (D, G), db (G,) from da (T, N, G) in one matmul each (None where not needed)."""
    T, _, G = da.shape
    da_flat = da.view(T * N, G)
    dx = gemm.mm(da_flat, Wx.t()).view(T, N, -1).transpose(0, 1) if ctx_needs[0] else None
    dWx = gemm.mm(x_tm.t(), da_flat) if ctx_needs[2] else None
    db = da_flat.sum(0) if ctx_needs[-1] else None
    return dx, dWx, db


def _input_projection(x_tm: Tensor, Wx: Tensor, b: Tensor, T: int, N: int) -> Tensor:
    """Every step's ``x_t Wx + b`` in one matmul: (T, N, G)."""
    return gemm.linear(x_tm, Wx.t(), b).view(T, N, -1)


def _time_major_grads(dh_out: Tensor) -> Tensor:
    """The incoming gradient (N, T, H) as a contiguous time-major (T, N, H): every step's slice contiguous."""
    return dh_out.transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------
# Vanilla RNN
class _RNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
        N, T, _ = x.shape
        H = h0.shape[1]
        x_tm = _time_major(x)
        xw = _input_projection(x_tm, Wx, b, T, N)  # every step's input projection in one matmul
        hs = x.new_empty(T + 1, N, H)  # hs[0] = h0, hs[t + 1] = h_t
        hs[0] = h0
        for t in range(T):
            _tanh(gemm.addmm(xw[t], hs[t], Wh), out=hs[t + 1])
        ctx.save_for_backward(x_tm, Wx, Wh, hs)
        return _batch_major(hs[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, dh_out: Tensor) -> tuple:
        x_tm, Wx, Wh, hs = ctx.saved_tensors
        T1, N, H = hs.shape
        T = T1 - 1
        WhT = Wh.t()
        # da starts as tanh'(a) = 1 - h^2 for every step at once, then is scaled by dh step by step.
        da = torch.mul(hs[1:], hs[1:]).neg_().add_(1.0)
        dh_tm = _time_major_grads(dh_out)
        dh = dh_tm[T - 1]
        for t in range(T - 1, -1, -1):
            da[t].mul_(dh)
            if t:
                dh = gemm.addmm(dh_tm[t - 1], da[t], WhT)  # upstream grad + recurrent grad
        dx, dWx, db = _input_gradients(ctx.needs_input_grad, x_tm, da, Wx, N)
        dh0 = gemm.mm(da[0], WhT) if ctx.needs_input_grad[1] else None
        dWh = gemm.mm(hs[:-1].reshape(T * N, H).t(), da.view(T * N, H)) if ctx.needs_input_grad[3] else None
        return dx, dh0, dWx, dWh, db


# ---------------------------------------------------------------------------------------------------
# LSTM (and the gate arithmetic the attention LSTM shares)
# Below this many elements torch.tanh's single op beats the four of the sigmoid form (per-op overhead).
_SIGMOID_TANH_MIN_ELEMENTS = 8192


def _sigmoid_tanh_pays(t: Tensor) -> bool:
    """Whether tanh(t) is cheaper as 2 sigmoid(2t) - 1: on CPU torch's tanh kernel costs ~6x a sigmoid
    per element (profiled), which outweighs three extra ops on large tensors; on GPUs tanh is cheap and
    every extra op is another kernel launch."""
    return t.device.type == "cpu" and t.numel() >= _SIGMOID_TANH_MIN_ELEMENTS


def _tanh(t: Tensor, out: Tensor) -> Tensor:
    """tanh(t) into out, as 2 sigmoid(2t) - 1 (the same function to rounding) where that is faster."""
    if _sigmoid_tanh_pays(t):
        return torch.mul(t, 2.0, out=out).sigmoid_().mul_(2.0).sub_(1.0)
    return torch.tanh(t, out=out)


def _lstm_cell_forward(a: Tensor, c_prev: Tensor, c: Tensor, tanh_c: Tensor, h: Tensor) -> None:
    """In place: pre-activations a (N, 4H) -> gate activations; writes c, tanh(c) and h (each (N, H)).

    Gates are packed i, f, o, g (the courses' order); on CPU g = tanh(a_g) is computed as
    2 sigmoid(2 a_g) - 1 so that one sigmoid pass covers all four gates (at every size: torch's tanh of
    the strided g slice costs ~3x its tanh of a contiguous tensor, which is already ~6x a sigmoid).
    """
    H = c.shape[1]
    if a.device.type == "cpu":
        a[:, 3 * H :].mul_(2.0)
        a.sigmoid_()
        a[:, 3 * H :].mul_(2.0).sub_(1.0)
    else:
        a[:, : 3 * H].sigmoid_()
        a[:, 3 * H :].tanh_()
    i, f, o, g = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, g)
    _tanh(c, out=tanh_c)
    torch.mul(o, tanh_c, out=h)


class _LSTMBackwardStep:
    """One step of LSTM BPTT with its scratch buffers allocated once per backward pass.

    Given the step's gate activations (N, 4H) packed i, f, o, g, the previous cell state c_prev and the
    forward's tanh(c_t) (N, H), the gradient dh reaching h_t and dc reaching c_t from later steps, it writes
    the pre-activation gradient da (N, 4H) and leaves the gradient reaching c_{t-1} in dc::

        dc += dh * o * (1 - tanh(c)^2)
        da_i = dc * g * i(1-i)      da_f = dc * c_prev * f(1-f)
        da_o = dh * tanh(c) * o(1-o)    da_g = dc * i * (1 - g^2)       dc_prev = dc * f

    Everything is computed from the saved activations on the step's (cache-resident) slices, in ~15
    element-wise ops; precomputing the factors for all steps at once costs memory and passes over cold
    buffers (profiled: 3x slower at N=128, H=512).
    """

    def __init__(self, like: Tensor) -> None:
        N, H4 = like.shape
        self.H = H4 // 4
        self.dsig = like.new_empty(N, 3 * self.H)
        self.tmp = like.new_empty(N, self.H)
        self.ones = like.new_ones(N, self.H)

    def __call__(self, gates: Tensor, c_prev: Tensor, tanh_c: Tensor, dh: Tensor, dc: Tensor, da: Tensor) -> None:
        H, tmp, dsig, ones = self.H, self.tmp, self.dsig, self.ones
        i, f, o, g = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H], gates[:, 3 * H :]
        torch.addcmul(ones, tanh_c, tanh_c, value=-1.0, out=tmp).mul_(o)
        dc.addcmul_(tmp, dh)
        sig = gates[:, : 3 * H]
        torch.addcmul(sig, sig, sig, value=-1.0, out=dsig)  # sigmoid' = s - s^2 for i, f, o at once
        torch.mul(dsig[:, :H], g, out=da[:, :H]).mul_(dc)
        torch.mul(dsig[:, H : 2 * H], c_prev, out=da[:, H : 2 * H]).mul_(dc)
        torch.mul(dsig[:, 2 * H :], tanh_c, out=da[:, 2 * H : 3 * H]).mul_(dh)
        torch.addcmul(ones, g, g, value=-1.0, out=tmp).mul_(i)
        torch.mul(tmp, dc, out=da[:, 3 * H :])
        dc.mul_(f)


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
        N, T, _ = x.shape
        H = h0.shape[1]
        x_tm = _time_major(x)
        compiled = _compiled(x)
        ctx.compiled = compiled is not None
        if compiled is not None:  # the same loop in C++ (kernels.py)
            hs, cs, tanh_cs, *gates = compiled.lstm_forward(x_tm, h0, Wx, Wh, b, _onednn(x))
            ctx.save_for_backward(x_tm, Wx, Wh, hs, cs, tanh_cs, *gates)
            return _batch_major(hs[1:])
        xw = _input_projection(x_tm, Wx, b, T, N)
        hs = x.new_empty(T + 1, N, H)
        cs = x.new_empty(T + 1, N, H)
        hs[0] = h0
        cs[0].zero_()
        tanh_cs = x.new_empty(T, N, H)  # tanh(c_t), which backward needs
        gates = []  # each step's pre-activations (N, 4H), turned into the gate activations in place
        for t in range(T):
            gates.append(gemm.addmm(xw[t], hs[t], Wh))
            _lstm_cell_forward(gates[t], cs[t], cs[t + 1], tanh_cs[t], hs[t + 1])
        ctx.save_for_backward(x_tm, Wx, Wh, hs, cs, tanh_cs, *gates)
        return _batch_major(hs[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, dh_out: Tensor) -> tuple:
        x_tm, Wx, Wh, hs, cs, tanh_cs, *gates = ctx.saved_tensors
        T1, N, H = hs.shape
        T = T1 - 1
        if ctx.compiled:
            dx, dh0, dWx, dWh, db = _compiled(x_tm).lstm_backward(
                _time_major_grads(dh_out), x_tm, Wx, Wh, hs, cs, tanh_cs, gates, list(ctx.needs_input_grad),
                _onednn(x_tm))
            return None if dx is None else dx.view(T, N, -1).transpose(0, 1), dh0, dWx, dWh, db
        WhT = Wh.t()
        step = _LSTMBackwardStep(gates[0])
        da = gates[0].new_empty(T, N, 4 * H)
        dh_tm = _time_major_grads(dh_out)
        dh = dh_tm[T - 1].clone()
        dc = torch.zeros_like(dh)
        for t in range(T - 1, -1, -1):
            step(gates[t], cs[t], tanh_cs[t], dh, dc, da[t])
            if t:
                dh = gemm.addmm(dh_tm[t - 1], da[t], WhT)
        dx, dWx, db = _input_gradients(ctx.needs_input_grad, x_tm, da, Wx, N)
        dh0 = gemm.mm(da[0], WhT) if ctx.needs_input_grad[1] else None
        dWh = gemm.mm(hs[:-1].reshape(T * N, H).t(), da.view(T * N, 4 * H)) if ctx.needs_input_grad[3] else None
        return dx, dh0, dWx, dWh, db


# ---------------------------------------------------------------------------------------------------
# Attention LSTM
class _AttentionLSTMFunction(torch.autograd.Function):
    """h0 = c0 = mean of A; every step attends with h_{t-1} over A and adds ``attn Wattn``.

    The recurrent input of a step is the pair [h_{t-1}, attn_t] (N, 2H), kept in one buffer hx (T+1, N, 2H)
    so that ``[h, attn] @ [Wh; Wattn]`` is one matmul per step forward and ``da @ [Wh; Wattn]^T`` one per
    step backward, and dWh, dWattn come out of a single matmul over all steps.
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, Wx: Tensor, Wh: Tensor, Wattn: Tensor, b: Tensor) -> Tensor:
        N, T, _ = x.shape
        H = A.shape[1]
        A_flat = A.reshape(N, H, -1)  # (N, H, P)
        P = A_flat.shape[2]
        scale = 1.0 / math.sqrt(H)
        W_ha = torch.cat([Wh, Wattn], dim=0)  # (2H, 4H)
        x_tm = _time_major(x)
        ctx.A_shape = A.shape
        compiled = _compiled(x)
        ctx.compiled = compiled is not None
        if compiled is not None:  # the same loop in C++ (kernels.py)
            hx, cs, tanh_cs, weights, *gates = compiled.attention_lstm_forward(x_tm, A_flat, Wx, W_ha, b,
                                                                               _onednn(x))
            ctx.save_for_backward(x_tm, A_flat, Wx, W_ha, hx, cs, tanh_cs, weights, *gates)
            return _batch_major(hx[1:, :, :H])
        xw = _input_projection(x_tm, Wx, b, T, N)
        gates = []
        hx = x.new_zeros(T + 1, N, 2 * H)  # hx[t] = [h_t, attn_{t+1}]; hx[T, :, H:] stays 0
        cs = x.new_empty(T + 1, N, H)
        weights = x.new_empty(T, N, P)
        h0 = A_flat.mean(dim=2)
        hx[0, :, :H] = h0
        cs[0] = h0
        tanh_cs, h_next = x.new_empty(T, N, H), x.new_empty(N, H)
        for t in range(T):
            h, attn = hx[t, :, :H], hx[t, :, H:]
            scores = torch.bmm(h.unsqueeze(1), A_flat).squeeze(1).mul_(scale)
            weights[t] = scores.softmax(dim=1)
            # (1, P) @ (P, H) per image: the row-vector form is ~6x faster on CPU than A (H, P) @ w (P, 1)
            attn.copy_(torch.bmm(weights[t].unsqueeze(1), A_flat.transpose(1, 2)).squeeze(1))
            gates.append(gemm.addmm(xw[t], hx[t], W_ha))
            _lstm_cell_forward(gates[t], cs[t], cs[t + 1], tanh_cs[t], h_next)
            hx[t + 1, :, :H] = h_next
        ctx.save_for_backward(x_tm, A_flat, Wx, W_ha, hx, cs, tanh_cs, weights, *gates)
        return _batch_major(hx[1:, :, :H])

    @staticmethod
    @once_differentiable
    def backward(ctx, dh_out: Tensor) -> tuple:
        x_tm, A_flat, Wx, W_ha, hx, cs, tanh_cs, weights, *gates = ctx.saved_tensors
        return _attention_lstm_bptt(ctx.needs_input_grad, dh_out, x_tm, A_flat, Wx, W_ha, hx[:-1], cs, tanh_cs,
                                    weights, gates, ctx.A_shape)


def _attention_lstm_bptt(needs: tuple[bool, ...], dh_out: Tensor, x_tm: Tensor, A_flat: Tensor, Wx: Tensor,
                         W_ha: Tensor, hx: Tensor, cs: Tensor, tanh_cs: Tensor, weights: Tensor,
                         gates: list[Tensor] | Tensor, A_shape: torch.Size) -> tuple:
    """BPTT of the attention LSTM from a forward's saved tensors: hx (T, N, 2H) the steps' [h_{t-1}, attn_t],
    cs (>= T, N, H) with cs[t] = c_{t-1}, tanh_cs (T, N, H), weights (T, N, P), gates (T of (N, 4H))
    -> the gradients of (x, A, Wx, Wh, Wattn, b), None where ``needs`` says no. Runs the compiled loop
    (kernels.py) on CPU when built."""
    compiled = _compiled(hx)
    if compiled is not None:
        gates = list(gates)
        dx, dA, dWx, dWh, dWattn, db = compiled.attention_lstm_backward(
            _time_major_grads(dh_out), x_tm, A_flat, Wx, W_ha, hx, cs, tanh_cs, weights, gates, list(needs[:6]),
            _onednn(x_tm))
        T, N = len(gates), gates[0].shape[0]
        return (None if dx is None else dx.view(T, N, -1).transpose(0, 1), None if dA is None else dA.view(A_shape),
                dWx, dWh, dWattn, db)
    T, N, H2 = hx.shape
    H, P = H2 // 2, A_flat.shape[2]
    scale = 1.0 / math.sqrt(H)
    W_haT = W_ha.t()
    step = _LSTMBackwardStep(gates[0])
    da = gates[0].new_empty(T, N, 4 * H)
    dhx = torch.empty(T, N, 2 * H, dtype=hx.dtype, device=hx.device)  # grads of [h_{t-1}, attn_t]
    dscores = torch.empty_like(weights)
    dh_tm = _time_major_grads(dh_out)
    dh = dh_tm[T - 1].clone()
    dc = torch.zeros_like(dh)
    for t in range(T - 1, -1, -1):
        step(gates[t], cs[t], tanh_cs[t], dh, dc, da[t])
        dhx[t] = gemm.mm(da[t], W_haT)
        # attn_t = A softmax(A^T h_{t-1} / sqrt(H)): back through the weighted sum and the softmax.
        w = weights[t]
        dw = torch.bmm(dhx[t, :, H:].unsqueeze(1), A_flat).squeeze(1)  # (N, P)
        dw.sub_((dw * w).sum(1, keepdim=True)).mul_(w)
        dscores[t] = dw
        dh_attn = torch.bmm(dw.unsqueeze(1), A_flat.transpose(1, 2)).squeeze(1)
        # the gradient reaching h_{t-1}: its own output's, the recurrence's and the attention's
        if t:
            torch.add(dh_tm[t - 1], dhx[t, :, :H], out=dh)
        else:
            dh.copy_(dhx[t, :, :H])
        dh.add_(dh_attn, alpha=scale)
    # dA from every step's weighted sum and scores, in two batched matmuls over the steps, and from
    # h0 = c0 = mean(A).
    dA = None
    if needs[1]:
        dA = torch.bmm(dhx[:, :, H:].permute(1, 2, 0), weights.transpose(0, 1))  # (N, H, P)
        dA.baddbmm_(hx[:T, :, :H].permute(1, 2, 0), dscores.transpose(0, 1), alpha=scale)
        dA.add_(((dh + dc) / P).unsqueeze(2))
        dA = dA.view(A_shape)
    dx, dWx, db = _input_gradients(needs, x_tm, da, Wx, N)
    dWh = dWattn = None
    if needs[3] or needs[4]:
        dW_ha = gemm.mm(hx[:T].reshape(T * N, 2 * H).t(), da.view(T * N, 4 * H))
        dWh, dWattn = dW_ha[:H], dW_ha[H:]
    return dx, dA, dWx, dWh, dWattn, db


# ---------------------------------------------------------------------------------------------------
# Decoding steps without gradients: the same cells, one GEMM per step
def lstm_step_fused(x: Tensor, h: Tensor, c: Tensor, W_xh: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``rnn.lstm_step_forward`` for decoding: ``a = [x, h] [Wx; Wh] + b`` in one product, the gates in place.

    x (N, D), h, c (N, H), W_xh (D + H, 4H) = [Wx; Wh], b (4H,) -> next h, next c (N, H). No autograd graph:
    the in-place gate arithmetic is the sequence forward's (``_lstm_cell_forward``).
    """
    a = gemm.linear(torch.cat([x, h], dim=1), W_xh.t(), b)
    next_h, next_c, tanh_c = torch.empty_like(h), torch.empty_like(c), torch.empty_like(c)
    _lstm_cell_forward(a, c, next_c, tanh_c, next_h)
    return next_h, next_c


class AttentionStep(NamedTuple):
    """One fused attention-LSTM step, with what its BPTT needs (``_AttentionLSTMFunction``'s saved tensors)."""

    h: Tensor  # (N, H) next hidden state
    c: Tensor  # (N, H) next cell state
    weights: Tensor  # (N, P) attention weights over the positions
    hx: Tensor  # (N, 2H) [h_{t-1}, attn_t], the recurrent input
    gates: Tensor  # (N, 4H) gate activations i, f, o, g
    tanh_c: Tensor  # (N, H) tanh(next c)


def attention_lstm_step_fused(x: Tensor, h: Tensor, c: Tensor, A_flat: Tensor, W_all: Tensor, b: Tensor
                              ) -> AttentionStep:
    """``rnn.attention_lstm_step_forward`` after ``dot_product_attention``, for decoding: the attention over
    A_flat (N, H, P) with h, then ``a = [x, h, attn] [Wx; Wh; Wattn] + b`` in one product and the gates in place.

    x (N, D), h, c (N, H), W_all (D + 2H, 4H), b (4H,). No autograd graph; the returned step also holds what
    :func:`attention_lstm_replay` needs to differentiate a sequence of such steps without running it again.
    """
    H = h.shape[1]
    scores = torch.bmm(h.unsqueeze(1), A_flat).squeeze(1).mul_(1.0 / math.sqrt(H))
    weights = scores.softmax(dim=1)
    attn = torch.bmm(weights.unsqueeze(1), A_flat.transpose(1, 2)).squeeze(1)
    hx = torch.cat([h, attn], dim=1)
    gates = gemm.linear(torch.cat([x, hx], dim=1), W_all.t(), b)
    next_h, next_c, tanh_c = torch.empty_like(h), torch.empty_like(c), torch.empty_like(c)
    _lstm_cell_forward(gates, c, next_c, tanh_c, next_h)
    return AttentionStep(next_h, next_c, weights, hx, gates, tanh_c)


class _AttentionLSTMReplay(torch.autograd.Function):
    """The sequence of recorded fused steps as the function of (x, A, weights) that produced it: the forward
    returns the recorded hidden states, the backward is the attention LSTM's BPTT on the recorded tensors."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, Wx: Tensor, Wh: Tensor, Wattn: Tensor, b: Tensor,
                steps: tuple[AttentionStep, ...]) -> Tensor:
        N, T, _ = x.shape
        A_flat = A.reshape(N, A.shape[1], -1)
        cs = torch.stack([A_flat.mean(dim=2), *(s.c for s in steps[:-1])])  # cs[t] = c_{t-1}, c_{-1} = h0
        ctx.save_for_backward(_time_major(x), A_flat, Wx, torch.cat([Wh, Wattn], dim=0),
                              torch.stack([s.hx for s in steps]), cs, torch.stack([s.tanh_c for s in steps]),
                              torch.stack([s.weights for s in steps]), *(s.gates for s in steps))
        ctx.A_shape = A.shape
        return torch.stack([s.h for s in steps], dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh_out: Tensor) -> tuple:
        x_tm, A_flat, Wx, W_ha, hx, cs, tanh_cs, weights, *gates = ctx.saved_tensors
        return (*_attention_lstm_bptt(ctx.needs_input_grad[:6], dh_out, x_tm, A_flat, Wx, W_ha, hx, cs, tanh_cs,
                                      weights, gates, ctx.A_shape), None)


def attention_lstm_replay(x: Tensor, A: Tensor, Wx: Tensor, Wh: Tensor, Wattn: Tensor, b: Tensor,
                          steps: list[AttentionStep]) -> Tensor:
    """Differentiate decoding steps already taken, without taking them again: x (N, T, D) the inputs the T
    steps of :func:`attention_lstm_step_fused` were fed (from h0 = c0 = mean of A, as the sequence forward
    starts), A (N, H, Dh, Dw) -> their hidden states (N, T, H), equal to
    ``attention_lstm_forward_manual(x, A, ...)`` up to rounding, with the same hand-written backward.

    Self-critical training samples with the fused steps and gets the policy gradient from this: the
    teacher-forced forward over the samples, most of its step, is not run again.
    """
    if len(steps) != x.shape[1]:
        raise ValueError(f"attention_lstm_replay: x has {x.shape[1]} steps but {len(steps)} were recorded.")
    tensors, device_type = _prepare("attention_lstm_replay", (x, A, Wx, Wh, Wattn, b))
    with torch.autocast(device_type, enabled=False):
        return _AttentionLSTMReplay.apply(*tensors, tuple(steps))


# ---------------------------------------------------------------------------------------------------
# Public functions: same signatures and results as captioning.models.rnn's
def rnn_forward_manual(x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
    """``rnn_forward`` with hand-written BPTT: x (N, T, D), h0 (N, H), Wx (D, H), Wh (H, H), b (H,) -> h (N, T, H)."""
    _check_sequence("rnn_forward_manual", x, h0, Wx, Wh, b, gates=1)
    tensors, device_type = _prepare("rnn_forward_manual", (x, h0, Wx, Wh, b))
    with torch.autocast(device_type, enabled=False):
        return _RNNFunction.apply(*tensors)


def lstm_forward_manual(x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
    """``lstm_forward`` (c0 = 0) with hand-written BPTT: x (N, T, D), h0 (N, H), Wx (D, 4H), Wh (H, 4H),
    b (4H,) -> h (N, T, H)."""
    _check_sequence("lstm_forward_manual", x, h0, Wx, Wh, b, gates=4)
    tensors, device_type = _prepare("lstm_forward_manual", (x, h0, Wx, Wh, b))
    with torch.autocast(device_type, enabled=False):
        return _LSTMFunction.apply(*tensors)


def attention_lstm_forward_manual(
    x: Tensor, A: Tensor, Wx: Tensor, Wh: Tensor, Wattn: Tensor, b: Tensor
) -> Tensor:
    """``attention_lstm_forward`` with hand-written BPTT: x (N, T, D), A (N, H, Dh, Dw) -> h (N, T, H)."""
    if A.dim() != 4 or A.shape[2] * A.shape[3] == 0:
        raise ValueError(f"attention_lstm_forward_manual: A must be (N, H, Dh, Dw) with Dh, Dw >= 1, got "
                         f"{tuple(A.shape)}.")
    _check_sequence("attention_lstm_forward_manual", x, A[:, :, 0, 0], Wx, Wh, b, gates=4)
    if Wattn.shape != Wh.shape:
        raise ValueError(f"attention_lstm_forward_manual: Wattn must have shape {tuple(Wh.shape)}, "
                         f"got {tuple(Wattn.shape)}.")
    tensors, device_type = _prepare("attention_lstm_forward_manual", (x, A, Wx, Wh, Wattn, b))
    with torch.autocast(device_type, enabled=False):
        return _AttentionLSTMFunction.apply(*tensors)
