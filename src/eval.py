"""Score a trained captioner on a split: ``python src/eval.py ckpt_path=... [split=test] [decoding=beam]``.

Decodes every image of the split with the configured decoding (``decoding=greedy|beam|sample``, greedy by
default) and reports:

- fast: BLEU-1..4 and CIDEr-D, as validation computes them (no Java), and where the data knows what each image
  shows (the built-in set's scenes, COCO's instance annotations) the grounded metrics: object precision /
  hallucination, attribute accuracy. Under DDP (``trainer.devices=2``) every process decodes its share and
  the captions are gathered and deduplicated by image id, so the numbers equal those of one process;
- official: the COCO caption evaluation (pycocoevalcap: PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr and,
  with ``spice=true``, SPICE), run once on rank 0. These are the paper-comparable numbers.

``ckpt_path=[a.ckpt,b.ckpt,...]`` (quoted on the command line) decodes with the checkpoints as an ensemble (their
per-step log-probabilities averaged; the same vocabulary required); the first one's data and loss are used.

Writes ``predictions.json`` (COCO results format), with ``decoding.n_best=K`` also ``nbest.json`` (every image's K
captions, best first, with their log-probabilities), and ``metrics.json`` to the run dir
(``outputs/eval/runs/<time>/``) and prints a table. The data set comes from the checkpoint
(``data_from_checkpoint``; ``data.*`` on the command line win); ``ckpt_path=last`` is the newest last.ckpt
of the train runs. The split is the top-level key ``split`` (``val`` or ``test``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from captioning.evaluation import checkpoint_data_config, nbest_report, print_table
from captioning.io import write_json
from captioning.metrics import coco_caption_eval
from captioning.module import load_ensemble
from captioning.utils import (
    explain_errors,
    instantiate_dict,
    instantiate_trainer,
    print_config,
    resolve_ckpt_paths,
    save_config,
)

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Decode and score the split; the report written to metrics.json (None on DDP ranks other than 0)."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}: eval.py scores the val or test split; pass split=val or split=test.")
    ckpt_paths = resolve_ckpt_paths(cfg.ckpt_path, cfg.paths.log_dir, "train")
    ckpt_path = ckpt_paths[0]
    module, data_config = load_ensemble(ckpt_paths)
    if cfg.data_from_checkpoint:
        checkpoint_data_config(cfg, data_config, ckpt_path)
    if len(ckpt_paths) > 1 and cfg.data.get("feature_cache"):
        # every member encodes the images itself: a cache holds one encoder's features
        log.info("An ensemble of %d checkpoints reads images: data.feature_cache=false for this evaluation.",
                 len(ckpt_paths))
        cfg.data.feature_cache = False
    print_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    save_config(cfg, output_dir / "config.yaml")

    module.set_decoding(instantiate(cfg.decoding))
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    if hasattr(datamodule, "use_encoder"):
        # images are read by the input the checkpoint's encoder declared (mean, std, resize)
        datamodule.use_encoder(module.encoder, module.image_contract)
    if hasattr(datamodule, "use_vocabulary"):
        # captions are encoded as the model reads them: no training split is needed (an evaluation-only set)
        datamodule.use_vocabulary(module.vocab)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate_trainer(cfg.trainer, logger=loggers or False)
    seconds["load"] = time.perf_counter() - start

    tic = time.perf_counter()
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(module, datamodule=datamodule, verbose=False)
    seconds["decode_and_fast_metrics"] = time.perf_counter() - tic
    if not trainer.is_global_zero:
        return None  # rank 0 holds every rank's captions (gathered by the module): it alone writes and scores

    result = module.results[cfg.split]
    predictions = result.predictions
    references = datamodule.references(cfg.split)
    if not predictions:
        raise RuntimeError(
            f"No captions were decoded for the {cfg.split} split ({len(references)} images); check "
            "trainer.limit_val_batches / limit_test_batches."
        )
    if len(predictions) < len(references):
        log.warning(
            "Only %d of the %d %s images were captioned (trainer.limit_*_batches?): the metrics cover those "
            "images only, and the fast CIDEr-D uses the whole split's document frequencies.",
            len(predictions), len(references), cfg.split,
        )
    # scored once, by the module, from the gathered captions (what validation logs every epoch)
    seconds["fast_metrics"] = result.seconds
    fast, grounding = result.metrics, result.grounding
    loss = (results[0] if results else {}).get(f"{cfg.split}/loss")

    write_json(
        output_dir / "predictions.json",
        [{"image_id": image_id, "caption": predictions[image_id]} for image_id in sorted(predictions)],
    )
    if result.nbest:  # decoding.n_best > 1: every caption kept, best first, with its log-probability
        write_json(output_dir / "nbest.json", [
            {"image_id": image_id, "captions": [{"caption": text, "log_prob": lp} for text, lp in result.nbest[image_id]]}
            for image_id in sorted(result.nbest)])
    report: dict[str, Any] = {
        "checkpoint": str(Path(ckpt_path).absolute()) if len(ckpt_paths) == 1 else [
            str(Path(p).absolute()) for p in ckpt_paths],
        "split": cfg.split,
        "num_images": len(predictions),
        "decoding": OmegaConf.to_container(cfg.decoding, resolve=True),
        "devices": trainer.world_size,
        "fast": fast,
        # object precision / hallucination and attribute accuracy against the images (null: the data has no
        # scenes or instance annotations for this split)
        "grounding": grounding or None,
        # teacher-forced on each image's first reference; averaged over batches (under DDP with the
        # sampler's repeated images), so unlike the caption metrics it is not exact across device counts
        "loss": None if loss is None else float(loss),
        "official": None,
        # decoding.n_best > 1: the lists judged as the predictions are (per rank, the oracle, how distinct)
        "nbest": nbest_report(result.nbest, result) if result.nbest else None,
        "seconds": seconds,
    }
    write_json(output_dir / "metrics.json", report)  # the fast numbers survive a failing Java evaluation

    official = None
    if cfg.official:
        tic = time.perf_counter()
        scored = {image_id: references[image_id] for image_id in predictions}
        try:
            official = coco_caption_eval(predictions, scored, spice=cfg.spice, meteor=cfg.meteor)
        except (RuntimeError, FileNotFoundError) as error:
            raise RuntimeError(
                f"{error}\nThe captions and the fast metrics are saved in {output_dir} (predictions.json, "
                "metrics.json); pass official=false to skip the official evaluation."
            ) from error
        seconds["official_metrics"] = time.perf_counter() - tic
        report["official"] = official
    seconds["total"] = time.perf_counter() - start
    write_json(output_dir / "metrics.json", report)

    print_table(fast, official, f"{cfg.split} split: {len(predictions)} images, {module.decoding!r}", grounding)
    if report["nbest"]:
        lists = report["nbest"]
        truth = " / ".join(f"{r['correct']:.3f}" for r in lists["by_rank"] if "correct" in r)
        Console().print(f"n-best lists of {lists['size']}: distinct captions per list {lists['distinct_captions']:.3f}, "
                        f"distinct bigrams {lists['distinct_2']:.3f}"
                        + (f"; true at rank 1..{lists['size']}: {truth}; any true: {lists['any_true']:.3f}"
                           if "any_true" in lists else "") + f" ({output_dir / 'nbest.json'})")
    timing = ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items())
    Console().print(f"time: {timing}\nwritten: {output_dir / 'predictions.json'}, {output_dir / 'metrics.json'}")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@explain_errors
def main(cfg: DictConfig) -> dict[str, float] | None:
    report = evaluate(cfg)
    return None if report is None else report["official"] or report["fast"]


if __name__ == "__main__":
    main()
