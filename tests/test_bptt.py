"""Hand-written BPTT and the fused vocabulary loss against autograd through rnn.py / loss.py (float64)."""

import pytest
import torch
from torch.nn import functional as F

from captioning.models import CaptioningRNN, bptt, rnn, temporal_softmax_loss
from captioning.models import loss as loss_module
from captioning.models.loss import linear_temporal_softmax_loss

NULL, START, END = 0, 1, 2
N, T, D, H, Dh, Dw = 3, 5, 4, 6, 2, 3


def _rand(*shape, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_(True)


# name: (manual, autograd reference, inputs of sizes N, T, D, H)
CASES = {
    "rnn": (bptt.rnn_forward_manual, rnn.rnn_forward,
            lambda N, T, D, H: (_rand(N, T, D), _rand(N, H), _rand(D, H), _rand(H, H), _rand(H))),
    "lstm": (bptt.lstm_forward_manual, rnn.lstm_forward,
             lambda N, T, D, H: (_rand(N, T, D), _rand(N, H), _rand(D, 4 * H), _rand(H, 4 * H), _rand(4 * H))),
    "attention": (bptt.attention_lstm_forward_manual, rnn.attention_lstm_forward,
                  lambda N, T, D, H: (_rand(N, T, D), _rand(N, H, Dh, Dw), _rand(D, 4 * H), _rand(H, 4 * H),
                                      _rand(H, 4 * H), _rand(4 * H))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_manual_gradcheck_float64(name):
    manual, _, make_inputs = CASES[name]
    torch.manual_seed(0)
    # small sizes: gradcheck perturbs every input element in turn
    assert torch.autograd.gradcheck(manual, make_inputs(2, 3, 3, 4), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("sigmoid_tanh", [False, True], ids=["tanh", "sigmoid-form-tanh"])
def test_manual_forward_and_gradients_equal_autograd(name, sigmoid_tanh, monkeypatch):
    # large CPU tensors take tanh as 2 sigmoid(2x) - 1; force that form on these small ones too
    monkeypatch.setattr(bptt, "_SIGMOID_TANH_MIN_ELEMENTS", 0 if sigmoid_tanh else 1 << 60)
    manual, reference, make_inputs = CASES[name]
    torch.manual_seed(1)
    inputs = make_inputs(N, T, D, H)
    upstream = torch.randn(N, T, H, dtype=torch.float64)
    h_manual, h_ref = manual(*inputs), reference(*inputs)
    assert h_manual.shape == (N, T, H) and h_manual.is_contiguous()
    torch.testing.assert_close(h_manual, h_ref, rtol=0, atol=1e-12)
    g_manual = torch.autograd.grad((h_manual * upstream).sum(), inputs)
    g_ref = torch.autograd.grad((h_ref * upstream).sum(), inputs)
    for k, (a, b) in enumerate(zip(g_manual, g_ref, strict=True)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name}: input {k}")


def test_manual_skips_unneeded_gradients_and_a_single_step_works():
    torch.manual_seed(2)
    x, h0 = torch.randn(2, 1, 3, dtype=torch.float64), _rand(2, 4)
    Wx, Wh, b = torch.randn(3, 16, dtype=torch.float64), _rand(4, 16), torch.randn(16, dtype=torch.float64)
    (dh0, dWh) = torch.autograd.grad(bptt.lstm_forward_manual(x, h0, Wx, Wh, b).sum(), (h0, Wh))
    (rh0, rWh) = torch.autograd.grad(rnn.lstm_forward(x, h0, Wx, Wh, b).sum(), (h0, Wh))
    torch.testing.assert_close(dh0, rh0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dWh, rWh, rtol=1e-12, atol=1e-12)


def test_manual_rejects_bad_inputs_clearly():
    x, h0 = torch.randn(2, 3, 4), torch.randn(2, 5)
    with pytest.raises(ValueError, match="Wh must have shape"):
        bptt.lstm_forward_manual(x, h0, torch.randn(4, 20), torch.randn(5, 5), torch.randn(20))
    with pytest.raises(ValueError, match="one dtype"):
        bptt.rnn_forward_manual(x, h0.double(), torch.randn(4, 5), torch.randn(5, 5), torch.randn(5))
    with pytest.raises(ValueError, match="T >= 1"):
        bptt.rnn_forward_manual(x[:, :0], h0, torch.randn(4, 5), torch.randn(5, 5), torch.randn(5))
    with pytest.raises(ValueError, match="autograd, manual"):
        rnn.LSTM(4, 5, backward="cudnn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_manual_in_lower_precision_and_under_autocast(dtype):
    torch.manual_seed(3)
    x, A = torch.randn(4, 3, 6), torch.randn(4, 8, 2, 2)
    for cls, arg in ((rnn.RNN, torch.randn(4, 8)), (rnn.LSTM, torch.randn(4, 8)), (rnn.AttentionLSTM, A)):
        auto, manual = cls(6, 8), cls(6, 8, backward="manual")
        manual.load_state_dict(auto.state_dict())
        auto, manual = auto.to(dtype), manual.to(dtype)
        h_auto, h_manual = auto(x.to(dtype), arg.to(dtype)), manual(x.to(dtype), arg.to(dtype))
        assert h_manual.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(h_manual, h_auto, rtol=tol, atol=tol)
        h_manual.float().sum().backward()
        assert manual.Wh.grad.dtype == dtype and torch.isfinite(manual.Wh.grad.float()).all()
    # autocast: the manual path runs in the autocast dtype; gradients reach the float32 parameters
    lstm = rnn.LSTM(6, 8, backward="manual")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lstm(x, torch.randn(4, 8))
    assert h.dtype == torch.bfloat16
    h.float().sum().backward()
    assert lstm.Wx.grad.dtype == torch.float32


# --- the fused vocabulary projection + loss ----------------------------------------------------------
@pytest.mark.parametrize("normalize", ["batch", "tokens"])
def test_fused_loss_equals_unfused_and_gradchecks(normalize):
    torch.manual_seed(4)
    h, weight, bias = _rand(3, 4, 5), _rand(7, 5), _rand(7)
    targets = torch.tensor([[1, 2, 0, 0], [3, 4, 2, 0], [5, 6, 6, 2]])
    fused = linear_temporal_softmax_loss(h, weight, bias, targets, normalize=normalize)
    unfused = temporal_softmax_loss(F.linear(h, weight, bias), targets, normalize=normalize)
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(fused * 2.5, (h, weight, bias)),
                    torch.autograd.grad(unfused * 2.5, (h, weight, bias)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *p: linear_temporal_softmax_loss(*p, targets, normalize=normalize), (h, weight, bias))


def test_fused_loss_in_chunks_and_all_ignored(monkeypatch):
    torch.manual_seed(5)
    monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", 3 * 11)  # 3 rows per chunk: several chunks, a ragged last
    h, weight, bias = _rand(4, 5, 6), _rand(11, 6), _rand(11)
    targets = torch.randint(0, 11, (4, 5))
    fused = linear_temporal_softmax_loss(h, weight, bias, targets)
    unfused = temporal_softmax_loss(F.linear(h, weight, bias), targets)
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(fused, (h, weight, bias)),
                    torch.autograd.grad(unfused, (h, weight, bias)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    none = linear_temporal_softmax_loss(h, weight, bias, torch.zeros(4, 5, dtype=torch.long))
    assert none.item() == 0.0
    assert torch.autograd.grad(none, h)[0].abs().sum() == 0


def test_fused_loss_falls_back_under_autocast_and_rejects_bad_shapes():
    h, weight, bias = torch.randn(2, 3, 4), torch.randn(6, 4), torch.randn(6)
    targets = torch.randint(1, 6, (2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_temporal_softmax_loss(h, weight, bias, targets)
    assert abs(loss.item() - temporal_softmax_loss(F.linear(h, weight, bias), targets).item()) < 0.1
    with pytest.raises(ValueError, match="targets"):
        linear_temporal_softmax_loss(h, weight, bias, targets[:, :2])


# --- the captioner on both paths -------------------------------------------------------------------
def _toy(cell_type, backward, seed=0):
    torch.manual_seed(seed)
    return CaptioningRNN(vocab_size=13, input_dim=5, wordvec_dim=4, hidden_dim=6, cell_type=cell_type,
                         backward=backward).double()


def _toy_data(cell_type, n=6, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5, 2, 2) if cell_type == "attention" else (n, 5)
    features = torch.randn(*shape, generator=g, dtype=torch.float64)
    captions = torch.randint(3, 13, (n, length), generator=g)
    captions[:, 0] = START
    for row, end in enumerate(torch.randint(2, length, (n,), generator=g).tolist()):
        captions[row, end] = END
        captions[row, end + 1 :] = NULL
    return features, captions


@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "attention"])
def test_captioner_same_loss_and_gradients_on_both_paths(cell_type):
    auto, manual = _toy(cell_type, "autograd"), _toy(cell_type, "manual")
    assert manual.core.backward == "manual"
    features, captions = _toy_data(cell_type)
    losses = []
    for model in (auto, manual):
        loss = model(features, captions)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    # ...and the fused training loss equals the loss of the returned scores
    loss_from_scores, _ = auto(features, captions, return_scores=True)
    torch.testing.assert_close(loss_from_scores, losses[0], rtol=1e-12, atol=0)
    for (name, p_auto), p_manual in zip(auto.named_parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(p_manual.grad, p_auto.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "attention"])
def test_same_training_curve_on_both_paths(cell_type):
    features, captions = _toy_data(cell_type, n=8, length=8, seed=2)
    curves = []
    for backward in ("autograd", "manual"):
        model = _toy(cell_type, backward, seed=3)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        curve = []
        for _ in range(30):
            optimizer.zero_grad()
            loss = model(features, captions)
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve, dtype=torch.float64))
    assert curves[0][-1] < 0.8 * curves[0][0]  # it does learn
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-8, atol=0)


# ---------------------------------------------------------------------------------------------------
# The fused decoding steps and the replay of recorded steps (what self-critical training differentiates)
@pytest.mark.parametrize("cell_type", ["lstm", "attention"])
def test_the_step_without_gradients_is_the_course_step_fused(cell_type):
    torch.manual_seed(0)
    core = (rnn.AttentionLSTM if cell_type == "attention" else rnn.LSTM)(D, H).double()
    x, h, c = (torch.randn(N, k, dtype=torch.float64) for k in (D, H, H))
    extra = (torch.randn(N, H, Dh, Dw, dtype=torch.float64),) if cell_type == "attention" else ()
    traced = core.step(x, h, c, *extra)  # autograd on: the course functions, differentiable
    assert traced[0].requires_grad
    with torch.no_grad():
        fused = core.step(x, h, c, *extra)
    assert not fused[0].requires_grad
    for a, b in zip(fused, traced, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
    # the stacked weights are kept between steps and follow the optimizer's in-place updates
    traced[0].sum().backward()
    torch.optim.SGD(core.parameters(), lr=0.5).step()
    with torch.no_grad():
        updated = core.step(x, h, c, *extra)
    expected = core.step(x, h, c, *extra)
    torch.testing.assert_close(updated[0], expected[0].detach(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(updated[0], fused[0])


@pytest.mark.parametrize("cell_type", ["lstm", "attention"])
def test_every_decoding_sees_weights_a_fused_optimizer_changed(cell_type):
    # AdamW(fused=True) writes the weights without bumping their version counters: the stacked copy of the fused
    # steps is made afresh at every decoding's start (init_state), or validation would decode with old weights
    torch.manual_seed(0)
    decoder = CaptioningRNN(12, 6, wordvec_dim=5, hidden_dim=8, cell_type=cell_type)
    features = torch.randn(3, 6, 2, 2) if cell_type == "attention" else torch.randn(3, 6)
    words = torch.tensor([1, 4, 5])

    def first_scores():
        with torch.no_grad():
            return decoder.step(words, decoder.init_state(features))[0]

    before = first_scores()
    captions = torch.randint(4, 12, (3, 5))
    captions[:, 0] = 1
    decoder(features, captions).backward()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=0.1, fused=True)
    versions = [p._version for p in decoder.parameters()]
    optimizer.step()
    assert [p._version for p in decoder.parameters()] == versions  # what the counters cannot tell
    after = first_scores()
    with torch.enable_grad():  # the course's step functions: no stacked copy
        expected = decoder.step(words, decoder.init_state(features))[0].detach()
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def _recorded_sampling(decoder, features, length=7, seed=0):
    """Sample with the attention core's fused steps recorded; -> (captions (N, T), the state with gradients and
    the T recorded steps)."""
    import dataclasses

    from captioning.models.decoding import step_decode

    state = decoder.init_state(features)
    record = dataclasses.replace(state, h=state.h.detach(), c=state.c.detach(), A=state.A.detach(), steps=[])

    def draw(log_probs, previous):
        words = torch.multinomial(log_probs.exp(), 1).squeeze(1)
        return words, log_probs.gather(1, words.unsqueeze(1)).squeeze(1)

    torch.manual_seed(seed)
    with torch.no_grad():
        captions = step_decode(decoder, features, length, draw, state=record).captions
    return captions[:, :len(record.steps)], dataclasses.replace(state, steps=record.steps)


@pytest.mark.parametrize("context_output", [False, True], ids=["h", "h+Wz"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_replayed_steps_give_the_teacher_forced_loss_and_gradients(context_output, dtype):
    torch.manual_seed(0)
    decoder = CaptioningRNN(12, D, 5, H, cell_type="attention", context_output=context_output).to(dtype)
    if context_output:
        torch.nn.init.normal_(decoder.context_proj.weight, std=0.3)
    features = torch.randn(N, D, Dh, Dw, dtype=dtype)
    captions, replay = _recorded_sampling(decoder, features)
    assert len(replay.steps) >= 2
    weights = torch.tensor([1.5, -0.5, 0.25], dtype=dtype)
    full = decoder.with_start(captions)
    params = list(decoder.parameters())
    kwargs = dict(weights=weights, decoding_distribution=True, normalize="batch")
    replayed = decoder(None, full, replay=replay, **kwargs)
    forced = decoder(features, full, **kwargs)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(replayed, forced, **tol)
    for a, b in zip(torch.autograd.grad(replayed, params), torch.autograd.grad(forced, params), strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_replay_refuses_what_the_steps_did_not_do():
    torch.manual_seed(0)
    decoder = CaptioningRNN(12, D, 5, H, cell_type="attention", dropout=0.5).double()
    features = torch.randn(N, D, Dh, Dw, dtype=torch.float64)
    captions, replay = _recorded_sampling(decoder.eval(), features)
    full = decoder.with_start(captions)
    with pytest.raises(ValueError, match="no dropout"):
        decoder.train()(None, full, replay=replay)
    with pytest.raises(ValueError, match="were recorded"):
        decoder.eval()(None, decoder.with_start(torch.cat([captions, captions], dim=1)), replay=replay)


def test_a_model_made_under_inference_mode_decodes_with_the_course_step():
    # its weights keep no version counter, so no stacked copy could know it is current
    from captioning.models.decoding import greedy_decode

    with torch.inference_mode():
        torch.manual_seed(0)
        made_inside = CaptioningRNN(12, D, 5, H, cell_type="attention").double()
        features = torch.randn(N, D, Dh, Dw, dtype=torch.float64)
        assert not made_inside.core.fuses_steps()
        inside = greedy_decode(made_inside, features, 6)
    torch.manual_seed(0)
    made_outside = CaptioningRNN(12, D, 5, H, cell_type="attention").double()
    with torch.inference_mode():
        assert made_outside.core.fuses_steps()
        outside = greedy_decode(made_outside, features, 6)
    assert torch.equal(inside.captions, outside.captions)
    torch.testing.assert_close(inside.log_probs, outside.log_probs, rtol=1e-12, atol=1e-12)
