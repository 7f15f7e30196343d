"""Flickr8k / Flickr30k trees shaped like the downloads, for tests: the file names, headers, separators and the
known defects of each (Kaggle's quoted CSV, the token file's #0-#4 suffixes, results.csv's stray spaces and its
row without a second pipe), with the built-in set's drawn scenes as pictures."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from cocofiles import _write_picture, make_images

LAYOUTS = ("kaggle8k", "token8k", "csv30k", "karpathy8k")
IMAGE_DIR = {"kaggle8k": "Images", "token8k": "Flicker8k_Dataset", "csv30k": "flickr30k-images",
             "karpathy8k": "Images"}


@dataclass
class FlickrImage:
    name: str
    captions: list[str]
    karpathy_split: str


def write_flickr(root: Path, layout: str, count: int = 32) -> list[FlickrImage]:
    """A Flickr tree under ``root`` in ``layout``; returns its images (5 usable captions each)."""
    pictures = make_images(num_train=count, num_val=0, seed=3)
    images = []
    for k, picture in enumerate(pictures):
        name = f"{1000268201 + 7919 * k}_{k:04x}a3c1.jpg" if layout != "csv30k" else f"{1000092795 + 131 * k}.jpg"
        picture.mode = "RGB"
        _write_picture(picture, root / IMAGE_DIR[layout] / name)
        split = "train" if k < count - 8 else "val" if k < count - 4 else "test"
        images.append(FlickrImage(name, [" ".join(c.split()) for c in picture.captions[:5]], split))
    root.mkdir(parents=True, exist_ok=True)
    if layout in ("kaggle8k", "karpathy8k"):
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")  # pandas' to_csv: a caption with a comma is quoted
        writer.writerow(["image", "caption"])
        for image in images:
            for caption in image.captions:
                writer.writerow([image.name, caption + (" , on a grey background" if len(caption) % 3 == 0 else "")])
        writer.writerow([images[0].name, images[0].captions[0]
                         + (" , on a grey background" if len(images[0].captions[0]) % 3 == 0 else "")])  # a repeat
        (root / "captions.txt").write_text(out.getvalue())
    if layout == "token8k":
        lines = [f"{image.name}#{n}\t{caption}" for image in images for n, caption in enumerate(image.captions)]
        (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    if layout == "csv30k":
        lines = ["image_name| comment_number| comment"]
        for image in images:
            lines += [f"{image.name}| {n}| {caption}" for n, caption in enumerate(image.captions)]
        name, last = images[1].name, images[1].captions[4]
        lines[lines.index(f"{name}| 4| {last}")] = f"{name}| 4 {last}"  # as row 19,999 of the download
        (root / "results.csv").write_text("\n".join(lines) + "\n")
    if layout == "karpathy8k":
        entries = [{"filename": image.name, "imgid": k, "split": image.karpathy_split,
                    "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": k, "sentid": 5 * k + n}
                                  for n, c in enumerate(image.captions)], "sentids": list(range(5 * k, 5 * k + 5))}
                   for k, image in enumerate(images)]
        (root / "dataset_flickr8k.json").write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    return images
