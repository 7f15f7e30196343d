"""Caption metrics: hand-computed cases, agreement with pycocoevalcap, and exact DDP collection."""

from __future__ import annotations

import math
import random
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from captioning.metrics import (
    CaptionScorer,
    CiderD,
    DecodedCaptions,
    coco_caption_eval,
    coco_caption_eval_detailed,
    corpus_bleu,
    official,
    tokenize,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for pycocoevalcap")

# Captions as COCO annotators write them, with the punctuation the PTB tokenizer has to deal with.
COCO_LIKE = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' toys, a cat's bowl and the kids' bikes.",
    "The man doesn't want to go; he can't, won't.",
    '"A sign" that says \'STOP\' (in red)!',
    "A hot-dog stand -- near the U.S. flag... maybe?",
    "A 3.5 inch screen showing 1,000 people at 5:30 p.m.",
    "Mr. Smith's dog: it's big & brown / white.",
    'A woman in a t-shirt that reads "I\'m #1" with $5 bills 50% off.',
    "cannot gonna wanna I'd we'll they've you're",
    "A person [in brackets] {and braces} with `backticks` and ''quotes''.",
    "An older man's hat- and a boy 's ball .",
    "A  double   space\ttab caption",
    "A dog. A cat. Two birds.",
    "Dogs, cats, etc.",
    "He said 'hello' and 'bye'.",
    "The '90s style car",
    "a 12-year-old boy's bike",
    "A plate of food with a fork,knife and spoon",
    "O'Neil's pub in the U.K..",
    "A sign that says 'don't walk'",
    "A man holding an umbrella ...",
    "a red stop sign !!",
    "is it? no...",
    "Some people -- and a dog - playing",
    "brown/white -hello 'hello really?! wow!? ok..",
    "The dog's. The dogs'. The cat's' bowl",
    "Snow-covered mountains , with skiers ; and lifts : cool",
    "A man with a 'surfboard.'",
    "A GIRAFFE STANDING NEXT TO A TREE",
    "The café's crème brûlée.",
]


# ------------------------------------------------------------------------------------------------ tokenize


def test_tokenize_hand_cases():
    assert tokenize("A man riding a wave on top of a surfboard.") == (
        "a man riding a wave on top of a surfboard".split()
    )
    assert tokenize("The dog's toy, isn't it?") == ["the", "dog", "'s", "toy", "is", "n't", "it"]
    assert tokenize("A cat (black) at 5:30 p.m. in the U.S.") == (
        "a cat -lrb- black -rrb- at 5:30 p.m. in the u.s.".split()
    )
    assert tokenize("") == []
    assert tokenize(" ... ") == []


def test_tokenize_is_idempotent():
    for caption in COCO_LIKE:
        once = tokenize(caption)
        assert tokenize(" ".join(once)) == once, caption


def test_tokenize_rejects_non_strings():
    with pytest.raises(TypeError, match="caption string"):
        tokenize(["a", "list"])


@needs_java
def test_tokenize_matches_the_java_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(COCO_LIKE)})
    for i, caption in enumerate(COCO_LIKE):
        assert " ".join(tokenize(caption)) == java[i][0], caption


# ------------------------------------------------------------------------------------------------ random data


def random_split(seed: int, unseen_words: bool = True):
    """({id: hypothesis}, {id: [5 references]}) over a small vocabulary: many n-gram matches and ties.

    Hypotheses may be empty, one word, copies of a reference, or much longer than the references, and may
    use words no reference has (repeated, so unseen n-grams have term frequencies > 1).
    """
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(rng.randint(4, 25))]
    extra = ["zz", "yy"] if unseen_words else []

    def caption(low: int, high: int, words: list[str]) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high)))

    num_images = rng.randint(30, 100)
    references = {1000 + 13 * i: [caption(1, 16, vocab) for _ in range(5)] for i in range(num_images)}
    hypotheses = {}
    for image_id, refs in references.items():
        kind = rng.random()
        if kind < 0.05:
            hypotheses[image_id] = ""
        elif kind < 0.1:
            hypotheses[image_id] = rng.choice(vocab)
        elif kind < 0.2:
            hypotheses[image_id] = rng.choice(refs)
        elif kind < 0.3:
            hypotheses[image_id] = caption(18, 30, vocab)
        else:
            hypotheses[image_id] = caption(2, 14, vocab + extra)
    return hypotheses, references


def coco_inputs(hypotheses, references):
    """pycocoevalcap's scorer inputs from the same tokenised captions."""
    ids = list(references)
    gts = {i: [" ".join(tokenize(c)) for c in references[i]] for i in ids}
    res = {i: [" ".join(tokenize(hypotheses[i]))] for i in ids}
    return gts, res


# ------------------------------------------------------------------------------------------------ BLEU


def test_bleu_of_a_reference_is_one():
    refs = [["a man riding a horse", "a person on a horse"], ["two dogs play in the snow"]]
    scores = corpus_bleu(["a man riding a horse", "two dogs play in the snow"], refs)
    assert scores == pytest.approx([1.0] * 4, abs=1e-8)


def test_bleu_hand_computed():
    # hypothesis "a b c d" (4 words), reference "a b x d e f" (6 words)
    # unigrams: a, b, d match -> p1 = 3/4; bigrams ab, bc, cd vs ab, bx, xd, de, ef -> p2 = 1/3
    # brevity penalty: 4 < 6 -> exp(1 - 6/4)
    bleu1, bleu2 = corpus_bleu(["a b c d"], [["a b x d e f"]], max_n=2)
    brevity = math.exp(1 - 6 / 4)
    assert bleu1 == pytest.approx(3 / 4 * brevity, rel=1e-8)
    assert bleu2 == pytest.approx(math.sqrt(3 / 4 * 1 / 3) * brevity, rel=1e-8)


@pytest.mark.parametrize("refs", [["a b c d e f", "a b c d"], ["a b c d", "a b c d e f"]])
def test_bleu_closest_reference_ties_go_to_the_shorter(refs):
    # 5 words, references of 6 and 4 words are equally close: COCO takes 4 -> no brevity penalty
    # (torchmetrics alone would take whichever comes first).
    bleu1, bleu2 = corpus_bleu(["a b c d q"], [refs], max_n=2)
    assert bleu1 == pytest.approx(4 / 5, rel=1e-8)
    assert bleu2 == pytest.approx(math.sqrt(4 / 5 * 3 / 4), rel=1e-8)
    gts, res = {0: refs}, {0: ["a b c d q"]}
    assert [bleu1, bleu2] == pytest.approx(Bleu(2).compute_score(gts, res, verbose=0)[0], abs=1e-12)


def test_bleu_tokenises_its_inputs():
    assert corpus_bleu(["A Dog, running."], [["a dog running"]], max_n=3) == pytest.approx([1.0] * 3, abs=1e-8)


@pytest.mark.parametrize("seed", range(12))
def test_bleu_agrees_with_pycocoevalcap(seed):
    hypotheses, references = random_split(seed)
    gts, res = coco_inputs(hypotheses, references)
    expected, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ids = list(references)
    ours = corpus_bleu([hypotheses[i] for i in ids], [references[i] for i in ids])
    assert ours == pytest.approx(expected, abs=1e-4)
    assert ours == pytest.approx(expected, abs=1e-12)  # same formula, same statistics: in fact exact
    for backend in CaptionScorer.BLEU_BACKENDS:
        scores = CaptionScorer(references, bleu=backend)(hypotheses)
        assert [scores[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(expected, abs=1e-12), backend


def test_bleu_rejects_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        corpus_bleu(["a"], [[]])
    with pytest.raises(ValueError, match="max_n"):
        corpus_bleu(["a"], [["a"]], max_n=0)


# ------------------------------------------------------------------------------------------------ CIDEr-D


def test_cider_hand_computed():
    # two images, one reference each: ref_len = log 2; "a" is in both images (idf 0), the rest in one (log 2)
    references = {0: ["a b c"], 1: ["a d e"]}
    cider = CiderD(references)
    # hypothesis = reference: orders 1-3 have cosine 1, order 4 has no n-gram (0); same length -> no penalty
    _, per_image = cider.score({0: "a b c", 1: "a d e"})
    assert per_image[0] == pytest.approx((1 + 1 + 1 + 0) / 4 * 10, rel=1e-12)
    # "b c" vs "a b c": unigrams (b, c) vs (0, b, c) -> cosine 1; bigram "b c" vs ("a b", "b c") -> 1/sqrt 2;
    # bigram counts 1 vs 2 -> penalty exp(-1 / (2 * 6^2))
    _, per_image = cider.score({0: "b c"})
    assert per_image[0] == pytest.approx((1 + 1 / math.sqrt(2)) / 4 * 10 * math.exp(-1 / 72), rel=1e-12)
    gts, res = {0: ["a b c"], 1: ["a d e"]}, {0: ["b c"], 1: ["a d e"]}
    assert per_image[0] == pytest.approx(Cider().compute_score(gts, res)[1][0], rel=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_cider_agrees_with_pycocoevalcap(seed):
    hypotheses, references = random_split(seed)
    gts, res = coco_inputs(hypotheses, references)
    expected, expected_per_image = Cider().compute_score(gts, res)
    score, per_image = CiderD(references).score(hypotheses)
    assert score == pytest.approx(expected, abs=1e-3)
    assert score == pytest.approx(expected, abs=1e-9)
    assert [per_image[i] for i in references] == pytest.approx(list(expected_per_image), abs=1e-9)
    assert CaptionScorer(references)(hypotheses)["cider"] == pytest.approx(expected, abs=1e-9)


EDGE_CASES = [
    ({1: "", 2: ""}, {1: ["a b c"], 2: ["d e"]}),  # nothing predicted
    ({1: "a b"}, {1: ["a b c", "a b"]}),  # one image: every idf is 0
    ({1: "a b", 2: "zz zz zz"}, {1: ["", "a b"], 2: ["..."]}),  # empty references, unseen repeated words
    ({1: "x y z x y z", 2: "q"}, {1: ["a"], 2: ["q"]}),
    ({1: "a a a a a", 2: "b b"}, {1: ["a a", "a"], 2: ["b b b b"]}),  # clipping of repeated words
]


@pytest.mark.parametrize(("hypotheses", "references"), EDGE_CASES)
def test_edge_cases_agree_with_pycocoevalcap(hypotheses, references):
    gts, res = coco_inputs(hypotheses, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    ids = list(references)
    assert corpus_bleu([hypotheses[i] for i in ids], [references[i] for i in ids]) == pytest.approx(bleu, abs=1e-12)
    assert CiderD(references).score(hypotheses)[0] == pytest.approx(cider, abs=1e-12)
    fast = CaptionScorer(references)(hypotheses)
    assert [fast[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert fast["cider"] == pytest.approx(cider, abs=1e-12)


def test_references_without_words_score_zero():
    # pycocoevalcap's Cider fails here (max() of no document frequency); every similarity is 0
    hypotheses, references = {1: "a b", 2: "c"}, {1: ["..."], 2: ["!"]}
    assert CiderD(references).score(hypotheses) == (0.0, {1: 0.0, 2: 0.0})
    assert CaptionScorer(references)(hypotheses)["cider"] == 0.0


def test_cider_scores_a_subset_with_the_split_statistics():
    hypotheses, references = random_split(3)
    cider = CiderD(references)
    _, everything = cider.score(hypotheses)
    subset = dict(list(hypotheses.items())[::3])
    score, per_image = cider.score(subset)
    assert per_image == pytest.approx({i: everything[i] for i in subset}, abs=1e-12)
    assert score == pytest.approx(sum(per_image.values()) / len(subset), abs=1e-12)


def test_cider_accepts_a_list_of_references():
    hypotheses, references = random_split(5)
    as_list = list(references.values())
    by_position = {k: hypotheses[i] for k, i in enumerate(references)}
    assert CiderD(as_list).score(by_position)[0] == pytest.approx(CiderD(references).score(hypotheses)[0])


def test_cider_rejects_bad_input():
    with pytest.raises(ValueError, match="is empty"):
        CiderD({})
    with pytest.raises(ValueError, match=r"references\[7\] must be a non-empty list"):
        CiderD({7: []})
    with pytest.raises(ValueError, match=r"references\[7\] must be a non-empty list"):
        CiderD({7: "a caption, not a list"})
    cider = CiderD({1: ["a b"], 2: ["c d"]})
    with pytest.raises(ValueError, match=r"no reference captions \(e.g. \[3\]\)"):
        cider.score({3: "a b"})
    with pytest.raises(ValueError, match="no predictions"):
        cider.score({})


# ------------------------------------------------------------------------------------------------ CaptionScorer


def test_caption_scorer_on_a_subset_matches_corpus_bleu_and_cider():
    hypotheses, references = random_split(7)
    scorer = CaptionScorer(references)
    subset = dict(list(hypotheses.items())[1::2])
    scores = scorer(subset)
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}
    bleu = corpus_bleu(list(subset.values()), [references[i] for i in subset])
    assert [scores[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert scores["cider"] == pytest.approx(CiderD(references).score(subset)[0], abs=1e-12)
    assert scorer(subset) == scores  # the scorer holds no state between calls


def test_caption_scorer_perfect_and_unknown_ids():
    references = {5: ["a dog runs on the grass", "a brown dog running"], 9: ["two cats sleep on a bed"]}
    scorer = CaptionScorer(references)
    scores = scorer({5: "A dog runs on the grass.", 9: "two cats sleep on a bed"})
    assert [scores[f"bleu{k}"] for k in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-8)
    with pytest.raises(ValueError, match="no reference captions"):
        scorer({5: "a dog", 6: "a cat"})


# ------------------------------------------------------------------------------------------------ COCO evaluation


COCO_REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.",
        "Someone surfing on a big wave in the ocean."],
    2: ["Two dogs playing in the snow.", "Two dogs run through the snow, playing.", "Dogs play in snow."],
    3: ["A plate of food with broccoli and rice.", "A white plate topped with rice and broccoli.",
        "Rice and broccoli on a plate."],
}
COCO_PREDICTIONS = {1: "A man riding a wave on a surfboard.", 2: "Two dogs playing in the snow", 3: ""}


@needs_java
def test_coco_caption_eval_without_meteor():
    corpus, per_image = coco_caption_eval_detailed(COCO_PREDICTIONS, COCO_REFERENCES, meteor=False)
    assert set(corpus) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    for name, value in corpus.items():
        assert 0.0 <= value <= 10.0, (name, value)
    assert corpus["bleu1"] > 0.4 and corpus["rouge_l"] > 0.3 and corpus["cider"] > 0.5
    assert per_image[3]["cider"] == 0.0 and per_image[2]["bleu1"] > 0.99
    # on captions our tokenizer splits like Java's, the fast scorer gives the official numbers
    fast = CaptionScorer(COCO_REFERENCES)(COCO_PREDICTIONS)
    for name in ("bleu1", "bleu2", "bleu3", "bleu4", "cider"):
        assert fast[name] == pytest.approx(corpus[name], abs=1e-9), name


@needs_java
def test_coco_caption_eval_with_meteor():
    # METEOR's Java start-up (it loads a paraphrase table) takes 7-19 s on a busy 2-core machine
    corpus = coco_caption_eval(COCO_PREDICTIONS, COCO_REFERENCES)
    assert set(corpus) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}
    assert 0.1 < corpus["meteor"] < 1.0
    without = coco_caption_eval(COCO_PREDICTIONS, COCO_REFERENCES, meteor=False)
    assert without == {k: v for k, v in corpus.items() if k != "meteor"}


def test_coco_caption_eval_explains_what_is_missing(monkeypatch):
    references, predictions = {1: ["a dog"]}, {1: "a dog"}
    with pytest.raises(ValueError, match="no reference captions"):
        coco_caption_eval({2: "a dog"}, references)
    monkeypatch.setattr(official.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no `java` is on PATH"):
        coco_caption_eval(predictions, references)


def test_spice_without_its_models_says_where_to_put_them(monkeypatch):
    import os

    real_isfile = os.path.isfile
    monkeypatch.setattr(official.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(
        official.os.path, "isfile", lambda path: False if "stanford-corenlp" in str(path) else real_isfile(path)
    )
    with pytest.raises(FileNotFoundError, match=r"stanford-corenlp-3\.6\.0-models\.jar.*spice/lib"):
        coco_caption_eval({1: "a dog"}, {1: ["a dog"]}, spice=True)


# ------------------------------------------------------------------------------------------------ DecodedCaptions


def test_decoded_captions_deduplicates_and_strips_padding():
    collector = DecodedCaptions(max_length=6)
    collector.update(torch.tensor([4, 2]), torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]]))
    collector.update(torch.tensor([9, 4]), torch.tensor([[8, 8, 8, 8, 8, 2], [5, 6, 2, 0, 0, 0]]))
    collector.update(torch.tensor([3]), torch.tensor([[0, 0]]))
    decoded = collector.compute()
    assert list(decoded) == [2, 3, 4, 9]
    assert decoded[4].tolist() == [5, 6, 2]
    assert decoded[2].tolist() == [7, 2]
    assert decoded[9].tolist() == [8, 8, 8, 8, 8, 2]
    assert decoded[3].tolist() == []
    assert all(t.dtype == torch.long for t in decoded.values())
    collector.reset()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert collector.compute() == {}


def test_decoded_captions_keeps_the_first_of_repeated_ids():
    collector = DecodedCaptions(max_length=3)
    collector.update(torch.tensor([1, 1]), torch.tensor([[5, 2, 0], [6, 2, 0]]))
    assert collector.compute()[1].tolist() == [5, 2]


def test_decoded_captions_rejects_bad_input():
    with pytest.raises(ValueError, match="max_length"):
        DecodedCaptions(max_length=0)
    collector = DecodedCaptions(max_length=3)
    with pytest.raises(ValueError, match="exceed max_length=3"):
        collector.update(torch.tensor([1]), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image_ids \(N,\) and tokens \(N, L\)"):
        collector.update(torch.tensor([1, 2]), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        collector.update(torch.tensor([1]), torch.ones(1, 3))


WORDS = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "dog", "cat", "runs", "sits", "on", "the", "grass", "mat"]


def toy_split():
    """7 images' decoded token rows (ragged, <END>-terminated) and their references."""
    rng = random.Random(0)
    rows, references = {}, {}
    for image_id in range(100, 107):
        length = rng.randint(2, 7)
        rows[image_id] = [rng.randint(4, len(WORDS) - 1) for _ in range(length)] + [2]
        references[image_id] = [" ".join(rng.choices(WORDS[4:], k=rng.randint(3, 7))) for _ in range(3)]
    return rows, references


def decode(tokens: torch.Tensor) -> str:
    words = []
    for token in tokens.tolist():
        if token == 2:
            break
        words.append(WORDS[token])
    return " ".join(words)


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rows, references = toy_split()
        ids = list(rows)
        # DistributedSampler(shuffle=False): pad to a multiple of world_size by repeating the first ids
        padded = ids + ids[: (-len(ids)) % world_size]
        shard = padded[rank::world_size]
        collector = DecodedCaptions(max_length=10)
        for batch in (shard[:2], shard[2:]):  # two batches of different caption lengths
            width = max(len(rows[i]) for i in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for r, image_id in enumerate(batch):
                tokens[r, : len(rows[image_id])] = torch.tensor(rows[image_id])
            collector.update(torch.tensor(batch), tokens)
        decoded = collector.compute()
        scores = CaptionScorer(references)({i: decode(t) for i, t in decoded.items()})
        torch.save({"ids": list(decoded), "tokens": [t.tolist() for t in decoded.values()], "scores": scores,
                    "shard": shard}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # spawns two Python processes that import torch: 13-27 s on a busy 2-core machine
def test_decoded_captions_two_processes_equal_one(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rows, references = toy_split()
    single = CaptionScorer(references)({i: decode(torch.tensor(r)) for i, r in rows.items()})
    shards = []
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        shards.append(result["shard"])
        assert result["ids"] == sorted(rows)
        assert result["tokens"] == [rows[i] for i in sorted(rows)]
        assert result["scores"] == pytest.approx(single, abs=1e-12)
    assert len(set(shards[0]) & set(shards[1])) == 1  # the padding really repeated an image across ranks


def _random_caption_set(seed: int, images: int = 12, refs: int = 4):
    import random

    rng = random.Random(seed)
    words = "a the red blue small large square circle star on left right of and there is".split()
    references = {i: [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(refs)]
                  for i in range(images)}
    # training captions: the references' own words, repeated n-grams included ("a red a red square")
    train = [" ".join(rng.choice(words[:6]) for _ in range(rng.randint(1, 8))) for _ in range(200)]
    return references, train


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constant_caption_bleu_equals_scoring_each_caption(seed):
    references, train = _random_caption_set(seed)
    scorer = CaptionScorer(references, bleu="numpy")
    ids = sorted(references)[: 9]  # a subset of the split's images
    candidates = sorted(set(train))[:60]
    fast = scorer.constant_bleu(candidates, ids)
    for caption, row in zip(candidates, fast, strict=True):
        slow = scorer({i: caption for i in ids})
        assert row == pytest.approx([slow[f"bleu{k}"] for k in range(1, 5)], rel=1e-12, abs=1e-15)


def test_the_blind_baseline_is_the_best_of_every_training_caption():
    from collections import Counter

    from captioning.callbacks import best_constant_caption

    references, train = _random_caption_set(5)
    # the best constant caption is rare: the 50 most frequent captions are worse ones
    best_rare = references[0][0]
    train = [c for c in train for _ in range(3)] + [best_rare]
    scorer = CaptionScorer(references)
    ids = sorted(references)
    brute = max(Counter(" ".join(tokenize(c)) for c in train), key=lambda c: scorer({i: c for i in ids})["bleu4"])
    caption, scores = best_constant_caption(train, scorer, ids)
    assert scores["bleu4"] == pytest.approx(scorer({i: brute for i in ids})["bleu4"], rel=1e-12)
    assert caption == brute
    top50, top50_scores = best_constant_caption(train, scorer, ids, candidates=50)
    assert top50_scores["bleu4"] < 0.5 * scores["bleu4"]  # what the old search over the 50 most frequent reported
