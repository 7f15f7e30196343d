"""Train a captioner: ``python src/train.py [group=option ...] [key=value ...]``.

Composes the run from conf/ (train.yaml and its groups), then fits, tests the best checkpoint and
returns the optimised metric (for sweeps). ``train(cfg)`` is the whole run on a composed config, for code
(and tests) that compose their own.
"""

from __future__ import annotations

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from captioning.loggers import WandbLogger
from captioning.sweeps import check_sweep, optimized_value
from captioning.utils import (
    explain_errors,
    has_split,
    instantiate_callbacks,
    instantiate_dict,
    instantiate_trainer,
    print_config,
    resolve_ckpt_path,
    resolve_start,
    save_config,
    seed_everything,
)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) as ``cfg`` says; the metrics the trainer had at the end of fitting."""
    print_config(cfg)
    save_config(cfg, f"{cfg.paths.output_dir}/config.yaml")
    seed_everything(cfg.get("seed"))

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    module: L.LightningModule = instantiate(cfg.module, _recursive_=False)
    # the encoder that sees the images: data.image_size=auto follows it, data.feature_cache stores its features
    if hasattr(datamodule, "use_encoder"):
        datamodule.use_encoder(module.encoder)
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"), cfg.trainer, loggers)
    trainer: L.Trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    # resume the run, or start from another objective's weights (ckpt_path=<xe.ckpt> objective=scst)
    ckpt_path = resolve_start(module, resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test") and not has_split(datamodule, "test"):
        # COCO 2017 (and the official 2014 layout) publish no test captions: nothing to test on
        rank_zero_info("Fitting done; no test split (data.test_split is empty), so the test step is skipped: "
                       "score a checkpoint with src/eval.py split=val, or use data=coco_karpathy for a test split.")
    elif cfg.get("test") and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
    elif cfg.get("test"):
        trainer.test(module, datamodule=datamodule)

    # End the W&B run with the job, so each job of a multirun is its own run (a trainer that raised has
    # ended it already, as failed: captioning.loggers.WandbLogger.finalize).
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.finish()
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@explain_errors
def main(cfg: DictConfig) -> float | None:
    check_sweep(cfg)
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
