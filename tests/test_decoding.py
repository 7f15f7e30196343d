"""The anchors' decoding: diverse beams, n-best lists, step rules (n-gram blocking, repetition, bad endings),
length penalties, nucleus and keyed sampling, ensembles — each against a number computed another way."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from captioning.models import CaptioningRNN
from captioning.models.decoding import (
    CaptionDecoder,
    Ensemble,
    StepRules,
    _beam_hypotheses,
    beam_search,
    greedy_decode,
    keyed_uniform,
    length_normalized,
    sample_decode,
)

NULL, START, END = 0, 1, 2


def _features(cell_type, N, D):
    return torch.randn(N, D, 2, 3) if cell_type == "attention" else torch.randn(N, D)


def _toy(cell_type="lstm", seed=0, vocab_size=12, scale=4.0):
    torch.manual_seed(seed)
    model = CaptioningRNN(vocab_size=vocab_size, input_dim=6, wordvec_dim=8, hidden_dim=16, cell_type=cell_type)
    with torch.no_grad():  # peaky but ambiguous distributions: the search has work to do
        model.vocab_proj.weight.mul_(scale)
    return model.eval()


def _trigrams(row: list[int]) -> list[tuple[int, ...]]:
    words = [w for w in row if w not in (NULL, END)]
    return [tuple(words[i:i + 3]) for i in range(len(words) - 2)]


# --- diverse beam search -----------------------------------------------------------------------------
@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "attention"])
def test_diverse_beam_with_one_group_is_beam_search(cell_type):
    model = _toy(cell_type)
    feats = _features(cell_type, 16, 6)
    plain = beam_search(model, feats, beam_size=4, max_length=8)
    one_group = beam_search(model, feats, beam_size=4, max_length=8, groups=1, diversity=3.0)
    assert torch.equal(plain.captions, one_group.captions)
    assert torch.equal(plain.log_probs, one_group.log_probs)


@pytest.mark.parametrize("groups,size", [(2, 3), (3, 2)])
def test_diverse_beam_without_diversity_runs_a_plain_beam_in_every_group(groups, size):
    model = _toy("lstm", seed=1)
    feats = torch.randn(12, 6)
    plain = _beam_hypotheses(model, feats, size, 8)
    grouped = _beam_hypotheses(model, feats, groups * size, 8, groups=groups, diversity=0.0)
    for g in range(groups):
        part = slice(g * size, (g + 1) * size)
        assert torch.equal(grouped.captions[:, part], plain.captions)
        torch.testing.assert_close(grouped.log_probs[:, part], plain.log_probs)


def test_diversity_pushes_later_groups_off_the_words_earlier_groups_chose():
    """Hamming diversity with a huge weight: at the first step group 1 may not start with any word group 0 chose
    (there are enough other words), and the reported log p stay the model's own."""
    model = _toy("lstm", seed=2, vocab_size=30)
    feats = torch.randn(10, 6)
    found = _beam_hypotheses(model, feats, 6, 6, groups=2, diversity=1e4)
    first = found.captions[:, :, 0]
    for n in range(10):
        assert not set(first[n, :3].tolist()) & set(first[n, 3:].tolist())
    torch.testing.assert_close(found.log_probs.view(-1), model.log_probs(feats.repeat_interleave(6, 0),
                               found.captions.view(60, -1)).float(), rtol=1e-4, atol=1e-4)
    plain = _beam_hypotheses(model, feats, 6, 6)
    distinct = lambda caps: sum(len({tuple(r) for r in c.tolist()}) for c in caps[:, :, :3])  # noqa: E731
    assert distinct(found.captions) >= distinct(plain.captions)


def test_caption_decoder_diverse_beam_config():
    model = _toy("rnn")
    feats = torch.randn(4, 6)
    decoded = CaptionDecoder("beam", max_length=6, beam_size=6, groups=2, diversity=0.5, n_best=6)(model, feats)
    assert decoded.nbest.captions.shape == (4, 6, 6)
    with pytest.raises(ValueError, match="multiple of groups"):
        CaptionDecoder("beam", beam_size=5, groups=2)
    with pytest.raises(ValueError, match="needs decoding=beam"):
        CaptionDecoder("sample", groups=2)


# --- n-best lists ----------------------------------------------------------------------------------------
def _every_caption(model, feats, L, words):
    """Every caption of at most L tokens over ``words`` (with <END>), padded, and its log p, best first."""
    seen, out = set(), []
    for seq in itertools.product([*words, END], repeat=L):
        seq = list(seq)
        if END in seq:
            seq = seq[: seq.index(END) + 1] + [NULL] * (L - seq.index(END) - 1)
        if tuple(seq) not in seen:
            seen.add(tuple(seq))
            out.append(seq)
    log_probs = model.log_probs(feats.expand(len(out), -1), torch.tensor(out)).float()
    order = log_probs.argsort(descending=True)
    return [out[i] for i in order], log_probs[order]


def test_beam_nbest_is_the_brute_force_ranking_on_a_tiny_vocab():
    torch.manual_seed(3)
    model = CaptioningRNN(vocab_size=6, input_dim=3, wordvec_dim=4, hidden_dim=6, cell_type="lstm").eval()
    with torch.no_grad():
        model.vocab_proj.weight.mul_(3)
    feats = torch.randn(1, 3)
    L = 3
    ranked, ranked_lp = _every_caption(model, feats, L, [3, 4, 5])
    decoded = beam_search(model, feats, beam_size=64, max_length=L, n_best=8)
    assert decoded.nbest.captions[0].tolist() == ranked[:8]
    torch.testing.assert_close(decoded.nbest.log_probs[0], ranked_lp[:8], rtol=1e-5, atol=1e-5)
    assert decoded.captions[0].tolist() == ranked[0]  # the prediction is the list's first
    assert torch.all(decoded.nbest.log_probs[0, :-1] >= decoded.nbest.log_probs[0, 1:])


def test_nbest_drops_repeats_across_groups_and_ranks_by_the_length_penalty():
    model = _toy("lstm", seed=4)
    feats = torch.randn(8, 6)
    decoded = beam_search(model, feats, beam_size=6, max_length=7, groups=2, diversity=0.0, n_best=6)
    # without diversity both groups hold the same 3 captions: 3 distinct ones, then empty entries
    assert torch.isinf(decoded.nbest.log_probs[:, 3:]).all() and decoded.nbest.captions[:, 3:].eq(NULL).all()
    for n in range(8):
        rows = [tuple(r) for r in decoded.nbest.captions[n, :3].tolist()]
        assert len(set(rows)) == 3
    penalised = beam_search(model, feats, beam_size=5, max_length=7, length_penalty=1.0, n_best=5)
    lengths = penalised.nbest.captions.ne(NULL).sum(dim=2).float()
    scores = length_normalized(penalised.nbest.log_probs, lengths, 1.0)
    assert torch.all(scores[:, :-1] >= scores[:, 1:] - 1e-6)


def test_sampled_nbest_is_sorted_and_its_first_is_the_caption():
    model = _toy("lstm")
    feats = torch.randn(5, 6)
    decoded = sample_decode(model, feats, 8, n_best=7, generator=torch.Generator().manual_seed(0))
    assert decoded.nbest.captions.shape == (5, 7, 8)
    assert torch.all(decoded.nbest.log_probs[:, :-1] >= decoded.nbest.log_probs[:, 1:])
    assert torch.equal(decoded.captions, decoded.nbest.captions[:, 0])
    torch.testing.assert_close(decoded.nbest.log_probs.view(-1), model.log_probs(
        feats.repeat_interleave(7, 0), decoded.nbest.captions.view(35, -1)).float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs several captions"):
        CaptionDecoder("greedy", n_best=2)
    with pytest.raises(ValueError, match="raise beam_size"):
        CaptionDecoder("beam", beam_size=3, n_best=4)


# --- step rules -----------------------------------------------------------------------------------------
def _repetitive(scale=6.0):
    """A model that loves to repeat itself: a few words, long captions."""
    torch.manual_seed(5)
    model = CaptioningRNN(vocab_size=7, input_dim=4, wordvec_dim=4, hidden_dim=8, cell_type="lstm").eval()
    with torch.no_grad():
        model.vocab_proj.weight.mul_(scale)
        model.vocab_proj.bias[END] = -20.0
    return model


@pytest.mark.parametrize("strategy", ["greedy", "beam", "diverse", "sample"])
def test_trigram_blocking_never_emits_a_repeated_trigram(strategy):
    model = _repetitive()
    feats = torch.randn(40, 4)
    options = {"greedy": {}, "beam": {"beam_size": 4, "n_best": 4},
               "diverse": {"beam_size": 4, "groups": 2, "diversity": 0.5, "n_best": 4},
               "sample": {"seed": 0, "n_best": 3}}[strategy]
    kind = "beam" if strategy == "diverse" else strategy

    def rows(decoder):
        decoded = decoder(model, feats)
        every = decoded.captions.tolist()
        if decoded.nbest is not None:
            every += decoded.nbest.captions.reshape(-1, decoded.nbest.captions.shape[-1]).tolist()
        return every

    repeats = lambda every: sum(len(t) - len(set(t)) for t in map(_trigrams, every))  # noqa: E731
    assert repeats(rows(CaptionDecoder(kind, max_length=12, **options))) > 0  # the model does repeat itself
    assert repeats(rows(CaptionDecoder(kind, max_length=12, block_ngrams=3, **options))) == 0


def test_step_rules_hand_computed():
    log_probs = torch.log(torch.tensor([[0.0, 0.0, 0.1, 0.2, 0.3, 0.4]]).clamp(min=1e-30))
    log_probs[:, :2] = float("-inf")
    history = torch.tensor([[3, 4, 5, 3, 4]])  # "3 4 5 3 4": the trigram (3 4 5) is there, so 5 is blocked
    blocked = StepRules(block_ngrams=3)(log_probs, history).exp()
    expected = torch.tensor([[0.0, 0.0, 0.1, 0.2, 0.3, 0.0]]) / 0.6
    torch.testing.assert_close(blocked, expected)
    # repetition penalty 2 on the log-probabilities of the words said (3, 4, 5), then renormalised
    penalised = StepRules(repetition_penalty=2.0)(log_probs, history).exp()
    raw = torch.tensor([0.1, 0.2**2, 0.3**2, 0.4**2])
    torch.testing.assert_close(penalised[0, 2:], raw / raw.sum())
    # no <END> right after a bad ending word
    ruled = StepRules(bad_ids=torch.tensor([4]), end_id=END)(log_probs, history).exp()
    torch.testing.assert_close(ruled, torch.tensor([[0.0, 0.0, 0.0, 0.2, 0.3, 0.4]]) / 0.9)
    assert StepRules()(log_probs, history) is log_probs  # no rules: untouched


def test_bad_endings_are_never_followed_by_end_in_any_strategy():
    model = _Fixed([0.0, 0.4, 0.3, 0.2, 0.1], end=0.35)  # <END> likely at every step, "a" (4) likeliest

    class Vocab:
        word_to_idx = {"a": 4, "the": 5}

    feats = torch.randn(200, 2)

    def bad_pairs(captions):
        return sum(1 for r in captions.tolist() for a, b in zip(r, r[1:], strict=False) if a in (4, 5) and b == END)

    for kind, extra in (("greedy", {}), ("beam", {"beam_size": 3}), ("sample", {"seed": 1})):
        settled = CaptionDecoder(kind, max_length=8, bad_endings=["a", "the"], **extra).for_model(False, Vocab())
        assert settled.bad_ids.tolist() == [4, 5]
        assert bad_pairs(settled(model, feats, torch.arange(200)).captions) == 0, kind
    sampled = CaptionDecoder("sample", max_length=8, seed=1)(model, feats, torch.arange(200)).captions
    assert bad_pairs(sampled) > 0  # without the rule the sampler does end on "a"
    with pytest.raises(RuntimeError, match="vocabulary"):
        CaptionDecoder("greedy", bad_endings=True)(model, feats)


def test_length_penalties_hand_computed():
    log_p, lengths = torch.tensor([-4.0, -6.0]), torch.tensor([2.0, 7.0])
    torch.testing.assert_close(length_normalized(log_p, lengths, 0.0), log_p)
    torch.testing.assert_close(length_normalized(log_p, lengths, 1.0, "power"), torch.tensor([-2.0, -6.0 / 7.0]))
    gnmt = torch.tensor([-4.0 / (7 / 6) ** 0.6, -6.0 / 2.0 ** 0.6])
    torch.testing.assert_close(length_normalized(log_p, lengths, 0.6, "gnmt"), gnmt)
    with pytest.raises(ValueError, match="length_norm"):
        CaptionDecoder("beam", length_norm="wu")


# --- sampling ---------------------------------------------------------------------------------------------
class _Fixed(CaptioningRNN):
    """Every step the same distribution: ``probs`` over words 3.. and ``end`` for <END> (scaled to sum to 1)."""

    def __init__(self, probs, end=0.0):
        super().__init__(vocab_size=3 + len(probs), input_dim=2, wordvec_dim=2, hidden_dim=2, cell_type="rnn")
        p = torch.tensor([0.0, 0.0, end, *probs])
        self.fixed = torch.log((p / p.sum()).clamp(min=1e-30))

    def step(self, words, state):
        scores = self.fixed.expand(words.shape[0], -1).clone()
        scores[:, :2] = float("-inf")
        return scores, state, None


def test_nucleus_keeps_the_fewest_words_holding_top_p():
    model = _Fixed([0.5, 0.3, 0.15, 0.05])  # words 3, 4, 5, 6
    feats = torch.randn(3000, 2)
    first = sample_decode(model, feats, 1, top_p=0.8, generator=torch.Generator().manual_seed(0)).captions[:, 0]
    assert set(first.tolist()) == {3, 4}  # 0.5 + 0.3 reach 0.8: 5 and 6 are cut
    assert (first == 3).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    wider = sample_decode(model, feats, 1, top_p=0.81, generator=torch.Generator().manual_seed(0)).captions[:, 0]
    assert set(wider.tolist()) == {3, 4, 5}
    tiny = sample_decode(model, feats[:50], 1, top_p=1e-6, generator=torch.Generator().manual_seed(0)).captions
    assert tiny.eq(3).all()  # the most likely word is always kept
    lstm = _toy("lstm")
    f = torch.randn(8, 6)
    torch.testing.assert_close(sample_decode(lstm, f, 8, top_p=1e-6).captions, greedy_decode(lstm, f, 8).captions)


def test_keyed_sampling_does_not_depend_on_the_batch_and_draws_the_distribution():
    model = _toy("lstm")
    feats = torch.randn(12, 6)
    ids = torch.arange(100, 112)
    whole = sample_decode(model, feats, 8, keys=ids, seed=3).captions
    order = torch.randperm(12)
    part = sample_decode(model, feats[order[:5]], 8, keys=ids[order[:5]], seed=3).captions
    assert torch.equal(part, whole[order[:5]])
    assert not torch.equal(sample_decode(model, feats, 8, keys=ids, seed=4).captions, whole)
    u = keyed_uniform(torch.arange(20000), 0, 4, 0)
    assert 0 < u.min() and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    fixed = _Fixed([0.5, 0.3, 0.15, 0.05])
    first = sample_decode(fixed, torch.randn(20000, 2), 1, keys=torch.arange(20000), seed=0).captions[:, 0]
    freq = torch.bincount(first, minlength=7)[3:].float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)


# --- ensembles --------------------------------------------------------------------------------------------
class _Linear(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(5, 6)

    def forward(self, images):
        return self.proj(images)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_an_ensemble_of_one_decodes_exactly_as_its_member(strategy):
    encoder, decoder = _Linear(0), _toy("lstm")
    images = torch.randn(9, 5)
    decoding = CaptionDecoder(strategy, max_length=8, beam_size=3 if strategy == "beam" else 1, seed=0)
    alone = decoding(decoder, encoder(images), torch.arange(9))
    ensemble = decoding(Ensemble([encoder], [decoder]), images, torch.arange(9))
    assert torch.equal(alone.captions, ensemble.captions)
    assert torch.equal(alone.log_probs, ensemble.log_probs)


def test_an_ensemble_step_is_the_mean_of_the_members_log_probabilities():
    encoders, decoders = [_Linear(0), _Linear(1)], [_toy("lstm", seed=0), _toy("lstm", seed=1)]
    images = torch.randn(4, 5)
    ensemble = Ensemble(encoders, decoders)
    state = ensemble.init_state(images)
    words = torch.full((4,), START)
    states = [d.init_state(e(images)) for d, e in zip(decoders, encoders, strict=True)]
    for _ in range(3):
        scores, state, _ = ensemble.step(words, state)
        outs = [d.step(words, s) for d, s in zip(decoders, states, strict=True)]
        states = [s for _, s, _ in outs]
        expected = (outs[0][0].log_softmax(-1) + outs[1][0].log_softmax(-1)) / 2
        torch.testing.assert_close(scores, expected)
        words = scores.argmax(dim=1)
    # the same member twice decodes as that member alone
    twice = greedy_decode(Ensemble([encoders[0]] * 2, [decoders[0]] * 2), images, 8)
    alone = greedy_decode(decoders[0], encoders[0](images), 8)
    assert torch.equal(twice.captions, alone.captions)
    torch.testing.assert_close(twice.log_probs, alone.log_probs)
    assert math.isfinite(float(twice.log_probs.sum()))
