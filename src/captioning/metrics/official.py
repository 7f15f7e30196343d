"""The official COCO caption evaluation (pycocoevalcap: PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr, SPICE), which
runs Java: the paper-comparable numbers of ``src/eval.py``."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from .cider import _check_predictions, _check_references

_SPICE_CORENLP = "stanford-corenlp-3.6.0"
_SPICE_ZIP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "The official COCO caption evaluation runs Stanford's PTB tokenizer and METEOR in Java, but no "
            "`java` is on PATH. Install a Java runtime (e.g. `apt-get install openjdk-17-jre-headless`), or "
            "use the Java-free CaptionScorer (BLEU + CIDEr-D) instead."
        )


def _require_spice_models() -> None:
    """SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first use; fail fast offline."""
    import pycocoevalcap.spice as spice_pkg

    lib = os.path.join(os.path.dirname(os.path.abspath(spice_pkg.__file__)), "lib")
    needed = [os.path.join(lib, f"{_SPICE_CORENLP}{suffix}.jar") for suffix in ("", "-models")]
    missing = [path for path in needed if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use, and it is not "
            f"installed: missing {', '.join(missing)}. On a machine with internet, download {_SPICE_ZIP_URL}, "
            f"and copy {_SPICE_CORENLP}.jar and {_SPICE_CORENLP}-models.jar from it into {lib}/ "
            "(or run `python -m pycocoevalcap.spice.get_stanford_models` there). SPICE also needs ~8 GB of "
            "Java heap. Or evaluate without SPICE (spice=False)."
        )


def _one_line(caption: str) -> str:
    # PTBTokenizer is fed one caption per line; any line break inside a caption would shift all later ones
    return " ".join(caption.split())


def coco_caption_eval_detailed(
    predictions: dict[int, str],
    references: dict[int, list[str]],
    spice: bool = False,
    meteor: bool = True,
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """The official COCO caption evaluation, corpus and per image.

    pycocoevalcap's PTBTokenizer (Java) on predictions and references, then Bleu(4), Meteor (Java, when
    ``meteor``), Rouge, Cider and, when ``spice``, Spice, over the predicted image ids (each must have
    references). As in pycocoevalcap, CIDEr's document frequencies come from those images' references.

    Returns ({"bleu1".."bleu4", "meteor", "rouge_l", "cider"[, "spice"]}, {image_id: same keys}).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = _check_references(references)
    _check_predictions(predictions, refs, "coco_caption_eval")
    _require_java()
    if spice:
        _require_spice_models()
    image_ids = sorted(predictions)
    tokenizer = PTBTokenizer()
    try:
        gts = tokenizer.tokenize({i: [{"caption": _one_line(c)} for c in refs[i]] for i in image_ids})
        res = tokenizer.tokenize({i: [{"caption": _one_line(predictions[i])}] for i in image_ids})
    except OSError as error:
        raise RuntimeError(
            f"pycocoevalcap's PTBTokenizer failed ({error}); it writes a temporary file next to its jar, so "
            "the pycocoevalcap/tokenizer folder of the installed package must be writable."
        ) from error
    # an empty caption may come back as a missing line; it scores as the empty caption
    res = {i: res.get(i, [""]) for i in image_ids}
    gts = {i: gts.get(i, [""]) for i in image_ids}

    corpus: dict[str, float] = {}
    per_image: dict[int, dict[str, float]] = {i: {} for i in image_ids}

    def record(name: str, score: float, scores: Sequence[float]) -> None:
        corpus[name] = float(score)
        for image_id, value in zip(image_ids, scores, strict=True):
            per_image[image_id][name] = float(value)

    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        record(f"bleu{k + 1}", bleu[k], bleu_per_image[k])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            record("meteor", *scorer.compute_score(gts, res))
        finally:
            del scorer  # its __del__ stops the Java process now rather than at interpreter exit
    record("rouge_l", *Rouge().compute_score(gts, res))
    record("cider", *Cider().compute_score(gts, res))
    if spice:
        from pycocoevalcap.spice.spice import Spice

        try:
            score, scores = Spice().compute_score(gts, res)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(
                f"SPICE's Java process failed (exit code {error.returncode}); SPICE 1.0 needs ~8 GB of heap "
                "and was written for Java 8 — see its output above. Evaluate with spice=False to skip it."
            ) from error
        record("spice", score, [s["All"]["f"] for s in scores])
    return corpus, per_image


def coco_caption_eval(
    predictions: dict[int, str],
    references: dict[int, list[str]],
    spice: bool = False,
    meteor: bool = True,
) -> dict[str, float]:
    """Corpus scores of the official COCO caption evaluation; see :func:`coco_caption_eval_detailed`."""
    return coco_caption_eval_detailed(predictions, references, spice=spice, meteor=meteor)[0]
