"""Export a trained captioner: ``python src/export.py ckpt_path=... [format=onnx|torchscript]``.

Writes ``encoder.onnx`` and ``step.onnx`` (or ``.pt``), ``vocab.json``, ``config.json`` and ``run.py`` — the
decoding loops, which need only NumPy and ONNX Runtime (or PyTorch) — to ``outputs/export/runs/<time>/exported/``
(``output_dir=`` elsewhere), then checks that the exported model gives PyTorch's greedy captions on random
images. See :mod:`captioning.export` and :mod:`captioning.runtime`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from captioning.export import export_captioner, verify_export
from captioning.inference import pick_contract
from captioning.module import load_checkpoint
from captioning.utils import explain_errors, resolve_ckpt_path, save_config

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> Path:
    """Export the checkpoint; the folder written."""
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    module, data = load_checkpoint(ckpt_path)
    contract = pick_contract(module, cfg.image_size, data, ckpt_path)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(cfg.paths.output_dir) / "exported"
    save_config(cfg, Path(cfg.paths.output_dir) / "config.yaml")
    folder = export_captioner(module, contract, output_dir, cfg.format)
    if cfg.verify:
        verify_export(module, folder)
    log.info("Exported %s (%s) to %s; caption with: python %s %s <images>", ckpt_path, cfg.format, folder,
             folder / "run.py", folder)
    return folder


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@explain_errors
def main(cfg: DictConfig) -> str:
    return str(export(cfg))


if __name__ == "__main__":
    main()
