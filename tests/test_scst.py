"""Self-critical sequence training: the policy-gradient loss, its effect on the policy, the baselines, the
CIDEr-D reward, bad endings, starting from a cross-entropy checkpoint, and SCST through src/train.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from captioning.data.vocab import Vocabulary
from captioning.metrics import CiderD
from captioning.models import CaptioningRNN
from captioning.models.loss import linear_temporal_softmax_loss, temporal_softmax_loss
from captioning.objectives import SelfCritical

from entrypoints import REPO, compose, environment, load_entry_point, run_dirs, tiny, train, train_losses

NULL, START, END = 0, 1, 2
WORDS = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "red", "blue", "square", "circle", "on", "the", "left"]
VOCAB = Vocabulary(WORDS)

def toy_decoder(seed=0) -> CaptioningRNN:
    torch.manual_seed(seed)
    return CaptioningRNN(vocab_size=len(WORDS), input_dim=4, wordvec_dim=5, hidden_dim=6, cell_type="lstm").double()

def ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()] + [END]

def padded(*texts: str, length: int = 6) -> torch.Tensor:
    rows = [ids(t) for t in texts]
    return torch.tensor([r + [NULL] * (length - len(r)) for r in rows])

# ---------------------------------------------------------------------------------------------------- loss
def test_weighted_loss_on_a_hand_computed_case():
    # two captions of two steps, V = 4 with word 0 (<NULL>) and 1 (<START>) excluded from the softmax
    scores = torch.tensor([[[9.0, 9.0, 1.0, 2.0], [9.0, 9.0, 0.0, 0.0]],
                           [[9.0, 9.0, 3.0, 1.0], [9.0, 9.0, 0.5, 0.5]]], dtype=torch.float64)
    targets = torch.tensor([[3, 2], [2, 0]])  # the second caption ends after one word (then <NULL>)
    weights = torch.tensor([1.5, -0.5], dtype=torch.float64)
    nll = lambda row, k: math.log(sum(math.exp(v) for v in row[2:])) - row[k]  # noqa: E731
    expected = (1.5 * (nll([9, 9, 1, 2], 3) + nll([9, 9, 0, 0], 2)) - 0.5 * nll([9, 9, 3, 1], 2)) / 2
    loss = temporal_softmax_loss(scores, targets, weights=weights, excluded=(NULL, START))
    assert loss.item() == pytest.approx(expected, rel=1e-12)

def test_fused_weighted_loss_equals_the_unfused_and_passes_gradcheck():
    torch.manual_seed(0)
    h = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(2, 9, (4, 5))
    targets[:, 3:] = NULL
    w = torch.randn(4, dtype=torch.float64)
    fused = linear_temporal_softmax_loss(h, weight, bias, targets, weights=w, excluded=(NULL, START))
    plain = temporal_softmax_loss(h @ weight.T + bias, targets, weights=w, excluded=(NULL, START))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(
        lambda *p: linear_temporal_softmax_loss(*p, targets, weights=w, excluded=(NULL, START)), (h, weight, bias))

def test_policy_loss_is_minus_the_advantage_weighted_log_probability():
    decoder = toy_decoder()
    features = torch.randn(2, 4, dtype=torch.float64)
    samples = padded("a red square", "blue circle")
    advantage = torch.tensor([1.5, -0.5], dtype=torch.float64)
    log_p = decoder.log_probs(features, samples)  # the decoders' own distribution
    loss = SelfCritical.policy_loss(decoder, features, samples, advantage)
    assert loss.item() == pytest.approx(-(1.5 * log_p[0] - 0.5 * log_p[1]).item() / 2, rel=1e-10)

def test_the_policy_loss_is_per_caption_whatever_the_decoders_loss_normalisation():
    decoder = toy_decoder()
    decoder.loss_normalize = "tokens"  # the cross-entropy's choice; REINFORCE stays a mean over captions
    features = torch.randn(2, 4, dtype=torch.float64)
    samples = padded("a red square", "blue circle")
    advantage = torch.tensor([2.0, 1.0], dtype=torch.float64)
    log_p = decoder.log_probs(features, samples)
    loss = SelfCritical.policy_loss(decoder, features, samples, advantage)
    assert loss.item() == pytest.approx(-(2.0 * log_p[0] + log_p[1]).item() / 2, rel=1e-10)
    # and the log-probabilities are those of the decoding distribution: <NULL> and <START> never emitted
    h, _ = decoder._teacher_forced(features, decoder.with_start(samples))
    scores = decoder.vocab_proj(h)
    full = scores.log_softmax(-1).gather(-1, samples.unsqueeze(-1)).squeeze(-1).masked_fill(samples == NULL, 0)
    assert torch.all(log_p > full.sum(dim=1))

def test_one_step_makes_a_better_sample_more_likely_and_a_worse_one_less():
    decoder = toy_decoder(1)
    features = torch.randn(2, 4, dtype=torch.float64)
    samples = padded("a red square on the left", "the blue circle", length=7)
    advantage = torch.tensor([1.0, -1.0], dtype=torch.float64)  # above / below the baseline
    before = decoder.log_probs(features, samples)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.05)
    SelfCritical.policy_loss(decoder, features, samples, advantage).backward()
    optimizer.step()
    after = decoder.log_probs(features, samples)
    assert after[0] > before[0] and after[1] < before[1]

def test_the_mean_baseline_leaves_the_sample_out():
    reward = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    baseline = SelfCritical.mean_baseline(reward)
    torch.testing.assert_close(baseline, torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))
    with pytest.raises(ValueError, match="num_samples >= 2"):
        SelfCritical(num_samples=1, baseline="mean")

# ---------------------------------------------------------------------------------------------------- reward
REFERENCES = {
    10: ["a red square on the left", "a red square", "the red square on the left"],
    11: ["a blue circle", "the blue circle on the left", "a blue circle on the left"],
    12: ["a red circle", "a red circle on the left", "red circle"],
}

def test_the_reward_is_the_projects_cider_d_of_the_same_captions():
    objective = SelfCritical()
    objective.use_references(REFERENCES, VOCAB)
    texts = ["a red square on the left", "a blue square", "red circle", "a red square", "the left"]
    image_ids = [10, 11, 12, 10, 10]  # image 10 three times: rows of one image are scored apart
    captions = padded(*texts, length=8)
    rewards = objective.rewards(image_ids, captions)
    cider = CiderD(REFERENCES)
    expected = [cider.score({i: t})[1][i] for i, t in zip(image_ids, texts, strict=True)]
    np.testing.assert_allclose(rewards, expected, rtol=1e-12)
    assert rewards[0] > rewards[3] > rewards[4]

def test_bad_endings_are_penalized_or_forbidden():
    objective = SelfCritical(bad_ending="penalize", bad_ending_penalty=0.5)
    objective.use_references(REFERENCES, VOCAB)
    samples = padded("a red square on the", "a red square", "a red square on")
    assert objective._ends_badly(samples).tolist() == [True, False, True]

    class EndsAfterTheLastWord(CaptioningRNN):
        """A decoder that always wants to say "the" first and then to stop."""

        def step(self, words, state):
            scores, state, weights = super().step(words, state)
            scores = torch.full_like(scores, -20.0)
            scores[:, VOCAB["the"]] = torch.where(words == START, 20.0, -20.0)
            scores[:, END] = torch.where(words == START, -20.0, 20.0)
            scores[:, VOCAB["red"]] = 0.0
            return scores, state, weights

    torch.manual_seed(0)
    decoder = EndsAfterTheLastWord(vocab_size=len(WORDS), input_dim=4, wordvec_dim=5, hidden_dim=6, cell_type="lstm")
    features = torch.randn(8, 4)
    forbid = SelfCritical(num_samples=2, bad_ending="forbid", max_length=5)
    forbid.use_references(REFERENCES, VOCAB)
    samples, _ = forbid.sample(decoder, features)
    allowed = SelfCritical(num_samples=2, bad_ending="none", max_length=5)
    allowed.use_references(REFERENCES, VOCAB)
    plain, _ = allowed.sample(decoder, features)
    assert (plain[:, :2] == torch.tensor([VOCAB["the"], END])).all()  # "the <END>" every time
    assert not forbid._ends_badly(samples[samples.eq(END).any(dim=1)]).any()  # never "... the <END>"

def test_a_training_step_samples_k_captions_per_image_and_logs():
    objective = SelfCritical(num_samples=3, baseline="mean", xe_weight=0.5, max_length=6)
    objective.use_references(REFERENCES, VOCAB)
    decoder = toy_decoder().float()
    batch = {"image_ids": torch.tensor([10, 11]), "captions": torch.tensor([[START, *ids("a red square")],
                                                                            [START, *ids("a blue circle")]])}
    loss, logs = objective(decoder, torch.randn(2, 4), batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in decoder.parameters())
    assert set(logs) >= {"scst/reward", "scst/baseline", "scst/advantage_std", "scst/sample_length", "scst/ended",
                         "scst/entropy", "scst/xe_loss", "scst/reward_seconds"}
    assert 0 < logs["scst/entropy"] <= math.log(len(WORDS)) and 0 <= logs["scst/ended"] <= 1

# ---------------------------------------------------------------------------------------------------- runs
def test_from_a_cross_entropy_checkpoint_only_the_weights_are_taken(tmp_path):
    entry = load_entry_point("train")
    entry.train(compose("train", tiny(tmp_path, "trainer.max_epochs=1", "test=false"), tmp_path / "outputs/train/runs/xe"))
    xe = tmp_path / "outputs/train/runs/xe/checkpoints/last.ckpt"
    from captioning.utils import resolve_start

    cfg = compose("train", tiny(tmp_path, "objective=scst"), tmp_path / "x")
    from hydra.utils import instantiate

    module = instantiate(cfg.module, _recursive_=False)
    assert resolve_start(module, str(xe)) is None  # fine-tuning: a new optimizer, schedule and epoch 0
    weights = torch.load(xe, weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in weights.items())
    same = instantiate(compose("train", tiny(tmp_path), tmp_path / "y").module, _recursive_=False)
    assert resolve_start(same, str(xe)) == str(xe)  # the same objective: a resume

@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_scst_through_train_py_from_a_cross_entropy_checkpoint(tmp_path, processes):
    train(tiny(tmp_path, "trainer.max_epochs=1", "test=false"))
    (xe,) = run_dirs(tmp_path)
    ddp = ["trainer=ddp_cpu"] if processes == 2 else []
    options = tiny(tmp_path, *ddp, "objective=scst", "objective.num_samples=3", "optimizer.lr=1e-4",
                   "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "test=false",
                   f"ckpt_path={xe / 'checkpoints' / 'last.ckpt'}")
    proc = train(options, env=environment())
    assert "starting from its weights with a new optimizer and schedule" in proc.stdout + proc.stderr
    scst = next(d for d in run_dirs(tmp_path) if d != xe)
    checkpoint = torch.load(scst / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["objective"]["_target_"] == "captioning.objectives.SelfCritical"
    steps_per_epoch = 64 * 5 // 16 // processes
    assert checkpoint["global_step"] == 2 * steps_per_epoch  # counted from 0: a new run, not a resume
    rows = [json.loads(json.dumps(r)) for r in _csv_rows(scst)]
    logged = [r for r in rows if r.get("train/scst/reward")]
    assert len(logged) == 2 * steps_per_epoch
    assert all(0.0 <= float(r["train/scst/ended"]) <= 1.0 for r in logged)
    assert len(train_losses(scst)) == 2 * steps_per_epoch
    # resuming the SCST run resumes everything
    proc = train([*options[:-1], "trainer.max_epochs=3", f"ckpt_path={scst / 'checkpoints' / 'last.ckpt'}"])
    assert "starting from its weights" not in proc.stdout + proc.stderr
    resumed = [d for d in run_dirs(tmp_path) if d not in (xe, scst)][0]
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3 * steps_per_epoch

def _csv_rows(run):
    import csv

    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))

assert REPO.is_dir()


def test_an_image_with_several_captions_in_the_batch_is_sampled_for_once(monkeypatch):
    objective = SelfCritical(num_samples=3, baseline="mean", xe_weight=0.5, max_length=6)
    objective.use_references(REFERENCES, VOCAB)
    decoder = toy_decoder().float()
    sampled, rewarded = [], []
    decode, rewards = objective._decode, objective.rewards
    monkeypatch.setattr(objective, "_decode", lambda d, state, n: sampled.append(state.h.clone()) or decode(d, state, n))
    monkeypatch.setattr(objective, "rewards", lambda i, s: rewarded.append(list(i)) or rewards(i, s))
    image = torch.randn(2, 4)
    batch = {"image_ids": torch.tensor([10, 10, 11]), "image_index": torch.tensor([0, 0, 1]),
             "captions": torch.tensor([[START, *ids("a red square")], [START, *ids("a red circle")],
                                       [START, *ids("a blue circle")]])}
    loss, logs = objective(decoder, image[batch["image_index"]], batch)
    loss.backward()
    # K = 3 rows per image, not per caption
    assert torch.equal(sampled[0], decoder.init_state(image).h.detach().repeat_interleave(3, dim=0))
    assert rewarded[0] == [10, 10, 10, 11, 11, 11]
    assert torch.isfinite(logs["scst/xe_loss"])


# ---------------------------------------------------------------------------------------------------- speed paths
def attention_decoder(seed=0) -> CaptioningRNN:
    torch.manual_seed(seed)
    return CaptioningRNN(vocab_size=len(WORDS), input_dim=4, wordvec_dim=5, hidden_dim=6,
                         cell_type="attention").double()


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_the_replayed_sampling_steps_give_the_teacher_forced_policy_gradient(baseline, monkeypatch):
    """With the attention core the policy loss differentiates the sampling steps as taken; the teacher-forced
    pass over the same samples (the other cores' path) gives the same loss and gradients."""
    objective = SelfCritical(num_samples=3, baseline=baseline, max_length=6)
    objective.use_references(REFERENCES, VOCAB)
    decoder = attention_decoder()
    features = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    batch = {"image_ids": torch.tensor([10, 11])}
    results = {}
    for replay in (True, False):
        monkeypatch.setattr(objective, "replays", lambda d, rows, replay=replay: replay)
        torch.manual_seed(5)
        loss, logs = objective(decoder, features, batch)
        results[replay] = (loss, torch.autograd.grad(loss, list(decoder.parameters())))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    monkeypatch.undo()
    assert objective.replays(decoder, 6) and not objective.replays(toy_decoder(), 6)  # the LSTM: teacher-forced


def test_the_greedy_baseline_decoded_beside_the_samples_is_the_greedy_caption(monkeypatch):
    from captioning.models.decoding import greedy_decode

    objective = SelfCritical(num_samples=2, baseline="greedy", max_length=6)
    objective.use_references(REFERENCES, VOCAB)
    decoder = attention_decoder(1)
    features = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    scored, rewards = [], objective.rewards
    monkeypatch.setattr(objective, "rewards", lambda i, s: scored.append(s.clone()) or rewards(i, s))
    objective(decoder, features, {"image_ids": torch.tensor([10, 11])})
    samples, greedy = scored
    assert samples.shape[0] == 4
    torch.testing.assert_close(greedy, greedy_decode(decoder, features, 6).captions)
