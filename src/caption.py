"""Caption image files with a trained checkpoint: ``python src/caption.py ckpt_path=... images=...``.

``images`` is a file, a folder (its image files; not recursive) or several of them, as a YAML list
(``images=[a.jpg,photos/]``) or one quoted comma-separated string (``images='a.jpg,b.jpg'``; Hydra reads an
unquoted comma list as a sweep). Files that cannot be read as images are skipped with a warning naming
them. No data set is needed: the checkpoint carries the model, its vocabulary and the image size it was
trained with (``image_size=...`` overrides the latter, and is needed for checkpoints that lack it).

Prints ``<file>\\t<caption>`` per image on stdout (log messages go to stderr) and writes
``captions.json`` (``[{"file", "caption", "log_prob"}]``) to the run dir (``outputs/caption/runs/<time>/``).
With ``attention_maps=true`` and an attention model, also ``attention/<stem>.png`` per image: the image
and the attention map of every word.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from PIL import Image

from captioning.data.images import BadImageError
from captioning.data.transforms import ImagePipeline
from captioning.io import write_json
from captioning.module import load_checkpoint
from captioning.utils import resolve_ckpt_path, save_config
from captioning.visualize import attention_overlay

log = logging.getLogger(__name__)


def image_suffixes() -> set[str]:
    """File name endings PIL can open (.jpg, .png, .webp, ...), lower case."""
    return {suffix.lower() for suffix in Image.registered_extensions()}


def collect_images(images: Any) -> list[Path]:
    """The ``images`` config value -> the image files to caption, in the order given (folders sorted).

    Paths that do not exist are skipped with a warning, as are files in a folder whose name is not an
    image file name. Raises ValueError when ``images`` names no path at all.
    """
    if isinstance(images, str):
        entries = [images] if Path(images).expanduser().exists() else images.split(",")
    elif isinstance(images, ListConfig | Sequence):
        entries = [str(entry) for entry in images]
    else:
        raise ValueError(
            f"images={images!r}: pass an image file, a folder, a list images=[a.jpg,photos/] or a quoted "
            "comma-separated string images='a.jpg,b.jpg'."
        )
    entries = [entry.strip() for entry in entries if entry.strip()]
    if not entries:
        raise ValueError("images is empty: pass an image file, a folder or a list of them (images=...).")
    suffixes, files = image_suffixes(), []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            others = [p.name for p in found if p.suffix.lower() not in suffixes]
            if others:
                log.warning("Skipped %d file(s) in %s that are not image files by name: %s",
                            len(others), path, ", ".join(others))
            files.extend(p for p in found if p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        else:
            log.warning("Skipped %s: no such file or folder.", path)
    return list(dict.fromkeys(files))


def read_image(pipeline: ImagePipeline, path: Path) -> Image.Image | None:
    """The image as training read it (RGB, transparency over white, 16-bit rescaled), or None with a
    warning naming the file when it cannot be read."""
    try:
        return pipeline.load(path)
    except (FileNotFoundError, BadImageError) as error:
        log.warning("Skipped %s: %s", path, error)
        return None


def pick_image_size(configured: int | None, saved: dict[str, Any], ckpt_path: str) -> int:
    """The side images are resized to: ``image_size`` if given, else the training DataModule's."""
    trained = saved.get("image_size")
    if configured is None:
        if trained is None:
            raise ValueError(
                f"{ckpt_path} does not record the image size its model was trained with (it holds no "
                "DataModule hyperparameters); pass image_size=<pixels>, the data.image_size of its training run."
            )
        return int(trained)
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
        raise ValueError(f"image_size={configured!r} must be a positive integer (pixels), or null.")
    if trained is not None and int(trained) != configured:
        log.warning("image_size=%d differs from the %d px the model was trained with; captions may suffer.",
                    configured, trained)
    return configured


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:<n> or mps.") from error


def batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def unique_stem(path: Path, used: set[str]) -> str:
    """``path``'s stem, suffixed -1, -2... when another image already took it (a.jpg and a.png)."""
    stem, n = path.stem, 0
    while (stem if n == 0 else f"{stem}-{n}") in used:
        n += 1
    name = stem if n == 0 else f"{stem}-{n}"
    used.add(name)
    return name


@hydra.main(version_base="1.3", config_path="../conf", config_name="caption")
def main(cfg: DictConfig) -> list[dict[str, Any]]:
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size!r} must be a positive integer.")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    files = collect_images(cfg.images)
    module, data_hparams = load_checkpoint(ckpt_path)
    image_size = pick_image_size(cfg.image_size, data_hparams, ckpt_path)
    module.set_decoding(instantiate(cfg.decoding))
    module.eval().to(pick_device(cfg.device))
    attention_maps = bool(cfg.attention_maps)
    if attention_maps and module.decoder.cell_type != "attention":
        log.warning("attention_maps=true, but %s is a %s decoder without attention: no maps are drawn.",
                    ckpt_path, module.decoder.cell_type)
        attention_maps = False
    output_dir = Path(cfg.paths.output_dir)
    save_config(cfg, output_dir / "config.yaml")

    # the same reading and transform as training and evaluation, with the checkpoint's image size
    pipeline = ImagePipeline(image_size, max_pixels=data_hparams.get("max_image_pixels"))
    results: list[dict[str, Any]] = []
    used_stems: set[str] = set()
    for chunk in batches(files, cfg.batch_size):
        loaded = [(path, image) for path in chunk if (image := read_image(pipeline, path)) is not None]
        if not loaded:
            continue
        images = torch.stack([pipeline(image) for _, image in loaded]).to(module.device)
        with torch.inference_mode():
            decoded = module(images)
        for i, (path, image) in enumerate(loaded):
            caption = module.caption_text(decoded.captions[i])
            results.append({"file": str(path), "caption": caption, "log_prob": float(decoded.log_probs[i])})
            print(f"{path}\t{caption}", flush=True)
            if attention_maps and decoded.attn_weights is not None:
                words = module.vocab.words(decoded.captions[i])
                overlay = attention_overlay(image, words, decoded.attn_weights[i], title=path.name)
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


if __name__ == "__main__":
    main()
