"""The hand-written recurrent core against per-element NumPy formulas and autograd (float64)."""

import math

import numpy as np
import pytest
import torch

from captioning.models import rnn

torch.manual_seed(0)


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


def _rand(*shape, requires_grad=True, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_(requires_grad)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def rel_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b)))


def norm_rel_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(1e-12, np.linalg.norm(a) + np.linalg.norm(b))


# --- reference implementations, written per element with NumPy ----------------------------------
def np_rnn_step(x, h, Wx, Wh, b):
    N, H = h.shape
    out = np.zeros((N, H))
    for n in range(N):
        for j in range(H):
            out[n, j] = math.tanh(sum(x[n, d] * Wx[d, j] for d in range(x.shape[1]))
                                  + sum(h[n, k] * Wh[k, j] for k in range(H)) + b[j])
    return out


def np_lstm_step(x, h, c, Wx, Wh, b, attn=None, Wattn=None):
    H = h.shape[1]
    a = x @ Wx + h @ Wh + b
    if attn is not None:
        a = a + attn @ Wattn
    i, f, o, g = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H]), _sigmoid(a[:, 2 * H:3 * H]), np.tanh(a[:, 3 * H:])
    next_c = f * c + i * g
    return o * np.tanh(next_c), next_c


def np_attention(h, A):
    N, H, Dh, Dw = A.shape
    attn, weights = np.zeros((N, H)), np.zeros((N, Dh, Dw))
    for n in range(N):
        scores = np.array([[h[n] @ A[n, :, y, x] / math.sqrt(H) for x in range(Dw)] for y in range(Dh)])
        e = np.exp(scores - scores.max())
        weights[n] = e / e.sum()
        attn[n] = sum(weights[n, y, x] * A[n, :, y, x] for y in range(Dh) for x in range(Dw))
    return attn, weights


# --- the courses' fixed-input checks ------------------------------------------------------------
def test_rnn_step_forward_matches_courses_values():
    # CS231n RNN_Captioning.ipynb, "Vanilla RNN: step forward".
    N, D, H = 3, 10, 4
    x = np.linspace(-0.4, 0.7, num=N * D).reshape(N, D)
    prev_h = np.linspace(-0.2, 0.5, num=N * H).reshape(N, H)
    Wx = np.linspace(-0.1, 0.9, num=D * H).reshape(D, H)
    Wh = np.linspace(-0.3, 0.7, num=H * H).reshape(H, H)
    b = np.linspace(-0.2, 0.4, num=H)
    next_h = rnn.rnn_step_forward(_t(x), _t(prev_h), _t(Wx), _t(Wh), _t(b))
    expected = np.asarray([
        [-0.58172089, -0.50182032, -0.41232771, -0.31410098],
        [0.66854692, 0.79562378, 0.87755553, 0.92795967],
        [0.97934501, 0.99144213, 0.99646691, 0.99854353]])
    assert rel_error(next_h, expected) < 1e-7
    assert rel_error(next_h, np_rnn_step(x, prev_h, Wx, Wh, b)) < 1e-10


def test_lstm_step_forward_matches_courses_values():
    # CS231n LSTM_Captioning.ipynb, "LSTM: step forward".
    N, D, H = 3, 4, 5
    x = np.linspace(-0.4, 1.2, num=N * D).reshape(N, D)
    prev_h = np.linspace(-0.3, 0.7, num=N * H).reshape(N, H)
    prev_c = np.linspace(-0.4, 0.9, num=N * H).reshape(N, H)
    Wx = np.linspace(-2.1, 1.3, num=4 * D * H).reshape(D, 4 * H)
    Wh = np.linspace(-0.7, 2.2, num=4 * H * H).reshape(H, 4 * H)
    b = np.linspace(0.3, 0.7, num=4 * H)
    next_h, next_c = rnn.lstm_step_forward(*map(_t, (x, prev_h, prev_c, Wx, Wh, b)))
    expected_h = np.asarray([
        [0.24635157, 0.28610883, 0.32240467, 0.35525807, 0.38474904],
        [0.49223563, 0.55611431, 0.61507696, 0.66844003, 0.7159181],
        [0.56735664, 0.66310127, 0.74419266, 0.80889665, 0.858299]])
    expected_c = np.asarray([
        [0.32986176, 0.39145139, 0.451556, 0.51014116, 0.56717407],
        [0.66382255, 0.76674007, 0.87195994, 0.97902709, 1.08751345],
        [0.74192008, 0.90592151, 1.07717006, 1.25120233, 1.42395676]])
    assert rel_error(next_h, expected_h) < 1e-7
    assert rel_error(next_c, expected_c) < 1e-7
    ref_h, ref_c = np_lstm_step(x, prev_h, prev_c, Wx, Wh, b)
    assert rel_error(next_h, ref_h) < 1e-10 and rel_error(next_c, ref_c) < 1e-10


def test_rnn_forward_matches_stepwise_numpy():
    N, T, D, H = 2, 3, 4, 5
    x, h0 = np.random.randn(N, T, D), np.random.randn(N, H)
    Wx, Wh, b = np.random.randn(D, H), np.random.randn(H, H), np.random.randn(H)
    h = rnn.rnn_forward(*map(_t, (x, h0, Wx, Wh, b)))
    assert h.shape == (N, T, H)
    prev = h0
    for t in range(T):
        prev = np_rnn_step(x[:, t], prev, Wx, Wh, b)
        assert rel_error(h[:, t], prev) < 1e-10


def test_lstm_forward_matches_stepwise_numpy_with_zero_c0():
    N, T, D, H = 2, 4, 3, 5
    x, h0 = np.random.randn(N, T, D), np.random.randn(N, H)
    Wx, Wh, b = np.random.randn(D, 4 * H), np.random.randn(H, 4 * H), np.random.randn(4 * H)
    h = rnn.lstm_forward(*map(_t, (x, h0, Wx, Wh, b)))
    prev_h, prev_c = h0, np.zeros((N, H))
    for t in range(T):
        prev_h, prev_c = np_lstm_step(x[:, t], prev_h, prev_c, Wx, Wh, b)
        assert rel_error(h[:, t], prev_h) < 1e-10


def test_dot_product_attention_matches_numpy():
    N, H, Dh, Dw = 2, 5, 3, 4
    h, A = np.random.randn(N, H), np.random.randn(N, H, Dh, Dw)
    attn, weights = rnn.dot_product_attention(_t(h), _t(A))
    ref_attn, ref_weights = np_attention(h, A)
    assert attn.shape == (N, H) and weights.shape == (N, Dh, Dw)
    assert rel_error(attn, ref_attn) < 1e-10
    assert rel_error(weights, ref_weights) < 1e-10
    np.testing.assert_allclose(weights.sum(dim=(1, 2)).numpy(), 1.0, rtol=1e-12)


def test_attention_lstm_step_and_forward_match_numpy():
    N, T, D, H, Dh, Dw = 2, 3, 4, 5, 2, 3
    x, A = np.random.randn(N, T, D), np.random.randn(N, H, Dh, Dw)
    Wx, Wh, Wattn, b = (np.random.randn(D, 4 * H), np.random.randn(H, 4 * H), np.random.randn(H, 4 * H),
                        np.random.randn(4 * H))
    h = rnn.attention_lstm_forward(*map(_t, (x, A, Wx, Wh, Wattn, b)))
    prev_h = A.mean(axis=(2, 3))
    prev_c = prev_h.copy()
    for t in range(T):
        attn, _ = np_attention(prev_h, A)
        step_h, step_c = rnn.attention_lstm_step_forward(
            *map(_t, (x[:, t], prev_h, prev_c, attn, Wx, Wh, Wattn, b)))
        prev_h, prev_c = np_lstm_step(x[:, t], prev_h, prev_c, Wx, Wh, b, attn, Wattn)
        assert rel_error(step_h, prev_h) < 1e-10 and rel_error(step_c, prev_c) < 1e-10
        assert rel_error(h[:, t], prev_h) < 1e-10


# --- gradients: autograd through the hand-written forward vs finite differences (float64) ---------
N, T, D, H, Dh, Dw = 2, 3, 4, 5, 2, 2
CASES = {
    "rnn_step_forward": (rnn.rnn_step_forward, lambda: (_rand(N, D), _rand(N, H), _rand(D, H), _rand(H, H), _rand(H))),
    "rnn_forward": (rnn.rnn_forward, lambda: (_rand(N, T, D), _rand(N, H), _rand(D, H), _rand(H, H), _rand(H))),
    "lstm_step_forward": (rnn.lstm_step_forward, lambda: (
        _rand(N, D), _rand(N, H), _rand(N, H), _rand(D, 4 * H), _rand(H, 4 * H), _rand(4 * H))),
    "lstm_forward": (rnn.lstm_forward, lambda: (
        _rand(N, T, D), _rand(N, H), _rand(D, 4 * H), _rand(H, 4 * H), _rand(4 * H))),
    "dot_product_attention": (rnn.dot_product_attention, lambda: (_rand(N, H), _rand(N, H, Dh, Dw))),
    "attention_lstm_step_forward": (rnn.attention_lstm_step_forward, lambda: (
        _rand(N, D), _rand(N, H), _rand(N, H), _rand(N, H), _rand(D, 4 * H), _rand(H, 4 * H),
        _rand(H, 4 * H), _rand(4 * H))),
    "attention_lstm_forward": (rnn.attention_lstm_forward, lambda: (
        _rand(N, T, D), _rand(N, H, Dh, Dw), _rand(D, 4 * H), _rand(H, 4 * H), _rand(H, 4 * H), _rand(4 * H))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_float64(name):
    fn, make_inputs = CASES[name]
    inputs = make_inputs()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_finite_difference_relative_error_below_1e_8(name):
    """Every input's gradient of a random projection of the outputs, to 1e-8 relative (the courses' bar)."""
    fn, make_inputs = CASES[name]
    inputs = make_inputs()
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    projections = [torch.randn_like(o) for o in outputs]

    def objective():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum((o * p).sum() for o, p in zip(outs, projections, strict=True))

    grads = torch.autograd.grad(objective(), inputs)
    # Five-point central differences: truncation error O(h^4), so float64 resolves 1e-8 comfortably.
    h = 1e-3
    with torch.no_grad():
        for inp, grad in zip(inputs, grads, strict=True):
            numeric = torch.zeros_like(inp)
            flat, nflat = inp.view(-1), numeric.view(-1)
            for k in range(flat.numel()):
                old = flat[k].item()
                values = []
                for step in (2, 1, -1, -2):
                    flat[k] = old + step * h
                    values.append(objective().item())
                flat[k] = old
                nflat[k] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * h)
            # Relative to the gradient's norm: element-wise ratios of near-zero entries only measure noise.
            assert norm_rel_error(grad, numeric) < 1e-8, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_any_float_dtype(dtype):
    x = torch.randn(2, 3, 4, dtype=dtype)
    A = torch.randn(2, 5, 2, 2, dtype=dtype)
    lstm = rnn.AttentionLSTM(4, 5).to(dtype)
    assert lstm(x, A).dtype == dtype
    assert rnn.RNN(4, 5).to(dtype)(x, torch.zeros(2, 5, dtype=dtype)).dtype == dtype


def test_modules_call_the_functions():
    torch.manual_seed(1)
    x, h0 = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    for cls, fn in ((rnn.RNN, rnn.rnn_forward), (rnn.LSTM, rnn.lstm_forward)):
        m = cls(4, 6).double()
        torch.testing.assert_close(m(x, h0), fn(x, h0, m.Wx, m.Wh, m.b))
    lstm = rnn.LSTM(4, 6)
    assert torch.all(lstm.b[6:12] == 1.0) and torch.all(lstm.b[:6] == 0.0)
    with pytest.raises(ValueError, match="hidden_dim"):
        rnn.LSTM(4, -1)
