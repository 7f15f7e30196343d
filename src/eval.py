"""Score a trained captioner on a split: ``python src/eval.py ckpt_path=... [split=test] [decoding.beam_size=3]``.

Decodes every image of the split with the configured decoding (``decoding.*``, greedy by default) and
reports two sets of metrics:

- fast: BLEU-1..4 and CIDEr-D computed by the module exactly as in validation (no Java). Under DDP
  (``trainer.devices=2``) every process decodes its share and the captions are gathered and deduplicated
  by image id, so the numbers equal those of one process;
- official: the COCO caption evaluation (pycocoevalcap: PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr and,
  with ``spice=true``, SPICE), run once on rank 0. These are the paper-comparable numbers.

Writes ``predictions.json`` (COCO results format) and ``metrics.json`` to the run dir
(``outputs/eval/runs/<time>/``) and prints a table.

The split is the top-level key ``split`` (``val`` or ``test``), not ``data.split``: ``data.*`` maps onto
the DataModule's constructor. The data set's parameters come from the checkpoint (see
``data_from_checkpoint`` in conf/eval.yaml); ``ckpt_path=last`` is the newest last.ckpt of the train runs.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from captioning.io import write_json
from captioning.metrics import CaptionScorer, coco_caption_eval
from captioning.module import load_checkpoint
from captioning.utils import instantiate_dict, print_config, resolve_ckpt_path, save_config

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
METRIC_ORDER = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")


def _command_line() -> list[Any]:
    if not HydraConfig.initialized():
        return []
    return OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))


def command_line_data_keys() -> set[str]:
    """The ``data.<key>`` names set on the command line (they win over the checkpoint's values)."""
    return {o.key_or_group.split(".")[1] for o in _command_line() if o.key_or_group.startswith("data.")}


def command_line_data_group() -> str | None:
    """The ``data=<option>`` given on the command line, if any."""
    return next((str(o.value()) for o in _command_line() if o.key_or_group == "data"), None)


def data_from_checkpoint(data: DictConfig, saved: Mapping[str, Any], explicit: set[str]) -> DictConfig:
    """The DataModule config the checkpoint was trained with: its ``_target_`` and values, with this
    config's loader settings (batch size, workers...) and the ``data.*`` given on the command line."""
    target = saved["_target_"]
    params, loader = _parameters(target), _loader_arguments(target)
    rebuilt = OmegaConf.create({"_target_": target})
    for key in params:
        if key in data and (key in loader or key in explicit):
            rebuilt[key] = data[key]
    unknown = explicit - set(params)
    if unknown:
        raise ValueError(
            f"data.{sorted(unknown)[0]} is not an argument of the checkpoint's DataModule {target}; its "
            f"arguments are {', '.join(params)}."
        )
    return rebuilt


def _parameters(target: str) -> list[str]:
    return [p for p in inspect.signature(get_class(target).__init__).parameters if p != "self"]


def _loader_arguments(target: str) -> set[str]:
    """The DataModule's own list of arguments that say how to load (``LOADER_ARGUMENTS``), not what."""
    return set(getattr(get_class(target), "LOADER_ARGUMENTS", ()))


def merge_data_config(data: DictConfig, saved: Mapping[str, Any], explicit: set[str], group: str) -> list[str]:
    """Set the data-defining arguments of ``data`` from the checkpoint's DataModule hyperparameters, in place.

    Only arguments of ``data._target_``'s constructor are taken, except the loader settings and the keys
    in ``explicit``. Returns the keys taken. Raises ValueError when the checkpoint's DataModule was
    another kind (the target needs arguments it never had), naming the group to pass instead.
    """
    params, loader = _parameters(data._target_), _loader_arguments(data._target_)
    wanted = [p for p in params if p not in loader and p not in explicit]
    missing = [p for p in wanted if p not in saved]
    if missing:
        raise ValueError(
            f"The checkpoint's DataModule does not fit data={group} ({data._target_}): it has no "
            f"{', '.join(missing)}. It was trained with another data group; pass that one (e.g. data=coco "
            "data.root=...), or data_from_checkpoint=false with the data.* it was trained with."
        )
    with open_dict(data):
        for key in wanted:
            data[key] = saved[key]
    return wanted


def print_table(fast: Mapping[str, float], official: Mapping[str, float] | None, title: str,
                grounding: Mapping[str, float] | None = None) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("fast (validation code)", justify="right")
    table.add_column("official (pycocoevalcap)", justify="right")
    for name in METRIC_ORDER:
        if name in fast or (official and name in official):
            cells = [f"{m[name]:.4f}" if m and name in m else "-" for m in (fast, official)]
            table.add_row(name, *cells)
    # grounded in the image: computed by the validation code only
    for name, value in (grounding or {}).items():
        table.add_row(f"grounding/{name}", f"{value:.4f}", "-")
    Console().print(table)


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> dict[str, float] | None:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}: eval.py scores the val or test split; pass split=val or split=test.")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    module, data_hparams = load_checkpoint(ckpt_path)
    if cfg.data_from_checkpoint and data_hparams:
        group = HydraConfig.get().runtime.choices.get("data", "?") if HydraConfig.initialized() else "?"
        explicit = command_line_data_keys()
        target = data_hparams.get("_target_")
        if target and target != cfg.data._target_ and command_line_data_group() is None:
            # trained with another data group (data=coco): the checkpoint says which, data.* still win
            with open_dict(cfg):
                cfg.data = data_from_checkpoint(cfg.data, data_hparams, explicit)
            group = f"{target.rpartition('.')[2]} (from the checkpoint)"
        merge_data_config(cfg.data, data_hparams, explicit, group)
    elif cfg.data_from_checkpoint:
        log.warning("%s holds no DataModule hyperparameters; using the data config as given.", ckpt_path)
    print_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    save_config(cfg, output_dir / "config.yaml")

    module.set_decoding(instantiate(cfg.decoding))
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False)
    seconds["load"] = time.perf_counter() - start

    tic = time.perf_counter()
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(module, datamodule=datamodule, verbose=False)
    seconds["decode_and_fast_metrics"] = time.perf_counter() - tic
    if not trainer.is_global_zero:
        return None  # rank 0 holds every rank's captions (gathered by the module): it alone writes and scores

    predictions: dict[int, str] = module.predictions.get(cfg.split, {})
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
    prefix = f"{cfg.split}/"
    logged = {k[len(prefix):]: float(v) for k, v in (results[0] if results else {}).items() if k.startswith(prefix)}
    # The module logged these (as float32); scored again here in float64 from the same gathered captions,
    # which also times the fast scorer alone (the loop above also decodes): what validation pays per epoch.
    tic = time.perf_counter()
    fast = CaptionScorer(references)(predictions)
    seconds["fast_metrics"] = time.perf_counter() - tic
    # against what each image shows, where the data knows it (scenes of the built-in set, COCO instances)
    grounding = {k.removeprefix("grounding/"): v for k, v in module.grounding_scores(cfg.split, predictions).items()}
    differing = {k: (logged[k], v) for k, v in fast.items() if k in logged and abs(logged[k] - v) > 1e-5}
    if differing:
        log.warning("The module logged other metrics than its gathered captions score to (logged, rescored): "
                    "%s. The files hold the rescored ones.", differing)

    write_json(
        output_dir / "predictions.json",
        [{"image_id": image_id, "caption": predictions[image_id]} for image_id in sorted(predictions)],
    )
    report: dict[str, Any] = {
        "checkpoint": str(Path(ckpt_path).absolute()),
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
        "loss": logged.get("loss"),
        "official": None,
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
    timing = ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items())
    Console().print(f"time: {timing}\nwritten: {output_dir / 'predictions.json'}, {output_dir / 'metrics.json'}")
    return official or fast


if __name__ == "__main__":
    main()
