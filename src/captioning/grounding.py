"""Grounded evaluation: are the things a caption names in the picture?

BLEU and CIDEr-D reward the language of the references; a captioner can score well on them while most
objects it names are not there. The built-in shapes set knows every scene (the ``scene`` field of each
image record: shape, colour, size and centre of every object), so its captions can be checked against
the truth. This module parses captions into what they claim and scores the claims:

- **object precision**: of the ``<colour> <shape>`` objects a caption names, the fraction that exist in
  the image. ``1 - precision`` is the CHAIR-i hallucination rate of Rohrbach et al. (2018, "Object
  Hallucination in Image Captioning") on this set's objects; ``chair_s`` is their sentence-level rate:
  captions naming at least one object that is not there.
- **object recall**: of the scene's objects, the fraction a caption names (colour and shape).
- **attribute accuracy**: of the colours, shapes, sizes, counts and positions / relations a caption
  states, the fraction that are true of the objects they are stated about.
- per image: ``correct`` (something named and nothing false), ``exact`` (every object of the scene named
  by its colour and shape, nothing invented, nothing false) and ``single_exact`` (``exact`` on the images
  with one object).

The parser reads the generator's templates and what a model may say instead: plurals ("two red squares"),
the generic noun ("a white shape", "three large shapes"), attributes left out ("a circle"), phrases in
any order, words it does not know (skipped). It works on strings and plain scene dicts only.

Mentions are matched to the scene's objects one to one, maximising agreement (a named ``<colour>
<shape>`` first, then single attributes, then position), so "a red square and a red square" for an image
with one red square names one real object and invents another.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Lexicon", "Mention", "Parsed", "parse_caption", "CaptionGrounding", "GroundingScorer", "SHAPES_LEXICON"]


@dataclass(frozen=True)
class Lexicon:
    """The words of a scene vocabulary: what each noun, colour and size word means.

    ``shapes`` maps every noun, singular and plural, to its shape; ``generic`` are the nouns that name
    any object ("shape", "object"). The defaults are the built-in set's (``captioning.data.shapes``; a
    test keeps the two in step).
    """

    shapes: Mapping[str, str]
    colors: frozenset[str]
    sizes: frozenset[str]
    generic: frozenset[str] = frozenset({"shape", "shapes", "object", "objects", "thing", "things"})

    @classmethod
    def from_words(cls, shapes: Sequence[str], plurals: Mapping[str, str], colors: Sequence[str],
                   sizes: Sequence[str]) -> Lexicon:
        nouns = {s: s for s in shapes} | {plurals.get(s, s + "s"): s for s in shapes}
        return cls(nouns, frozenset(colors), frozenset(sizes))


SHAPES_LEXICON = Lexicon.from_words(
    shapes=("circle", "square", "triangle", "star"),
    plurals={"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"},
    colors=("red", "green", "blue", "yellow", "white"),
    sizes=("small", "large"),
)

NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
# Multi-word phrases, longest first so "to the left of" wins over "left".
POSITION_PHRASES = {
    ("on", "the", "left"): "left", ("on", "the", "right"): "right", ("at", "the", "top"): "top",
    ("at", "the", "bottom"): "bottom", ("in", "the", "center"): "center", ("in", "the", "middle"): "center",
    ("in", "the", "centre"): "center",
}
RELATION_PHRASES = {
    ("to", "the", "left", "of"): "left_of", ("to", "the", "right", "of"): "right_of", ("left", "of"): "left_of",
    ("right", "of"): "right_of", ("above",): "above", ("below",): "below", ("under",): "below",
    ("over",): "above", ("beneath",): "below", ("next", "to"): "beside", ("beside",): "beside",
}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
_PHRASES = sorted([(p, ("position", v)) for p, v in POSITION_PHRASES.items()]
                  + [(p, ("relation", v)) for p, v in RELATION_PHRASES.items()], key=lambda item: -len(item[0]))
_NON_WORD = re.compile(r"[^a-z0-9]+")


@dataclass
class Mention:
    """One noun phrase: ``count`` objects (None: a plural without a number) with the stated attributes.

    ``shape`` None is the generic noun ("shape"). ``total`` marks a count of all the objects
    ("two shapes", "three shapes" before a list), which names no object itself; ``exact_count`` marks a
    number that is a claim ("two red squares", "a single star"), unlike the article "a".
    """

    count: int | None
    size: str | None = None
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    total: bool = False
    exact_count: bool = False
    single: bool = False  # "a single ...": the image holds one object
    start: int = 0
    end: int = 0  # token positions [start, end)

    @property
    def names_object(self) -> bool:
        """A ``<colour> <shape>`` pair: what object precision and recall count."""
        return self.color is not None and self.shape is not None

    def describe(self) -> str:
        words = [w for w in (self.size, self.color, self.shape or "shape") if w]
        return " ".join(words)


@dataclass
class Parsed:
    """What a caption claims: its noun phrases and the relations between them (mention indices)."""

    mentions: list[Mention] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    # pairs of mentions whose positions were stated relative to each other ("a on the left and b on the
    # right"): checked as an order, not as absolute regions of the image
    relative: list[tuple[int, int]] = field(default_factory=list)


def _words(caption: str) -> list[str]:
    return _NON_WORD.sub(" ", caption.lower()).split()


def parse_caption(caption: str, lexicon: Lexicon = SHAPES_LEXICON) -> Parsed:
    """A caption -> its mentions, positions and relations. Unknown words are skipped."""
    tokens = _words(caption)
    parsed = Parsed()
    phrases: list[tuple[int, int, str, str]] = []  # (start, end, kind, value)
    i = 0
    while i < len(tokens):
        phrase = next(((p, kv) for p, kv in _PHRASES if tuple(tokens[i:i + len(p)]) == p), None)
        if phrase is not None:
            (words, (kind, value)) = phrase
            phrases.append((i, i + len(words), kind, value))
            i += len(words)
            continue
        mention = _noun_phrase(tokens, i, lexicon)
        if mention is None:
            i += 1
            continue
        parsed.mentions.append(mention)
        i = mention.end
    _attach(parsed, phrases, len(tokens))
    return parsed


def _noun_phrase(tokens: list[str], i: int, lexicon: Lexicon) -> Mention | None:
    """The noun phrase starting at ``tokens[i]``: [number words] [sizes / colours] noun; else None."""
    start, count, exact, single = i, None, False, False
    while i < len(tokens) and tokens[i] in NUMBER_WORDS:
        word = tokens[i]
        count = NUMBER_WORDS[word]
        exact = exact or word not in ("a", "an")
        single = single or word == "single"
        i += 1
    size = color = None
    while i < len(tokens) and (tokens[i] in lexicon.sizes or tokens[i] in lexicon.colors):
        if tokens[i] in lexicon.sizes:
            size = tokens[i]
        else:
            color = tokens[i]
        i += 1
    if i >= len(tokens):
        return None
    noun = tokens[i]
    if noun in lexicon.shapes:
        shape = lexicon.shapes[noun]
        plural = noun != shape
    elif noun in lexicon.generic:
        shape, plural = None, noun.endswith("s")
    else:
        return None
    if count is None:
        count = None if plural else 1
    total = shape is None and size is None and color is None
    return Mention(count, size, color, shape, total=total, exact_count=exact or total, single=single,
                   start=start, end=i + 1)


def _attach(parsed: Parsed, phrases: list[tuple[int, int, str, str]], length: int) -> None:
    """Positions to the mention they describe; relations to the mentions on either side."""
    mentions = parsed.mentions
    ends = {m.end: k for k, m in enumerate(mentions)}
    starts = {m.start: k for k, m in enumerate(mentions)}
    positioned: list[int] = []
    for start, end, kind, value in phrases:
        before = ends.get(start)
        if before is None and start > 0:  # "a blue triangle is above ..."
            before = ends.get(start - 1)
        after = starts.get(end)
        if after is None and end < length:
            after = starts.get(end + 1)  # "... on the left there is a ..." / "above is ..."
            if after is None:
                after = starts.get(end + 2)
        if kind == "position":
            target = before if before is not None else after
            if target is not None and not mentions[target].total:
                mentions[target].position = value
                positioned.append(target)
        elif before is not None and after is not None and not mentions[before].total \
                and not mentions[after].total:
            parsed.relations.append((before, value, after))
    # "a red square on the left and a blue circle on the right": an order, not two absolute regions
    if len(positioned) == 2:
        a, b = positioned
        if OPPOSITE.get(mentions[a].position or "") == mentions[b].position:
            parsed.relative.append((a, b))


# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class CaptionGrounding:
    """Every claim of one caption, checked: (name, correct) pairs, and what it named of the scene."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (attribute, correct, what)
    named_pairs: int = 0
    correct_pairs: int = 0
    objects: int = 0
    recalled: int = 0
    hallucinated: list[str] = field(default_factory=list)
    # every named (colour, shape) with whether it is in the image; the scene's (colour, shape) pairs, each with
    # whether the caption named it: precision and recall per pair (held-out pairs apart from seen ones)
    named: list[tuple[tuple[str, str], bool]] = field(default_factory=list)
    scene_pairs: list[tuple[tuple[str, str], bool]] = field(default_factory=list)

    def add(self, attribute: str, correct: bool, what: str) -> None:
        self.checks.append((attribute, bool(correct), what))

    @property
    def errors(self) -> list[str]:
        return [what for _, ok, what in self.checks if not ok]

    @property
    def correct(self) -> bool:
        """Something was named, and nothing stated is false."""
        return bool(self.checks) and not self.errors

    @property
    def exact(self) -> bool:
        """Every object of the scene named by colour and shape, none invented, nothing false."""
        return self.correct and self.recalled == self.objects and self.named_pairs == self.objects

    def summary(self) -> str:
        """A short right/wrong verdict for tables: 'true', or the false claims."""
        if self.correct:
            return "true, all objects named" if self.exact else "true"
        if not self.checks:
            return "names nothing"
        return "false: " + "; ".join(dict.fromkeys(self.errors))


ATTRIBUTES = ("color", "shape", "size", "count", "position")


def _scene_objects(scene: Mapping[str, Any]) -> list[dict[str, Any]]:
    objects = scene.get("objects")
    if not isinstance(objects, list):
        raise ValueError(f"A grounding scene needs a list of 'objects'; got {str(scene)[:120]}.")
    return objects


def _center(obj: Mapping[str, Any]) -> tuple[float, float]:
    x, y = obj["center"]
    return float(x), float(y)


def _in_region(obj: Mapping[str, Any], region: str, width: float, height: float) -> bool:
    """Absolute positions, with thirds-like margins that the generator's regions satisfy."""
    x, y = _center(obj)
    return {
        "left": x < 0.4 * width,
        "right": x > 0.6 * width,
        "top": y < 0.4 * height,
        "bottom": y > 0.6 * height,
        "center": abs(x - width / 2) < 0.15 * width and abs(y - height / 2) < 0.15 * height,
    }[region]


def _related(a: Mapping[str, Any], relation: str, b: Mapping[str, Any]) -> bool:
    """A spatial relation between two objects; left/right/above/below need that axis to dominate."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    dx, dy = bx - ax, by - ay  # from a to b
    return {
        "left_of": dx > 0 and abs(dx) >= abs(dy),
        "right_of": dx < 0 and abs(dx) >= abs(dy),
        "above": dy > 0 and abs(dy) >= abs(dx),
        "below": dy < 0 and abs(dy) >= abs(dx),
        "beside": abs(dx) >= abs(dy),
    }[relation]


def _in_order(a: Mapping[str, Any], position: str, b: Mapping[str, Any]) -> bool:
    """'a on the left and b on the right' (and top / bottom): a lies on that side of b."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    return {"left": ax < bx, "right": ax > bx, "top": ay < by, "bottom": ay > by}[position]


def _agreement(mention: Mention, obj: Mapping[str, Any], width: float, height: float) -> int:
    score = 0
    color_ok = mention.color is not None and mention.color == obj.get("color")
    shape_ok = mention.shape is not None and mention.shape == obj.get("shape")
    if color_ok and shape_ok:
        score += 16
    score += 4 * color_ok + 4 * shape_ok + 2 * (mention.size is not None and mention.size == obj.get("size"))
    if mention.position is not None and _in_region(obj, mention.position, width, height):
        score += 1
    return score


def _match(instances: list[Mention], objects: list[dict[str, Any]], width: float, height: float,
           pairs: Sequence[tuple[int, int, Any]] = ()) -> list[int | None]:
    """A one-to-one assignment instance -> object index (None: no object left for it), maximising agreement.

    ``pairs`` are (instance a, instance b, test(object a, object b) -> bool): relations the caption states,
    worth one point when the objects they are matched to satisfy them (so "a red star below a red star"
    matches the two red stars the way round that makes it true). Exhaustive over the assignments when the
    scene has a handful of objects, greedy beyond that. Ties go to the assignment that gives earlier
    objects to earlier mentions (captions list objects in order).
    """
    m, k = len(instances), len(objects)
    scores = [[_agreement(inst, obj, width, height) for obj in objects] for inst in instances]
    if m == 0 or k == 0:
        return [None] * m
    if k <= 4 and m <= 12:
        best_key, best = None, None
        # each object takes one instance or none; (m + 1) ** k choices, the injective ones kept
        for choice in itertools.product([None, *range(m)], repeat=k):
            taken = [i for i in choice if i is not None]
            if len(taken) != len(set(taken)):
                continue
            total = sum(scores[i][o] for o, i in enumerate(choice) if i is not None)
            if pairs:
                where = {i: o for o, i in enumerate(choice) if i is not None}
                total += sum(a in where and b in where and test(objects[where[a]], objects[where[b]])
                             for a, b, test in pairs)
            key = (total, tuple(-(i if i is not None else m) for i in choice))
            if best_key is None or key > best_key:
                best_key, best = key, choice
        result: list[int | None] = [None] * m
        for o, i in enumerate(best):  # type: ignore[arg-type]
            if i is not None:
                result[i] = o
        return result
    result = [None] * m
    free = set(range(k))
    for _, neg_i, neg_o in sorted(((scores[i][o], -i, -o) for i in range(m) for o in range(k)), reverse=True):
        i, o = -neg_i, -neg_o
        if result[i] is None and o in free:
            result[i] = o
            free.discard(o)
    return result


def ground_caption(caption: str, scene: Mapping[str, Any], lexicon: Lexicon = SHAPES_LEXICON) -> CaptionGrounding:
    """Check one caption against one scene (``objects`` with shape, color, size, center; ``width`` and
    ``height`` of the image, for absolute positions)."""
    objects = _scene_objects(scene)
    width, height = float(scene.get("width") or 1.0), float(scene.get("height") or 1.0)
    parsed = parse_caption(caption, lexicon)
    result = CaptionGrounding(objects=len(objects))

    # counts: "two red squares" / "three shapes" / "a single star" are claims about the whole scene
    for mention in parsed.mentions:
        if mention.single:
            result.add("count", len(objects) == 1, f"a single object (the image has {len(objects)})")
        elif mention.exact_count and mention.count is not None:
            matching = sum(
                all(getattr(mention, a) in (None, obj.get(a)) for a in ("size", "color", "shape")) for obj in objects
            )
            result.add("count", matching == mention.count,
                       f"{mention.count} {mention.describe()}{'s' if mention.count != 1 else ''} (the image has {matching})")

    # the objects named: each mention is `count` instances (a bare plural: at least two)
    instances: list[Mention] = []
    owner: list[int] = []
    for k, mention in enumerate(parsed.mentions):
        if mention.total:
            continue
        n = mention.count if mention.count is not None else 2
        instances += [mention] * n
        owner += [k] * n
    first_instance = {k: owner.index(k) for k in set(owner)}
    pairs = [(first_instance[a], first_instance[b], lambda x, y, r=relation: _related(x, r, y))
             for a, relation, b in parsed.relations if a in first_instance and b in first_instance]
    pairs += [(first_instance[a], first_instance[b],
               lambda x, y, side=parsed.mentions[a].position or "": _in_order(x, side, y))
              for a, b in parsed.relative if a in first_instance and b in first_instance]
    assigned = _match(instances, objects, width, height, pairs)
    first_object: dict[int, int | None] = {}
    for inst, k, o in zip(instances, owner, assigned, strict=True):
        first_object.setdefault(k, o)
        obj = objects[o] if o is not None else None
        for attribute in ("color", "shape", "size"):
            stated = getattr(inst, attribute)
            if stated is not None:
                right = obj is not None and obj.get(attribute) == stated
                what = "no such object" if obj is None else f"it is {obj.get(attribute)}"
                result.add(attribute, right, f"{inst.describe()}: {attribute} {stated}" + ("" if right else f" ({what})"))
        if inst.names_object:
            result.named_pairs += 1
            ok = obj is not None and obj.get("color") == inst.color and obj.get("shape") == inst.shape
            result.correct_pairs += ok
            result.named.append(((inst.color, inst.shape), ok))
            if not ok:
                result.hallucinated.append(f"{inst.color} {inst.shape}")
        elif inst.shape is not None and (obj is None or obj.get("shape") != inst.shape):
            result.hallucinated.append(inst.shape)
    recalled = {o for inst, o in zip(instances, assigned, strict=True) if o is not None and inst.names_object
                and objects[o].get("color") == inst.color and objects[o].get("shape") == inst.shape}
    result.recalled = len(recalled)
    result.scene_pairs = [((str(obj.get("color")), str(obj.get("shape"))), o in recalled) for o, obj in enumerate(objects)]

    # positions and relations, of the objects the mentions were matched to
    relative = {k for pair in parsed.relative for k in pair}
    for a, b in parsed.relative:
        oa, ob = first_object.get(a), first_object.get(b)
        side = parsed.mentions[a].position or ""
        ok = oa is not None and ob is not None and _in_order(objects[oa], side, objects[ob])
        result.add("position", ok, f"{parsed.mentions[a].describe()} on the {side} of {parsed.mentions[b].describe()}")
    for k, mention in enumerate(parsed.mentions):
        if mention.position is None or k in relative:
            continue
        o = first_object.get(k)
        ok = o is not None and _in_region(objects[o], mention.position, width, height)
        result.add("position", ok, f"{mention.describe()} at {mention.position}")
    for a, relation, b in parsed.relations:
        oa, ob = first_object.get(a), first_object.get(b)
        ok = oa is not None and ob is not None and oa != ob and _related(objects[oa], relation, objects[ob])
        result.add("position", ok, f"{parsed.mentions[a].describe()} {relation.replace('_', ' ')} "
                                   f"{parsed.mentions[b].describe()}")
    return result


def _rate(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


class GroundingScorer:
    """Grounded metrics of captions against the scenes of one split.

    ``scenes``: {image_id: scene}, each a dict with ``objects`` (``shape``, ``color``, ``size``, ``center``)
    and the image's ``width`` / ``height``. Calling it with {image_id: caption} returns micro-averaged rates:

    - ``precision``, ``recall``: named ``<colour> <shape>`` objects that exist / scene objects named;
    - ``chair_i`` = 1 - precision and ``chair_s``: captions naming an object that is not in the image;
    - ``color``, ``shape``, ``size``, ``count``, ``position``: accuracy of each kind of stated attribute;
    - ``correct``, ``exact``, ``single_exact``: fractions of images (see :class:`CaptionGrounding`).

    With ``novel_pairs`` (the ``(colour, shape)`` pairs training never showed) also ``novel_precision`` /
    ``novel_recall`` (of the named held-out pairs, those in the image; of the scene objects that are held-out
    pairs, those named) and ``seen_precision`` / ``seen_recall`` for all the other pairs. ``subsets``
    ({name: image ids}) add ``<name>_precision``, ``<name>_recall`` and ``<name>_correct`` over those images.

    A rate with nothing to count (no colour stated anywhere, say) is 0.0: a captioner that names nothing
    has shown nothing. ``details`` gives the per-image :class:`CaptionGrounding` for tables.
    """

    KEYS = ("precision", "recall", "chair_i", "chair_s", *ATTRIBUTES, "correct", "exact", "single_exact")
    SPLIT_KEYS = ("novel_precision", "novel_recall", "seen_precision", "seen_recall")

    def __init__(self, scenes: Mapping[int, Mapping[str, Any]], lexicon: Lexicon = SHAPES_LEXICON,
                 novel_pairs: Iterable[tuple[str, str]] = (),
                 subsets: Mapping[str, Iterable[int]] | None = None) -> None:
        if not scenes:
            raise ValueError("GroundingScorer needs the scenes of at least one image.")
        for scene in scenes.values():
            _scene_objects(scene)
        self.scenes = dict(scenes)
        self.lexicon = lexicon
        self.novel_pairs = frozenset((str(c), str(s)) for c, s in novel_pairs)
        self.subsets = {name: frozenset(ids) for name, ids in (subsets or {}).items()}

    @property
    def image_ids(self) -> frozenset[int]:
        """The images whose truth this scorer knows."""
        return frozenset(self.scenes)

    def details(self, predictions: Mapping[int, str]) -> dict[int, CaptionGrounding]:
        missing = [i for i in predictions if i not in self.scenes]
        if missing:
            raise ValueError(f"GroundingScorer: no scene for image ids {missing[:5]}; score the split the "
                             "scenes come from.")
        return {i: ground_caption(c, self.scenes[i], self.lexicon) for i, c in predictions.items()}

    def __call__(self, predictions: Mapping[int, str]) -> dict[str, float]:
        details = self.details(predictions)
        scores = self.summarize(details)
        if self.novel_pairs:
            scores.update(self.pair_scores(details.values(), self.novel_pairs))
        for name, ids in self.subsets.items():
            subset = self.summarize({i: d for i, d in details.items() if i in ids}) if ids & set(details) else {}
            for key in ("precision", "recall", "correct"):
                scores[f"{name}_{key}"] = subset.get(key, 0.0)
        return scores

    @staticmethod
    def pair_scores(details: Iterable[CaptionGrounding], novel: Collection[tuple[str, str]]) -> dict[str, float]:
        """Precision and recall on the ``novel`` (colour, shape) pairs and on all the others."""
        details = list(details)
        scores = {}
        for name, keep in (("novel", lambda pair: pair in novel), ("seen", lambda pair: pair not in novel)):
            named = [ok for d in details for pair, ok in d.named if keep(pair)]
            shown = [ok for d in details for pair, ok in d.scene_pairs if keep(pair)]
            scores[f"{name}_precision"] = _rate(sum(named), len(named))
            scores[f"{name}_recall"] = _rate(sum(shown), len(shown))
        return scores

    @staticmethod
    def summarize(details: Mapping[int, CaptionGrounding]) -> dict[str, float]:
        rate = _rate
        results = list(details.values())
        named = sum(r.named_pairs for r in results)
        precision = rate(sum(r.correct_pairs for r in results), named)
        scores = {
            "precision": precision,
            "recall": rate(sum(r.recalled for r in results), sum(r.objects for r in results)),
            "chair_i": 1.0 - precision if named else 0.0,
            "chair_s": rate(sum(bool(r.hallucinated) for r in results), len(results)),
        }
        for attribute in ATTRIBUTES:
            checks = [ok for r in results for a, ok, _ in r.checks if a == attribute]
            scores[attribute] = rate(sum(checks), len(checks))
        scores["correct"] = rate(sum(r.correct for r in results), len(results))
        scores["exact"] = rate(sum(r.exact for r in results), len(results))
        singles = [r for r in results if r.objects == 1]
        scores["single_exact"] = rate(sum(r.exact for r in singles), len(singles))
        return scores
