"""Caption metrics: BLEU-1..4 (torchmetrics), CIDEr-D, the official COCO evaluation, a DDP collector, and a
split's result — one concern a module.

Two ways to score captions live here:

- Fast, pure Python/NumPy, no Java (validation every epoch): :func:`tokenize` (``tokens``), :func:`corpus_bleu`
  (``bleu``), :class:`CiderD` (``cider``) and :class:`CaptionScorer` (``scorer``). On the same tokenised
  captions they give the numbers of pycocoevalcap's ``Bleu(4)`` and ``Cider`` (which *is* CIDEr-D): the targets
  are 1e-4 and 1e-3, the tests find agreement to 1e-12 and 1e-9.
- Paper-comparable (``src/eval.py``): :func:`coco_caption_eval` (``official``), the official pycocoevalcap
  pipeline (Stanford PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr, optional SPICE), which runs Java.

:class:`DecodedCaptions` (``collect``) gathers decoded token ids from every DDP process and deduplicates them by
image id, so metrics under DDP equal those of one process. :class:`StageResult` (``results``) is one split's
scorers and the numbers of its last pass; :class:`GroundedScorer` is what a metric against the images offers.

Metrics score strings: this package never imports ``captioning.models`` or ``captioning.data``.
"""

from .bleu import corpus_bleu
from .cider import CiderD
from .collect import DecodedCaptions
from .official import coco_caption_eval, coco_caption_eval_detailed
from .results import GroundedScorer, StageResult, Verdict
from .scorer import CaptionScorer
from .tokens import tokenize

__all__ = ["CaptionScorer", "CiderD", "DecodedCaptions", "GroundedScorer", "StageResult", "Verdict",
           "coco_caption_eval", "coco_caption_eval_detailed", "corpus_bleu", "tokenize"]
