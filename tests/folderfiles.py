"""Caption folders and Hugging Face datasets shaped as people have them, for tests: a CSV with one row per caption
and a split column, JSON lines with caption lists, ``imagefolder``'s split sub-folders with a metadata.jsonl in each,
a root metadata.csv naming ``train/...`` files; ``save_to_disk`` DatasetDicts, hub-style parquet files with one
caption per row, a dataset without splits holding a split column — with the built-in set's scenes as pictures."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from cocofiles import _write_picture, make_images, render_scene

FOLDER_LAYOUTS = ("csv_rows", "jsonl_lists", "imagefolder_splits", "imagefolder_root")
HF_LAYOUTS = ("save_to_disk", "parquet_hub", "split_column")
SPLIT_DIR = {"train": "train", "val": "validation", "test": "test"}


@dataclass
class FolderImage:
    file: str  # relative to the root
    captions: list[str]
    split: str  # train / val / test


def _pictures(count: int, seed: int = 5):
    pictures = make_images(num_train=count, num_val=0, seed=seed)
    for picture in pictures:
        picture.mode = "RGB"
    return pictures


def _split(k: int, count: int) -> str:
    return "train" if k < count - 8 else "val" if k < count - 4 else "test"


def write_folder(root: Path, layout: str, count: int = 32, splits: tuple[str, ...] = ("train", "val", "test"),
                 ) -> list[FolderImage]:
    """A caption folder under ``root`` in ``layout``; returns its images (5+ usable captions each). ``splits``
    keeps only the images of those splits (``("val",)``: an evaluation-only folder)."""
    images = []
    for k, picture in enumerate(_pictures(count)):
        split = _split(k, count)
        if split not in splits:
            continue
        if layout == "imagefolder_splits":
            file = f"{SPLIT_DIR[split]}/shots/img_{k:03d}.jpg"
        elif layout == "imagefolder_root":
            file = f"{split}/img_{k:03d}.jpg"
        else:
            file = f"photos/{2020 + k % 3}/img_{k:03d}.jpg"  # nested folders
        _write_picture(picture, root / file)
        images.append(FolderImage(file, [" ".join(c.split()) for c in picture.captions[:5]], split))
    if layout == "csv_rows":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "caption", "split"])
        for image in images:
            for caption in image.captions:
                writer.writerow([image.file, caption, {"val": "validation"}.get(image.split, image.split)])
        writer.writerow([images[0].file, images[0].captions[0], images[0].split])  # a repeated row
        writer.writerow([images[1].file, "", images[1].split])  # an empty caption
        writer.writerow([images[2].file, "a scene, drawn with a comma", images[2].split])
        images[2].captions.append("a scene, drawn with a comma")
        (root / "captions.csv").write_text(out.getvalue())
    elif layout == "jsonl_lists":
        lines = [json.dumps({"file_name": image.file, "captions": image.captions}) for image in images]
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    elif layout == "imagefolder_splits":
        for split in splits:
            rows = [json.dumps({"file_name": image.file.split("/", 1)[1], "text": caption})
                    for image in images if image.split == split for caption in image.captions]
            (root / SPLIT_DIR[split] / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    elif layout == "imagefolder_root":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["file_name", "text"])
        for image in images:
            writer.writerow([image.file, json.dumps(image.captions)])  # a JSON list in a CSV cell
        (root / "metadata.csv").write_text(out.getvalue())
    return images


def _png(picture) -> bytes:
    import numpy as np

    out = io.BytesIO()
    render_scene(picture.scene, 64, np.random.default_rng(picture.image_id)).resize(picture.size).save(out, "PNG")
    return out.getvalue()


def write_hf(root: Path, layout: str, count: int = 32) -> list[FolderImage]:
    """A Hugging Face dataset at ``root`` in ``layout``; returns its images (``file`` is the row label)."""
    import datasets

    rows = {"train": [], "val": [], "test": []}
    images = []
    for k, picture in enumerate(_pictures(count, seed=7)):
        split = _split(k, count)
        captions = [" ".join(c.split()) for c in picture.captions[:5]]
        rows[split].append((_png(picture), captions))
        images.append(FolderImage(f"{split}[{len(rows[split]) - 1}]", captions, split))
    def dataset(items):
        return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in items],
                                           "caption": [c for _, c in items]}).cast_column("image", datasets.Image())

    if layout == "save_to_disk":
        datasets.DatasetDict({SPLIT_DIR[s]: dataset(items) for s, items in rows.items()}).save_to_disk(str(root))
    elif layout == "parquet_hub":  # one row per caption, as many hub caption sets are
        for split, items in rows.items():
            table = datasets.Dataset.from_dict(
                {"image": [{"bytes": b, "path": None} for b, caps in items for _ in caps],
                 "text": [c for _, caps in items for c in caps]}).cast_column("image", datasets.Image())
            (root / "data").mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(root / "data" / f"{SPLIT_DIR[split]}-00000-of-00001.parquet"))
    elif layout == "split_column":  # one table, a split column, the captions in five columns
        items = [(b, c, s) for s in rows for b, c in rows[s]]
        columns = {"img": [{"bytes": b, "path": None} for b, _, _ in items],
                   "split": [{"val": "validation"}.get(s, s) for _, _, s in items]}
        columns.update({f"caption_{n}": [c[n] for _, c, _ in items] for n in range(5)})
        table = datasets.Dataset.from_dict(columns).cast_column("img", datasets.Image())
        table.save_to_disk(str(root))
    return images
