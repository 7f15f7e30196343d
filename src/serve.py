"""A demo page for a trained captioner: ``python src/serve.py ckpt_path=... [port=7860]``.

Serves on 127.0.0.1 by default (``host=0.0.0.0`` for other machines): drop images, read each caption with its
log-probability, greedy or beam search (chosen on the page), and for the attention model where it looked
for every word. The same image pipeline and decoding code as caption.py (:mod:`captioning.demo`). Needs the
demo extra: ``pip install -e ".[demo]"``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from captioning.inference import Captioner
from captioning.utils import explain_errors, resolve_ckpt_path, save_config

log = logging.getLogger(__name__)


def serve(cfg: DictConfig, block: bool = True):
    """Load the model once and start the page; with ``block`` serve until interrupted. Returns the Gradio app."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo on a closed network
    try:
        from captioning.demo import DemoCaptioner, build_demo, example_images
    except ImportError as error:  # gradio is an extra
        raise ValueError(f"The demo needs Gradio ({error}): pip install -e \".[demo]\".") from error
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    decoding = instantiate(cfg.decoding)
    captioner = Captioner.from_checkpoint(ckpt_path, decoding, cfg.device, cfg.image_size, cfg.max_image_pixels)
    data = captioner.data
    output_dir = Path(cfg.paths.output_dir)
    save_config(cfg, output_dir / "config.yaml")
    examples = example_images(output_dir / "examples", cfg.examples, data.get("root")) if cfg.examples else []
    beam = decoding.strategy == "beam" and decoding.beam_size > 1
    page = build_demo(DemoCaptioner(captioner, decoding.max_length), examples, "beam" if beam else "greedy",
                      decoding.beam_size if beam else 3, cfg.max_batch_size)
    page.queue(default_concurrency_limit=1)
    log.info("Serving %s on http://%s:%d", ckpt_path, cfg.host, cfg.port)
    page.launch(server_name=cfg.host, server_port=cfg.port, max_file_size=cfg.max_file_size, prevent_thread_lock=not block,
                allowed_paths=[str(Path(p).parent) for p in examples], quiet=False, footer_links=[])
    return page


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
@explain_errors
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
