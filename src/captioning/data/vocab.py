"""Caption vocabulary: tokenisation, word <-> id maps, encoding, decoding and padding.

Token ids are fixed (docs/architecture.md, "Contracts"): ``<NULL>`` = 0 (padding), ``<START>`` = 1,
``<END>`` = 2, ``<UNK>`` = 3. Every conversion between ids and words in the project goes through
:class:`Vocabulary`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioning.io import read_json, write_json

_NOT_WORD_CHARS = re.compile(r"[^a-z0-9 ]")
_WORD_CHAR = re.compile(r"[a-z0-9]")
_SEP = "\x01"  # between the captions of one joined text: not a word character, so no word holds it
_NOT_WORD_OR_SEP = re.compile(r"[^a-z0-9 \x01]")
_CHUNK = 50_000  # captions per joined text: the speed of one, without 7M word strings alive at once (~0.5 GB)


def _joined_words(captions: Sequence[str]) -> list[str]:
    """The words of every caption, as :meth:`Vocabulary.tokenize` splits them, in one list with ``_SEP`` between
    captions: one lower-casing, one substitution and one split for the lot instead of three per caption (591k
    COCO captions: ~1 s instead of ~5)."""
    text = f" {_SEP} ".join(captions)
    if text.count(_SEP) != max(len(captions) - 1, 0):  # a caption holds it: there it is a space, as tokenize has it
        text = f" {_SEP} ".join(c.replace(_SEP, " ") for c in captions)
    # lower() maps character by character (the context rules change only letters tokenize drops), so the
    # joined text lowers as each caption does
    return _NOT_WORD_OR_SEP.sub(" ", text.lower()).split()


class Vocabulary:
    """A fixed word list; the position of a word in ``idx_to_word`` is its id.

    The first four entries are always the special tokens ``<NULL>``, ``<START>``, ``<END>``, ``<UNK>``.
    """

    NULL, START, END, UNK = "<NULL>", "<START>", "<END>", "<UNK>"
    SPECIALS = (NULL, START, END, UNK)

    def __init__(self, idx_to_word: Sequence[str]) -> None:
        words = list(idx_to_word)
        if tuple(words[: len(self.SPECIALS)]) != self.SPECIALS:
            raise ValueError(
                f"A vocabulary must start with the special tokens {list(self.SPECIALS)} in this order "
                f"(ids 0-3), but it starts with {words[: len(self.SPECIALS)]}. Build it with "
                "Vocabulary.build(captions) or fix the word list."
            )
        not_str = [w for w in words if not isinstance(w, str) or not w]
        if not_str:
            raise ValueError(
                f"Every vocabulary entry must be a non-empty string; found {not_str[:5]!r}."
            )
        duplicates = sorted(w for w, n in Counter(words).items() if n > 1)
        if duplicates:
            raise ValueError(
                f"The vocabulary lists these words more than once: {duplicates[:10]}; each word needs a "
                "single id. Rebuild it with Vocabulary.build(captions)."
            )
        self.idx_to_word: list[str] = words
        self.word_to_idx: dict[str, int] = {w: i for i, w in enumerate(words)}

    # ------------------------------------------------------------------ building
    @staticmethod
    def tokenize(caption: str) -> list[str]:
        """Lower-case, replace everything but ``a-z``, ``0-9`` and spaces by a space, split on whitespace."""
        return _NOT_WORD_CHARS.sub(" ", caption.lower()).split()

    @staticmethod
    def has_words(caption: str) -> bool:
        """Whether :meth:`tokenize` finds any word in ``caption`` (without making the list)."""
        return _WORD_CHAR.search(caption.lower()) is not None

    @classmethod
    def build(cls, captions: Iterable[str], min_word_count: int = 1) -> Vocabulary:
        """Vocabulary of every word seen at least ``min_word_count`` times in ``captions``.

        Words are ordered by count (most frequent first), ties alphabetically, so the result
        depends only on the multiset of captions. Rarer words later encode to ``<UNK>``.
        """
        if isinstance(min_word_count, bool) or not isinstance(min_word_count, int) or min_word_count < 1:
            raise ValueError(f"min_word_count must be an integer >= 1, got {min_word_count!r}.")
        captions = captions if isinstance(captions, Sequence) else list(captions)
        counts: Counter[str] = Counter()
        for start in range(0, len(captions), _CHUNK):
            counts.update(_joined_words(captions[start:start + _CHUNK]))
        counts.pop(_SEP, None)
        kept = sorted((w for w, n in counts.items() if n >= min_word_count), key=lambda w: (-counts[w], w))
        return cls([*cls.SPECIALS, *kept])

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.idx_to_word)

    def __getitem__(self, word: str) -> int:
        return self.word_to_idx.get(word, self.unk_id)

    def __contains__(self, word: object) -> bool:
        return word in self.word_to_idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.idx_to_word == other.idx_to_word

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside; equality is by content

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    @property
    def null_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return 1

    @property
    def end_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    # ------------------------------------------------------------------ encode / decode
    def encode(self, caption: str, max_length: int) -> list[int]:
        """``[<START>] + ids of the first max_length words + [<END>]``; unknown words -> ``<UNK>``."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1 (words per caption), got {max_length!r}.")
        words = self.tokenize(caption)[:max_length]
        return [self.start_id, *(self[w] for w in words), self.end_id]

    def encode_batch(self, captions: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode` of every caption at once: ids (P, max_length + 2) int64, each row padded with ``<NULL>``
        after its ``<END>``, and the lengths (P,) of the encoded captions (``<START>`` and ``<END>`` included)."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1 (words per caption), got {max_length!r}.")
        count = len(captions)
        ids = np.zeros((count, max_length + 2), dtype=np.int64)
        lengths = np.zeros(count, dtype=np.int64)
        lookup = {**self.word_to_idx, _SEP: -1}
        for start in range(0, count, _CHUNK):
            chunk = captions[start:start + _CHUNK]
            words = _joined_words(chunk)
            tokens = np.fromiter(map(lookup.get, words, repeat(self.unk_id)), dtype=np.int64, count=len(words))
            is_sep = tokens == -1
            caption = np.cumsum(is_sep)[~is_sep]  # (W,) the caption (in the chunk) of each word
            tokens = tokens[~is_sep]
            per_caption = np.bincount(caption, minlength=len(chunk))
            position = np.arange(len(tokens)) - (np.cumsum(per_caption) - per_caption)[caption]
            kept = position < max_length
            ids[start + caption[kept], position[kept] + 1] = tokens[kept]
            kept_words = np.minimum(per_caption, max_length)
            ids[start + np.arange(len(chunk)), kept_words + 1] = self.end_id
            lengths[start:start + len(chunk)] = kept_words + 2
        ids[:, 0] = self.start_id
        return ids, lengths

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Words of ``ids`` (a sequence or 1-D tensor) joined by spaces.

        Stops at the first ``<END>``; ``<NULL>`` and ``<START>`` are skipped; ``<UNK>`` is kept.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes one caption, a 1-D tensor of ids; got shape {tuple(ids.shape)}. "
                    "Use decode_batch for (N, L)."
                )
            ids = ids.tolist()
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.null_id, self.start_id):
                continue
            if not 0 <= i < len(self):
                raise ValueError(f"Token id {i} is outside this vocabulary of {len(self)} words.")
            words.append(self.idx_to_word[i])
        return " ".join(words)

    def words(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """The tokens a decoder emitted, up to and including ``<END>``, one per decoding step (what an
        attention map is drawn for); stops at ``<NULL>`` padding."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
        words = []
        for i in map(int, ids):
            if i == self.null_id:
                break
            words.append(self.idx_to_word[i])
            if i == self.end_id:
                break
        return words

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        """(N, L) ids -> N strings, each decoded as in :meth:`decode`."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"decode_batch takes a (N, L) tensor of ids, got {shape}.")
        return [self.decode(row) for row in ids.tolist()]

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, list[str]]:
        """Plain JSON-able form, stored inside checkpoints: ``{"idx_to_word": [...]}``."""
        return {"idx_to_word": list(self.idx_to_word)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        if not isinstance(d, dict) or not isinstance(d.get("idx_to_word"), list):
            raise ValueError(
                "A vocabulary dict needs the key 'idx_to_word' holding a list of words; got "
                f"{type(d).__name__} with keys {sorted(d) if isinstance(d, dict) else '-'}."
            )
        return cls(d["idx_to_word"])

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write the vocabulary (and optional plain ``metadata``) as JSON, atomically.

        The file appears complete or not at all, so a reader on another rank never sees half of it.
        """
        payload: dict[str, Any] = self.to_dict()
        if metadata:
            payload["metadata"] = metadata
        return write_json(path, payload, indent=1)

    @staticmethod
    def _read_json(path: Path) -> Any:
        if not path.is_file():
            raise FileNotFoundError(
                f"Vocabulary file {path} does not exist. It is written by the DataModule's prepare_data() "
                "from the training captions; run that first or point vocab_path at an existing file."
            )
        return read_json(path, lambda what: ValueError(
            f"Vocabulary file {path}: {what}. Delete it so prepare_data() rebuilds it from the training captions."))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        path = Path(path)
        data = cls._read_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(
                f"Vocabulary file {path} is not a valid vocabulary: {err} Delete it so prepare_data() "
                "rebuilds it."
            ) from err

    @classmethod
    def read_metadata(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The ``metadata`` saved beside the words, ``{}`` when there is none or the file is unreadable."""
        try:
            data = cls._read_json(Path(path))
        except (FileNotFoundError, ValueError):
            return {}
        meta = data.get("metadata") if isinstance(data, dict) else None
        return meta if isinstance(meta, dict) else {}


def pad_captions(captions: Sequence[Sequence[int] | torch.Tensor], pad_id: int = 0) -> torch.Tensor:
    """Stack encoded captions into a LongTensor (N, T+1), right-padded with ``pad_id`` (``<NULL>``).

    T+1 is the length of the longest caption given.
    """
    if len(captions) == 0:
        raise ValueError("pad_captions needs at least one caption, got an empty list.")
    rows = [torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in captions]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
