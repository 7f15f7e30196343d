"""Callbacks: the end-of-run report (metrics.json, the blind baseline, sample captions)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from rich.console import Console
from rich.table import Table

from .metrics import CaptionScorer, tokenize

__all__ = ["RunReport", "best_constant_caption"]


def _higher_is_better(name: str) -> bool:
    return not name.endswith("loss")


def best_constant_caption(
    train_captions: list[str], scorer: CaptionScorer, image_ids: list[int], candidates: int = 50,
    metric: str = "bleu4",
) -> tuple[str, dict[str, float]]:
    """The blind baseline: of the most frequent training captions, the one scoring highest on ``metric``
    when given for every image — what a captioner that ignores the image can reach."""
    counts = Counter(" ".join(tokenize(c)) for c in train_captions)
    best: tuple[str, dict[str, float]] = ("", {})
    for caption, _ in counts.most_common(candidates):
        scores = scorer({i: caption for i in image_ids})
        if not best[1] or scores[metric] > best[1][metric]:
            best = (caption, scores)
    return best


class RunReport(L.Callback):
    """Tracks validation metrics per epoch and writes ``metrics.json`` with the final, best and test numbers.

    At the end of fitting it also scores the blind baseline (the best constant caption) on the validation
    split and prints it beside the model's numbers, with sample captions for a few validation images and
    how many distinct captions the model gave — a captioner that ignores the image gives one.

    Args:
        path: where to write metrics.json (the run directory).
        num_samples: validation images whose captions are printed.
        baseline_candidates: how many of the most frequent training captions the baseline tries.
    """

    def __init__(self, path: str, num_samples: int = 8, baseline_candidates: int = 50) -> None:
        self.path = Path(path)
        self.num_samples, self.baseline_candidates = num_samples, baseline_candidates
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
        datamodule, scorer = trainer.datamodule, getattr(pl_module, "scorers", {}).get("val")
        predictions = getattr(pl_module, "predictions", {}).get("val", {})
        if datamodule is not None and scorer is not None and predictions:
            train_captions = [c for refs in datamodule.references("train").values() for c in refs]
            caption, scores = best_constant_caption(
                train_captions, scorer, sorted(predictions), self.baseline_candidates)
            self.report["blind_baseline"] = {"caption": caption, **scores}
            self.report["distinct_val_captions"] = len(set(predictions.values()))
            self.report["val_images"] = len(predictions)
            self._print(datamodule.references("val"), predictions)
        self.write()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.report["test"] = self._metrics(trainer, "test/")
            self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2))
        tmp.replace(self.path)

    def _print(self, references: dict[int, list[str]], predictions: dict[int, str]) -> None:
        console = Console()
        final, best, blind = self.report["final"], self.report["best"], self.report["blind_baseline"]
        table = Table(title="Validation: model vs blind baseline (best constant caption)")
        for column in ("metric", "final", "best", "blind baseline"):
            table.add_column(column, justify="right" if column != "metric" else "left")
        for name in ("bleu1", "bleu2", "bleu3", "bleu4", "cider"):
            key = f"val/{name}"
            if key in final:
                table.add_row(name, f"{final[key]:.4f}", f"{best[key]:.4f}", f"{blind[name]:.4f}")
        console.print(table)
        console.print(f"blind baseline caption: [italic]{blind['caption']}[/italic]")
        console.print(
            f"distinct captions: {self.report['distinct_val_captions']} for {self.report['val_images']} "
            "validation images")
        samples = Table(title="Sample validation captions")
        samples.add_column("image id", justify="right")
        samples.add_column("model")
        samples.add_column("a reference")
        for image_id in sorted(predictions)[: self.num_samples]:
            samples.add_row(str(image_id), predictions[image_id], references[image_id][0])
        console.print(samples)
        console.print(f"metrics written to {self.path}")
