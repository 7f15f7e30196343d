"""Caption image files with a trained checkpoint: ``python src/caption.py ckpt_path=... images=...``.

``images`` is a file, a folder (its image files; not recursive) or several of them, as a YAML list
(``images=[a.jpg,photos/]``) or one quoted comma-separated string (``images='a.jpg,b.jpg'``; Hydra reads an
unquoted comma list as a sweep). Files that cannot be read as images are skipped with a warning naming
them. No data set is needed: the checkpoint carries the model, its vocabulary and the image size it was
trained with (``image_size=...`` overrides the latter, and is needed for checkpoints that lack it). Files are
read exactly as training read them (:class:`captioning.inference.Captioner`).

Prints ``<file>\\t<caption>`` per image on stdout (log messages go to stderr) and writes
``captions.json`` (``[{"file", "caption", "log_prob"}]``, with ``decoding.n_best=K`` also ``"nbest"``: the K
captions, best first, with their log-probabilities) to the run dir (``outputs/caption/runs/<time>/``).
``ckpt_path=[a.ckpt,b.ckpt]`` captions with the checkpoints as an ensemble.
With ``attention_maps=true`` and an attention model, also ``attention/<stem>.png`` per image: the image
and the attention map of every word.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from captioning.inference import Captioner, collect_images, unique_stem
from captioning.io import write_json
from captioning.utils import explain_errors, resolve_ckpt_paths, save_config
from captioning.visualize import attention_overlay

log = logging.getLogger(__name__)


def caption(cfg: DictConfig) -> list[dict[str, Any]]:
    """Caption the image files ``cfg.images`` names; the results written to captions.json."""
    ckpt_paths = resolve_ckpt_paths(cfg.ckpt_path, cfg.paths.log_dir, "train")
    ckpt_path = ckpt_paths[0]
    files = collect_images(cfg.images)
    captioner = Captioner.from_checkpoint(ckpt_paths, instantiate(cfg.decoding), cfg.device, cfg.image_size)
    attention_maps = bool(cfg.attention_maps)
    if attention_maps and not captioner.has_attention:
        log.warning("attention_maps=true, but %s is %s: no maps are drawn.", ckpt_path,
                    f"an ensemble of {len(ckpt_paths)}" if len(ckpt_paths) > 1
                    else f"a {captioner.module.decoder.cell_type} decoder without attention")
        attention_maps = False
    output_dir = Path(cfg.paths.output_dir)
    save_config(cfg, output_dir / "config.yaml")

    results: list[dict[str, Any]] = []
    used_stems: set[str] = set()
    for path, image, result in captioner.caption_files(files, cfg.batch_size):
        entry = {"file": str(path), "caption": result.text, "log_prob": result.log_prob}
        if result.alternatives is not None:
            entry["nbest"] = [{"caption": text, "log_prob": lp} for text, lp in result.alternatives]
        results.append(entry)
        print(f"{path}\t{result.text}", flush=True)
        if attention_maps and result.attention is not None:
            overlay = attention_overlay(image, result.words, result.attention, title=path.name)
            target = output_dir / "attention" / f"{unique_stem(path, used_stems)}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            overlay.save(target)
    if not results:
        raise ValueError(
            f"None of the {len(files)} file(s) given by images={cfg.images} could be captioned: no readable "
            "image among them (see the warnings above). Pass image files or a folder holding some."
        )
    target = write_json(output_dir / "captions.json", results)
    skipped = len(files) - len(results)
    log.info("Captioned %d image(s)%s; wrote %s%s.", len(results), f", skipped {skipped}" if skipped else "",
             target, f" and {output_dir / 'attention'}/" if attention_maps else "")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="caption")
@explain_errors
def main(cfg: DictConfig) -> list[dict[str, Any]]:
    return caption(cfg)


if __name__ == "__main__":
    main()
