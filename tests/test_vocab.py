"""Vocabulary: tokenisation, building with <UNK>, encoding with truncation, decoding, padding, persistence."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from captioning.data.vocab import Vocabulary, pad_captions

CAPTIONS = ["A cat sat.", "a dog sat", "A CAT ran!", "the cat, the dog"]
# counts: cat 3, a 3, sat 2, the 2, dog 2, ran 1


def test_tokenize_lowercases_and_strips_punctuation():
    assert Vocabulary.tokenize("A Man, riding-a HORSE!\n on 2 legs.") == [
        "a", "man", "riding", "a", "horse", "on", "2", "legs"]
    assert Vocabulary.tokenize("  ...  ") == []


def test_build_orders_by_count_then_alphabet_and_starts_with_specials():
    vocab = Vocabulary.build(CAPTIONS)
    assert vocab.idx_to_word == ["<NULL>", "<START>", "<END>", "<UNK>",
                                 "a", "cat", "dog", "sat", "the", "ran"]
    assert (vocab.null_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.word_to_idx["cat"] == 5 and vocab["cat"] == 5
    assert len(vocab) == 10


def test_min_word_count_sends_rare_words_to_unk():
    vocab = Vocabulary.build(CAPTIONS, min_word_count=3)
    assert vocab.idx_to_word[4:] == ["a", "cat"]
    assert "dog" not in vocab
    assert vocab["dog"] == vocab.unk_id
    assert vocab.encode("a dog", max_length=5) == [1, 4, 3, 2]


def test_build_rejects_bad_min_word_count():
    with pytest.raises(ValueError, match="min_word_count"):
        Vocabulary.build(CAPTIONS, min_word_count=0)


def test_encode_adds_start_end_and_truncates_to_max_length():
    vocab = Vocabulary.build(CAPTIONS)
    assert vocab.encode("The cat sat.", max_length=16) == [1, 8, 5, 7, 2]
    ids = vocab.encode("a cat sat the dog ran", max_length=3)
    assert ids == [1, 4, 5, 7, 2]
    assert len(ids) == 3 + 2
    assert vocab.encode("zebra", max_length=4) == [1, 3, 2]
    with pytest.raises(ValueError, match="max_length"):
        vocab.encode("a cat", max_length=0)


def test_decode_stops_at_end_and_skips_null_and_start():
    vocab = Vocabulary.build(CAPTIONS)
    assert vocab.decode([1, 4, 5, 2, 6, 6]) == "a cat"
    assert vocab.decode(torch.tensor([0, 1, 4, 0, 3, 7])) == "a <UNK> sat"
    assert vocab.decode([2, 4]) == ""
    with pytest.raises(ValueError, match="outside"):
        vocab.decode([1, 99])
    with pytest.raises(ValueError, match="decode_batch"):
        vocab.decode(torch.ones(2, 3, dtype=torch.long))


def test_decode_batch_decodes_each_row():
    vocab = Vocabulary.build(CAPTIONS)
    ids = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 7, 9, 2]])
    assert vocab.decode_batch(ids) == ["a cat", "dog sat ran"]


@given(st.lists(st.sampled_from(["a", "cat", "dog", "sat", "Ran!", "the,", "zebra"]), max_size=12),
       st.integers(min_value=1, max_value=8))
def test_decode_inverts_encode_up_to_tokenisation_truncation_and_unk(words, max_length):
    vocab = Vocabulary.build(CAPTIONS)
    caption = " ".join(words)
    expected = [w if w in vocab else "<UNK>" for w in Vocabulary.tokenize(caption)[:max_length]]
    assert vocab.decode(vocab.encode(caption, max_length)) == " ".join(expected)


def test_pad_captions_pads_with_null_to_the_longest():
    padded = pad_captions([[1, 5, 6, 2], [1, 2], [1, 7, 2]])
    assert padded.dtype == torch.long
    assert padded.tolist() == [[1, 5, 6, 2], [1, 2, 0, 0], [1, 7, 2, 0]]
    assert pad_captions([torch.tensor([1, 2])]).shape == (1, 2)
    with pytest.raises(ValueError, match="at least one"):
        pad_captions([])


def test_constructor_validates_specials_and_duplicates():
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(["a", "<NULL>", "<START>", "<END>", "<UNK>"])
    with pytest.raises(ValueError, match="more than once"):
        Vocabulary(["<NULL>", "<START>", "<END>", "<UNK>", "a", "a"])


def test_to_dict_is_plain_json_and_round_trips():
    vocab = Vocabulary.build(CAPTIONS)
    d = vocab.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert type(d) is dict and all(type(w) is str for w in d["idx_to_word"])
    assert Vocabulary.from_dict(d) == vocab
    with pytest.raises(ValueError, match="idx_to_word"):
        Vocabulary.from_dict({"words": []})


def test_save_load_round_trip_with_metadata(tmp_path):
    vocab = Vocabulary.build(CAPTIONS, min_word_count=2)
    path = vocab.save(tmp_path / "sub" / "vocab.json", metadata={"min_word_count": 2})
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.word_to_idx == vocab.word_to_idx
    assert Vocabulary.read_metadata(path) == {"min_word_count": 2}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Vocabulary.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"idx_to_word": ["<NULL>"')
    with pytest.raises(ValueError, match=str(corrupt)):
        Vocabulary.load(corrupt)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"idx_to_word": ["a", "b"]}))
    with pytest.raises(ValueError, match=str(wrong)):
        Vocabulary.load(wrong)
    assert Vocabulary.read_metadata(corrupt) == {}


TRICKY = ["The cat sat.", "", "   ", "...!", "a  dog\tran\nfast, very very fast today", "İstanbul Kelvin ΣΑΣ cat",
          "x" * 40, "a-b_c 3d 42", "DOG", "cat\x01dog"]


@pytest.mark.parametrize("captions", [TRICKY, TRICKY[:-1], [], ["one"]])
@pytest.mark.parametrize("max_length", [1, 3, 16])
@pytest.mark.parametrize("chunk", [3, 50_000])
def test_encode_batch_is_encode_of_every_caption(captions, max_length, chunk, monkeypatch):
    """The batched path (joined texts of `chunk` captions) gives each caption exactly Vocabulary.encode's ids,
    padded with <NULL>; a caption holding the joiner reads it as a space, as tokenize does."""
    monkeypatch.setattr("captioning.data.vocab._CHUNK", chunk)
    vocab = Vocabulary.build(CAPTIONS + ["dog ran fast today istanbul kelvin"], min_word_count=1)
    ids, lengths = vocab.encode_batch(captions, max_length)
    assert ids.shape == (len(captions), max_length + 2) and ids.dtype == np.int64
    for row, n, caption in zip(ids.tolist(), lengths.tolist(), captions, strict=True):
        assert row[:n] == vocab.encode(caption, max_length) and not any(row[n:])


@pytest.mark.parametrize("chunk", [2, 50_000])
def test_build_counts_as_tokenize_splits(chunk, monkeypatch):
    monkeypatch.setattr("captioning.data.vocab._CHUNK", chunk)
    captions = TRICKY + CAPTIONS * 3
    counts = Counter(w for c in captions for w in Vocabulary.tokenize(c))
    for min_count in (1, 2, 4):
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        assert Vocabulary.build(iter(captions), min_count).idx_to_word == [*Vocabulary.SPECIALS, *kept]
        assert Vocabulary.build(TRICKY[:-1] + CAPTIONS * 3, min_count) == Vocabulary.build(
            [c for c in captions if "\x01" not in c], min_count)
    assert [Vocabulary.has_words(c) for c in TRICKY] == [bool(Vocabulary.tokenize(c)) for c in TRICKY]


@given(st.lists(st.text(alphabet="aBc zΣİ.,\n\t-9\x01", max_size=12), max_size=8), st.integers(1, 5))
def test_encode_batch_property(captions, max_length):
    vocab = Vocabulary.build(["a b c z 9 bc ab", "ab ab c"])
    ids, lengths = vocab.encode_batch(captions, max_length)
    assert [row[:n] for row, n in zip(ids.tolist(), lengths.tolist(), strict=True)] == [vocab.encode(c, max_length) for c in captions]
    assert Vocabulary.build(captions + ["a"]) == Vocabulary.build(iter(captions + ["a"]))
