"""What one evaluation pass of a split produced, as one object: its captions, their scores and the scorers.

:class:`GroundedScorer` is what a metric that checks captions against the images offers — the built-in set's
scenes (:class:`captioning.grounding.GroundingScorer`) and COCO's CHAIR (:class:`captioning.chair.CocoChair`)
both are one; :class:`StageResult` holds a split's scorers and the last pass's numbers, so ``eval.py``, the run
report and the W&B table read the same fields instead of re-splitting logged names.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .scorer import CaptionScorer

__all__ = ["GroundedScorer", "StageResult", "Verdict"]


@runtime_checkable
class Verdict(Protocol):
    """One caption checked against its image."""

    @property
    def correct(self) -> bool:
        """Whether everything the caption claims is in the image (and it names something)."""

    def summary(self) -> str:
        """'true', or what is wrong, in words."""


@runtime_checkable
class GroundedScorer(Protocol):
    """A metric of captions against what the images show (object precision, hallucination, attributes)."""

    @property
    def image_ids(self) -> frozenset[int]:
        """The images whose truth it knows."""

    def __call__(self, predictions: Mapping[int, str]) -> dict[str, float]:
        """Corpus scores of ``{image_id: caption}`` (ids among ``image_ids``), names without a prefix."""

    def details(self, predictions: Mapping[int, str]) -> Mapping[int, Verdict]:
        """Each caption's verdict."""


@dataclass
class StageResult:
    """A split's scoring (``val`` or ``test``): built when the split is set up, refilled by every pass.

    Attributes:
        split: ``"val"`` or ``"test"``.
        scorer: BLEU-1..4 and CIDEr-D against the split's references.
        grounded: the grounded metric the data allows, or None (no scenes, no instance annotations).
        predictions: ``{image_id: caption}`` of the last pass (also of a sanity check).
        metrics: ``bleu1`` .. ``bleu4``, ``cider`` of the last scored pass.
        grounding: the grounded metric's scores (``precision``, ``hallucination``, ...; {} without one).
        seconds: how long scoring the last pass took.
        nbest: ``{image_id: [(caption, log p), ...]}`` of the last pass when decoding kept n-best lists, best
            first (the first is the prediction); {} otherwise.
    """

    split: str
    scorer: CaptionScorer
    grounded: GroundedScorer | None = None
    predictions: dict[int, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    grounding: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    nbest: dict[int, list[tuple[str, float]]] = field(default_factory=dict)

    def score(self, predictions: Mapping[int, str]) -> None:
        """Score ``predictions`` (the split's captions) with both scorers and keep them."""
        tic = time.perf_counter()
        self.predictions = dict(predictions)
        self.metrics = self.scorer(self.predictions)
        # distinct captions per image (1: every image its own caption): a decoder that says the same few things
        # everywhere can still score well on n-gram metrics
        self.metrics["distinct"] = len(set(self.predictions.values())) / max(len(self.predictions), 1)
        self.grounding = self.ground(self.predictions)
        self.seconds = time.perf_counter() - tic

    def ground(self, captions: Mapping[int, str]) -> dict[str, float]:
        """The grounded scores of the captions of the images whose truth is known; {} when none is."""
        known = self._known(captions)
        return self.grounded(known) if known else {}

    def verdicts(self, captions: Mapping[int, str]) -> dict[int, Verdict]:
        """Each known image's caption checked; {} without a grounded metric."""
        known = self._known(captions)
        return dict(self.grounded.details(known)) if known else {}

    @property
    def logged(self) -> dict[str, float]:
        """The numbers as logged under ``<split>/``: the caption metrics and ``grounding/<name>``."""
        return {**self.metrics, **{f"grounding/{k}": v for k, v in self.grounding.items()}}

    def _known(self, captions: Mapping[int, str]) -> dict[int, str]:
        if self.grounded is None:
            return {}
        ids = self.grounded.image_ids
        return {i: c for i, c in captions.items() if i in ids}
