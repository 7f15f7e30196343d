"""Compositional splits of the built-in set: what training is never shown, so validation can ask whether a
captioner learned to *see* (colour and shape, each on its own) or learned *this set* (which shapes come in
which colours).

A :class:`Holdout` says what the training scenes leave out and how the evaluation scenes differ:

- ``pairs``: ``<colour> <shape>`` pairs that no training scene contains (a training scene drawn with one is
  drawn again from its own random stream), while validation and test keep them; validation then scores the
  captions on the held-out pairs and on the seen ones separately (Nikolaus et al. 2019, "Compositional
  Generalization in Image Captioning", held adjective-noun pairs out of COCO the same way).
- ``same_color_triples``: no three-object training scene has two objects of one colour; validation scores
  such scenes apart from the other three-object scenes.
- ``eval_scale``: validation and test objects drawn at this multiple of the training radii (the size words
  keep their meaning relative to each other; 1 = as in training).

Presets (``data.holdout=pairs``): ``pairs`` (red star, blue circle, green square, yellow triangle: each
colour and each shape held out at most once, so every colour and every shape is still seen with three or
four partners), ``layout`` (``same_color_triples``), ``scale`` (``eval_scale=0.8``), ``compositional``
(pairs and layout). A list combines presets, a mapping gives the fields: ``{pairs: [red star], eval_scale: 1.2}``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Holdout", "PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    "pairs": {"pairs": ["red star", "blue circle", "green square", "yellow triangle"]},
    "layout": {"same_color_triples": True},
    "scale": {"eval_scale": 0.8},
}
PRESETS["compositional"] = {**PRESETS["pairs"], **PRESETS["layout"]}
FIELDS = ("pairs", "same_color_triples", "eval_scale")


@dataclass(frozen=True)
class Holdout:
    """What training scenes leave out, and how evaluation scenes are drawn (see the module docstring).

    ``pairs`` holds (colour, shape) tuples.
    """

    pairs: frozenset[tuple[str, str]] = frozenset()
    same_color_triples: bool = False
    eval_scale: float = 1.0

    # --------------------------------------------------------------------------------------- building
    @classmethod
    def parse(cls, spec: Any, colors: Collection[str] | None = None, shapes: Collection[str] | None = None) -> Holdout:
        """``data.holdout`` -> a Holdout: None, a preset name, a list of presets, or a mapping of the fields.

        Given the set's ``colors`` and ``shapes``, the pairs are checked against them, so a typo is an error,
        not a held-out pair that never occurs.
        """
        if spec is None or spec == "none" or spec == [] or spec == {}:
            return cls()
        fields: dict[str, Any] = {}
        for part in (spec if isinstance(spec, list | tuple) else [spec]):
            if isinstance(part, str):
                if part not in PRESETS:
                    raise ValueError(f"data.holdout={part!r} is not a preset; use one of "
                                     f"{', '.join(PRESETS)}, a list of them, or a mapping of {', '.join(FIELDS)}.")
                part = PRESETS[part]
            if not isinstance(part, Mapping) or set(part) - set(FIELDS):
                unknown = sorted(set(part) - set(FIELDS)) if isinstance(part, Mapping) else part
                raise ValueError(f"data.holdout: {unknown!r} is not a preset or one of the fields "
                                 f"{', '.join(FIELDS)} (e.g. data.holdout='{{pairs: [red star], eval_scale: 0.8}}').")
            for name, value in part.items():
                fields[name] = sorted({*fields.get(name, []), *value}) if name == "pairs" else value
        pairs = frozenset(_pair(p, colors, shapes) for p in fields.get("pairs", []))
        scale = fields.get("eval_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.3 <= scale <= 1.6:
            raise ValueError(f"data.holdout eval_scale must be a number in [0.3, 1.6] (objects must still fit "
                             f"the image), got {scale!r}.")
        return cls(pairs, bool(fields.get("same_color_triples", False)), float(scale))

    def __bool__(self) -> bool:
        return bool(self.pairs) or self.same_color_triples or self.eval_scale != 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for the data set's stamp and annotation files)."""
        return {"pairs": sorted(" ".join(p) for p in self.pairs), "same_color_triples": self.same_color_triples,
                "eval_scale": self.eval_scale}

    @property
    def tag(self) -> str:
        """A short name for the folder the held-out variant of the set is drawn into: the preset's name when the
        holdout is one, else a hash of its fields."""
        for name, preset in PRESETS.items():
            if self == Holdout.parse(preset):
                return name
        return "holdout-" + hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

    # --------------------------------------------------------------------------------------- scenes
    def excludes(self, objects: Iterable[Any]) -> bool:
        """Whether a training scene with these objects (``color`` and ``shape`` attributes or keys) is left out."""
        pairs = [_attributes(o) for o in objects]
        if any(p in self.pairs for p in pairs):
            return True
        return self.same_color_triples and _same_color_triple(pairs)

    def subsets(self, scenes: Mapping[int, Mapping[str, Any]]) -> dict[str, frozenset[int]]:
        """Image subsets that validation scores apart: ``novel_layout`` (three objects, two of one colour)
        and ``seen_layout`` (the other three-object scenes), with ``same_color_triples``; {} otherwise."""
        if not self.same_color_triples:
            return {}
        triples = {i: [_attributes(o) for o in s["objects"]] for i, s in scenes.items() if len(s["objects"]) == 3}
        novel = frozenset(i for i, pairs in triples.items() if _same_color_triple(pairs))
        return {"novel_layout": novel, "seen_layout": frozenset(triples) - novel}


def _attributes(obj: Any) -> tuple[str, str]:
    if isinstance(obj, Mapping):
        return str(obj["color"]), str(obj["shape"])
    return obj.color, obj.shape


def _same_color_triple(pairs: list[tuple[str, str]]) -> bool:
    return len(pairs) == 3 and max(Counter(color for color, _ in pairs).values()) >= 2


def _pair(text: Any, colors: Collection[str] | None, shapes: Collection[str] | None) -> tuple[str, str]:
    words = str(text).split()
    known = colors is None or (len(words) == 2 and words[0] in colors and words[1] in (shapes or ()))
    if len(words) != 2 or not known:
        raise ValueError(f"data.holdout pair {text!r} is not '<colour> <shape>'"
                         + (f" with a colour of {', '.join(colors)} and a shape of {', '.join(shapes or ())}."
                            if colors is not None else "."))
    return words[0], words[1]
