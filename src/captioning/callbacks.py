"""Callbacks: the end-of-run report (metrics.json, the blind baseline, sample captions), training
throughput, and the W&B dashboard (sample-caption tables, attention maps, best metrics in the summary).

The W&B callbacks do nothing unless the trainer has a W&B logger, so they can stay in the default set.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, RichModelSummary
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.optim.swa_utils import AveragedModel

from .data.images import load_image
from .io import write_json
from .loggers import find_wandb_logger
from .metrics import CaptionScorer, StageResult, corpus_bleu, tokenize
from .module import CaptioningModule, grounding_scorer
from .progress import to_log_file
from .visualize import attention_overlay

__all__ = ["EMA", "RunReport", "best_constant_caption", "Throughput", "WandbSummary", "WandbCaptionSamples"]


# Metrics where less is better: losses and hallucination rates.
_LOWER_IS_BETTER = ("loss", "chair_i", "chair_s")
# The grounded metrics the report prints, in this order (those the data has).
GROUNDING_ROWS = ("precision", "recall", "chair_s", "color", "shape", "size", "count", "position",
                  "single_exact", "correct", "exact", "chair_i", "mentions")


def _higher_is_better(name: str) -> bool:
    return not name.endswith(_LOWER_IS_BETTER)


def best_constant_caption(
    train_captions: list[str], scorer: CaptionScorer, image_ids: list[int], candidates: int | None = None,
    metric: str = "bleu4",
) -> tuple[str, dict[str, float]]:
    """The blind baseline: of the training captions, the one scoring highest on ``metric`` when given for every
    image — what a captioner that ignores the image can reach.

    For BLEU every distinct training caption is a candidate, all scored at once (``CaptionScorer.constant_bleu``:
    COCO's 590k captions in seconds); among equal scores the more frequent caption wins. ``candidates`` limits the
    search to the most frequent ones (None: all); another ``metric`` scores the 50 most frequent one by one.
    """
    counts = Counter(" ".join(tokenize(c)) for c in train_captions)
    ranked = [caption for caption, _ in counts.most_common(candidates)]
    if not ranked:
        return "", {}
    if metric.startswith("bleu"):
        order = int(metric.removeprefix("bleu")) - 1
        bleu = scorer.constant_bleu(ranked, image_ids)[:, order]
        caption = ranked[int(np.argmax(bleu))]  # the first maximum: the most frequent of equals
        return caption, scorer({i: caption for i in image_ids})
    best: tuple[str, dict[str, float]] = ("", {})
    for caption in ranked[:50]:
        scores = scorer({i: caption for i in image_ids})
        if not best[1] or scores[metric] > best[1][metric]:
            best = (caption, scores)
    return best


class RunReport(L.Callback):
    """Tracks validation metrics per epoch and writes ``metrics.json`` with the final, best and test numbers.

    At the end of fitting it also scores the blind baseline (the best constant caption) on the validation
    split and prints it beside the model's numbers, with sample captions for a few validation images and
    how many distinct captions the model gave — a captioner that ignores the image gives one.

    It also captions ``train_samples`` training images with the final model and prints their scores beside the
    final validation ones (``train_subset`` in metrics.json): the generalisation gap, with a line that says so
    when validation is much worse than training (overfitting), so that nobody has to read curves to see it.

    Args:
        path: where to write metrics.json (the run directory).
        num_samples: validation images whose captions are printed.
        baseline_candidates: how many of the most frequent training captions the baseline tries (None: every
            distinct one, scored at once).
        train_samples: training images the final model captions for the generalisation gap (0: none).
    """

    # the metrics the gap is read on, and how much worse validation may be (absolute) before the report says so
    GAP_METRICS = ("bleu4", "grounding/precision", "grounding/correct", "grounding/chair_i")
    GAP_TOLERANCE = 0.05

    def __init__(self, path: str, num_samples: int = 8, baseline_candidates: int | None = None,
                 train_samples: int = 500) -> None:
        self.path = Path(path)
        self.num_samples, self.baseline_candidates = num_samples, baseline_candidates
        self.train_samples = train_samples
        self.history: list[dict[str, float]] = []
        self.report: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    @staticmethod
    def _metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = self._metrics(trainer, "val/")
        if metrics:
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})

    def best(self) -> dict[str, float]:
        best: dict[str, float] = {}
        for entry in self.history:
            for name, value in entry.items():
                if name in ("epoch", "step") or not math.isfinite(value):
                    continue
                if name not in best or (value > best[name]) == _higher_is_better(name):
                    best[name] = value
        return best

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        self.report.update(final=self.history[-1], best=self.best(), epochs=self.history)
        datamodule, result = trainer.datamodule, _results(pl_module, "val")
        predictions = result.predictions if result is not None else {}
        if datamodule is not None and predictions:
            train_captions = [c for refs in datamodule.references("train").values() for c in refs]
            caption, scores = best_constant_caption(
                train_captions, result.scorer, sorted(predictions), self.baseline_candidates)
            # the blind caption checked against the images too: what naming the commonest things scores
            blind = result.ground({i: caption for i in predictions})
            scores.update({f"grounding/{k}": v for k, v in blind.items()})
            self.report["blind_baseline"] = {"caption": caption, **scores}
            self.report["distinct_val_captions"] = len(set(predictions.values()))
            self.report["val_images"] = len(predictions)
            verdicts = {i: d.summary() for i, d in result.verdicts(predictions).items()}
            if self.train_samples and hasattr(datamodule, "sample_loader"):
                self.report["train_subset"] = self._score_training_images(datamodule, pl_module)
            self._print(datamodule.references("val"), predictions, verdicts)
        self.write()

    @torch.no_grad()
    def _score_training_images(self, datamodule: Any, pl_module: L.LightningModule) -> dict[str, float]:
        """The final model's scores on ``train_samples`` training images (greedy as configured, no augmentation)."""
        was_training = pl_module.training
        pl_module.eval()
        predictions: dict[int, str] = {}
        references: dict[int, list[str]] = {}
        for batch in datamodule.sample_loader("train", self.train_samples):
            features = pl_module.encode({k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v
                                         for k, v in batch.items()})
            decoded = pl_module.decoding(pl_module.decoder, features)
            for image_id, ids, refs in zip(batch["image_ids"].tolist(), decoded.captions, batch["references"],
                                           strict=True):
                predictions[image_id], references[image_id] = pl_module.caption_text(ids), refs
        pl_module.train(was_training)
        scores = CaptionScorer(references)(predictions)
        grounding = grounding_scorer(datamodule, "train")
        if grounding is not None:
            scores.update({f"grounding/{k}": v for k, v in grounding(predictions).items()})
        return {"images": len(predictions), **scores}

    @classmethod
    def gap_line(cls, train: dict[str, float], final: dict[str, float]) -> str:
        """'generalisation gap (final model, N training images vs validation): bleu4 0.91 / 0.77, ...', and a
        warning when validation trails training by more than ``GAP_TOLERANCE`` on any of them."""
        pairs = [(name, train[name], final[f"val/{name}"]) for name in cls.GAP_METRICS
                 if name in train and f"val/{name}" in final]
        text = ", ".join(f"{name} {a:.3f} / {b:.3f}" for name, a, b in pairs)
        line = f"generalisation gap (final model, {train.get('images', 0)} training images / validation): {text}"
        worse = [name for name, a, b in pairs if (b - a if name.endswith(_LOWER_IS_BETTER) else a - b) > cls.GAP_TOLERANCE]
        if worse:
            line += (f"\nvalidation is much worse than training on {', '.join(worse)}: the model fits its training "
                     "images better than new ones. More images, data.augment=true, model.dropout, "
                     "optimizer.weight_decay or fewer epochs may close the gap.")
        return line

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.report["test"] = self._metrics(trainer, "test/")
            self.write()

    def write(self) -> None:
        write_json(self.path, self.report)

    def _print(self, references: dict[int, list[str]], predictions: dict[int, str],
               verdicts: dict[int, str]) -> None:
        console = Console(record=True)
        final, best, blind = self.report["final"], self.report["best"], self.report["blind_baseline"]
        table = Table(title="Validation: model vs blind baseline (best constant caption)")
        for column in ("metric", "final", "best", "blind baseline"):
            table.add_column(column, justify="right" if column != "metric" else "left")
        names = ["bleu1", "bleu2", "bleu3", "bleu4", "cider", *(f"grounding/{g}" for g in GROUNDING_ROWS)]
        for name in names:
            key = f"val/{name}"
            if key in final:
                cells = [f"{m[k]:.4f}" if k in m else "-" for m, k in ((final, key), (best, key), (blind, name))]
                table.add_row(name, *cells)
        console.print(table)
        console.print(f"blind baseline caption: [italic]{blind['caption']}[/italic]")
        console.print(
            f"distinct captions: {self.report['distinct_val_captions']} for {self.report['val_images']} "
            "validation images")
        if "train_subset" in self.report:
            console.print(self.gap_line(self.report["train_subset"], final))
        samples = Table(title="Sample validation captions (final model)")
        samples.add_column("image id", justify="right")
        samples.add_column("model")
        if verdicts:
            samples.add_column("against the image")
        samples.add_column("a reference")
        for image_id in sorted(predictions)[: self.num_samples]:
            verdict = [verdicts.get(image_id, "-")] if verdicts else []
            samples.add_row(str(image_id), predictions[image_id], *verdict, references[image_id][0])
        console.print(samples)
        console.print(f"metrics written to {self.path}")
        to_log_file(console.export_text())


def _results(pl_module: L.LightningModule, split: str) -> StageResult | None:
    """The captioner's last pass over ``split`` (None before the split was set up, or for another module)."""
    return pl_module.results.get(split) if isinstance(pl_module, CaptioningModule) else None


# ---------------------------------------------------------------------------------------------------------
# Model summary
# ---------------------------------------------------------------------------------------------------------
class ModelSummary(RichModelSummary):
    """Lightning's rich model summary, in the run's log file too, without a FLOPs column that says 0: Lightning
    counts FLOPs only for a module with an ``example_input_array``, and a captioner's forward is a decoding loop
    whose cost depends on the captions it decodes."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        console = Console(record=True)
        columns = [(name, values) for name, values in summary_data if total_flops or name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name if name else " ", justify="right" if name in ("Params", "FLOPs") else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console.print(table)
        lines = [
            f"Trainable params: {get_human_readable_count(int(trainable_parameters))}",
            f"Non-trainable params: {get_human_readable_count(int(total_parameters - trainable_parameters))}",
            f"Total params: {get_human_readable_count(int(total_parameters))}",
            f"Total estimated model params size (MB): {get_formatted_model_size(model_size)}",
            f"Modules in train mode: {total_training_modes['train']}",
            f"Modules in eval mode: {total_training_modes['eval']}",
        ]
        if total_flops:
            lines.append(f"Total FLOPs: {get_human_readable_count(total_flops)}")
        console.print("\n".join(lines))
        to_log_file(console.export_text())


# ---------------------------------------------------------------------------------------------------------
# Weight averaging
# ---------------------------------------------------------------------------------------------------------


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights (Lightning's ``EMAWeightAveraging``): validation, the
    checkpoints (``state_dict``; the raw weights ride along for resuming) and the model at the end of fitting
    use the averaged weights, so eval.py and caption.py read them from a checkpoint with nothing to set.

    Two changes to Lightning's callback: the average is copied from the module after its decoder exists (the
    decoder is sized by the data's vocabulary, :meth:`CaptioningModule.configure_model`), which Lightning's
    ``setup`` would do with a warning meant for sharded models; and a checkpoint loaded to test or validate (train.py's
    ``test=true`` scores the best one in the trainer that fitted it) keeps the average it holds as the model, where
    Lightning's would put the raw weights back as for a resume and score those.

    Args:
        decay: the weight of the average at each update (0.999: ~1,000 steps; 0.99: ~100).
        update_every_n_steps, update_starting_at_step, update_starting_at_epoch: as Lightning's.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        pl_module.configure_model()
        self._average_model = AveragedModel(model=pl_module, device=self._device or pl_module.device,
                                            use_buffers=self._use_buffers, **self._kwargs)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # the module was loaded from the checkpoint's state_dict: the average, the model to score
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


# ---------------------------------------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------------------------------------


class Throughput(L.Callback):
    """Training throughput, logged as ``train/images_per_sec`` and ``train/tokens_per_sec``.

    Rates are over the last ``window`` training batches, timed from one batch's end to the next's, so
    data loading counts (it is part of what a run costs). A training sample is one (image, caption) pair;
    its tokens are the caption's targets ``captions[:, 1:]`` that are not ``<NULL>`` (the words and
    ``<END>``: what the loss is computed on). Under DDP the rates are rank 0's times the number of
    processes (every process steps through equal batches). Validation pauses are not counted.

    Args:
        window: batches the rates average over.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"Throughput: window must be >= 1 batch, got {window!r}.")
        self.window = window
        self._times: deque[float] = deque(maxlen=window + 1)
        self._images: deque[int] = deque(maxlen=window)
        # token counts stay tensors on the device: converting each step would synchronise the GPU
        self._tokens: deque[torch.Tensor] = deque(maxlen=window)

    def _restart(self) -> None:
        self._times.clear()
        self._images.clear()
        self._tokens.clear()
        self._times.append(time.perf_counter())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validation inside fit: its time is not training's
            self._restart()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        captions = batch["captions"]
        self._times.append(time.perf_counter())
        self._images.append(len(captions))
        self._tokens.append((captions[:, 1:] != pl_module.vocab.null_id).sum())
        elapsed = self._times[-1] - self._times[0]
        if elapsed <= 0:
            return
        scale = trainer.world_size / elapsed
        pl_module.log("train/images_per_sec", sum(self._images) * scale, on_step=True, on_epoch=False,
                      batch_size=1)
        pl_module.log("train/tokens_per_sec", torch.stack(list(self._tokens)).sum().float() * scale,
                      on_step=True, on_epoch=False, batch_size=1)


# ---------------------------------------------------------------------------------------------------------
# Weights & Biases
# ---------------------------------------------------------------------------------------------------------


def _wandb_logger(trainer: L.Trainer) -> Any | None:
    """The trainer's W&B logger on rank 0, else None (other ranks, no W&B logger, ``mode=disabled``)."""
    if not trainer.is_global_zero:
        return None
    logger = find_wandb_logger(trainer.loggers)
    return None if logger is None or getattr(logger, "mode", None) == "disabled" else logger


def _wandb_run(trainer: L.Trainer) -> Any | None:
    logger = _wandb_logger(trainer)
    return None if logger is None else logger.experiment


class WandbSummary(L.Callback):
    """Best validation numbers in the W&B run summary, so the runs table of a project or sweep sorts by them.

    After every validation epoch: ``best/val/<metric>`` (the highest BLEU/CIDEr, the lowest loss so far) and
    ``best/epoch`` (the epoch where ``monitor`` was best). At the end of training, when a :class:`RunReport`
    ran before it: ``blind_baseline/<metric>`` (the best constant caption's scores) and
    ``distinct_val_captions``, the two numbers that expose a captioner that ignores the image.

    Args:
        monitor: the metric whose best epoch is ``best/epoch`` (the one sweeps optimise).
    """

    def __init__(self, monitor: str = "val/bleu4") -> None:
        self.monitor = monitor
        self.best: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        improved: dict[str, float] = {}
        for name, value in trainer.callback_metrics.items():
            value = float(value)
            if not name.startswith("val/") or not math.isfinite(value):
                continue
            key = f"best/{name}"
            if key not in self.best or (value > self.best[key]) == _higher_is_better(name):
                self.best[key] = improved[key] = value
                if name == self.monitor:
                    self.best["best/epoch"] = improved["best/epoch"] = trainer.current_epoch
        run = _wandb_run(trainer)
        if run is not None and improved:
            run.summary.update(improved)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run = _wandb_run(trainer)
        report = next((cb.report for cb in trainer.callbacks if isinstance(cb, RunReport)), {})
        if run is None or "blind_baseline" not in report:
            return
        blind = report["blind_baseline"]
        run.summary.update({f"blind_baseline/{k}": v for k, v in blind.items() if k != "caption"})
        run.summary.update({"blind_baseline/caption": blind["caption"],
                            "distinct_val_captions": report["distinct_val_captions"]})


class WandbCaptionSamples(L.Callback):
    """Every validation epoch, a ``wandb.Table`` of the same validation images with their captions.

    The images are the first ``num_images`` of the validation split (annotation-file order), fixed for the
    whole run, so one image's caption can be followed from epoch to epoch. Columns: ``epoch``,
    ``image_id``, ``image``, ``caption`` (the generated caption the metrics scored), ``references`` and
    ``bleu4`` (the image's sentence BLEU-4 against its references, COCO's formula); where the data knows
    what each image shows (the built-in set's scenes, COCO instance annotations), ``true`` (the caption
    names something and states nothing false) and ``grounding`` (the verdict: "true", or the false claims,
    see :mod:`captioning.grounding`); for the attention
    model also ``attention``: the image and, for every generated word, where the decoder looked
    (:func:`captioning.visualize.attention_overlay`), also logged as ``<key>_attention/<image_id>``.

    Logged under ``key`` (default ``val/samples``) at the trainer's global step; at the end of training
    the rows of every epoch are logged once more as one table, ``<key>_by_epoch``, to compare epochs side
    by side (group it by ``image_id``).

    Args:
        num_images: fixed validation images in the table.
        attention_images: of these, how many get attention overlays (attention model only; 0: none).
        image_size: longer side of the images stored in the table, in pixels (full COCO images would make
            every epoch's table megabytes).
        key: the W&B key of the table.
    """

    def __init__(self, num_images: int = 16, attention_images: int = 4, image_size: int = 256,
                 key: str = "val/samples") -> None:
        if num_images < 1 or attention_images < 0 or image_size < 8:
            raise ValueError(
                f"WandbCaptionSamples: num_images must be >= 1, attention_images >= 0 and image_size >= 8; "
                f"got {num_images}, {attention_images}, {image_size}."
            )
        self.num_images, self.attention_images = num_images, attention_images
        self.image_size, self.key = image_size, key
        self.rows: list[list[Any]] = []  # every epoch's rows, for the table at the end of training
        self._columns: list[str] = []
        self._samples: list[dict[str, Any]] | None = None

    # -------------------------------------------------------------------------------------------
    def _fixed_samples(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """The fixed images: id, dataset index, references and the image itself (thumbnail + original)."""
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "datasets", {}).get("val") if datamodule is not None else None
        split = getattr(dataset, "split", None)
        if split is None:
            rank_zero_warn("WandbCaptionSamples: the datamodule has no validation dataset with image files "
                           "(datasets['val'].split); no sample table is logged.")
            return []
        references = datamodule.references("val")
        index = {int(image_id): k for k, image_id in enumerate(split.image_ids)}
        samples = []
        for image_id in list(references)[: self.num_images]:
            image = load_image(str(split.image_paths[index[image_id]]))
            thumbnail = image.copy()
            thumbnail.thumbnail((self.image_size, self.image_size), Image.BICUBIC)
            samples.append({"image_id": image_id, "index": index[image_id], "references": references[image_id],
                            "image": image, "thumbnail": thumbnail})
        return samples

    @torch.no_grad()
    def _decode(self, trainer: L.Trainer, pl_module: L.LightningModule, samples: list[dict[str, Any]]) -> Any:
        """The fixed images decoded as in validation: ``Decoded`` with attention weights for the attention
        model. Reads the dataset items, so a feature cache (``features``) works as well as images."""
        dataset = trainer.datamodule.datasets["val"]
        items = [dataset[s["index"]] for s in samples]
        field, key = ("features", "features") if "features" in items[0] else ("image", "images")
        batch = {key: torch.stack([item[field] for item in items]).to(pl_module.device)}
        # the precision the steps run in (autocast for mixed, the dtype of bf16-true / 16-true weights)
        precision = trainer.precision_plugin
        batch = precision.convert_input(batch)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with precision.forward_context():
                return pl_module.decoding(pl_module.decoder, pl_module.encode(batch))
        finally:
            pl_module.train(was_training)

    # -------------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _wandb_logger(trainer)
        if trainer.sanity_checking or logger is None:
            return
        import wandb

        if self._samples is None:
            self._samples = self._fixed_samples(trainer)
        if not self._samples:
            return
        decoded = self._decode(trainer, pl_module, self._samples)
        result = _results(pl_module, "val")
        predictions = result.predictions if result is not None else {}
        with_attention = decoded.attn_weights is not None and self.attention_images > 0
        captions = {s["image_id"]: predictions.get(s["image_id"], pl_module.caption_text(decoded.captions[k]))
                    for k, s in enumerate(self._samples)}
        verdicts = result.verdicts(captions) if result is not None else {}
        columns = ["epoch", "image_id", "image", "caption", "references", "bleu4"]
        if verdicts:
            columns += ["true", "grounding"]
        if with_attention:
            columns.append("attention")
        table = wandb.Table(columns=columns)
        metrics: dict[str, Any] = {self.key: table}
        for k, sample in enumerate(self._samples):
            image_id = sample["image_id"]
            caption = captions[image_id]
            bleu4 = corpus_bleu([caption], [sample["references"]])[3]
            row = [trainer.current_epoch, image_id, wandb.Image(sample["thumbnail"]), caption,
                   "\n".join(sample["references"]), bleu4]
            if verdicts:
                verdict = verdicts.get(image_id)
                row += [verdict.correct, verdict.summary()] if verdict is not None else [None, "-"]
            if with_attention:
                overlay = None
                if k < self.attention_images:
                    words = pl_module.vocab.words(decoded.captions[k])
                    picture = attention_overlay(sample["image"], words, decoded.attn_weights[k])
                    overlay = wandb.Image(picture, caption=f"{image_id}: {caption}")
                    # one key per image: its panel's step slider walks through the epochs
                    metrics[f"{self.key}_attention/{image_id}"] = overlay
                row.append(overlay)
            table.add_data(*row)
            self.rows.append(row)
        self._columns = columns
        logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _wandb_logger(trainer)
        if not self.rows or logger is None:
            return
        import wandb

        logger.log_metrics({f"{self.key}_by_epoch": wandb.Table(columns=self._columns, data=self.rows)},
                           step=trainer.global_step)
