"""Set-up cost at COCO size: seconds from constructing the DataModule to the first training batch, and peak memory,
for each caption source, cold (nothing cached beside the data) and warm (a second start).

    python benchmarks/bench_setup.py [--images 118287] [--small 4000] [--sources coco,folder,hf] [--root DIR]
                                     [--json out.json]

Writes a caption set of ``--images`` training images with 5 captions each (COCO's 118,287 / 591k by default; a
vocabulary of ~10k words drawn Zipf-like) plus 5,000 validation images, in every source's layout: COCO's official
``annotations/captions_{train,val}2017.json``; ``data=folder``'s ``captions.csv`` with one row per caption and a
split column; ``data=hf``'s hub-style parquet files (one row per image, its captions a list; distinct 16 px PNGs
in the rows). Cold is a start with nothing kept beside the data (no vocabulary, parsed splits, encoded captions
or written-out images); warm, a second start that reads them. The image files are hard links of a few small
JPEGs (the set-up reads names, not pixels), and images are not held in memory (``cache_images=false``): this measures what the set-up costs, not decoding. Each start runs
in its own process (peak resident memory is the process' ``ru_maxrss``); ``--small`` is the same set at 4,000
images, so the table shows how the cost grows with N.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("coco", "folder", "hf")
VAL_IMAGES = 5000


def _words(count: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
    return sorted(words)


def write_sets(root: Path, images: int, vocabulary: int = 10000, seed: int = 0) -> None:
    """The caption set in each source's layout under ``root`` (coco/ holds the folder CSV too)."""
    from PIL import Image

    rng = random.Random(seed)
    words = _words(vocabulary, rng)
    weights = [1.0 / (k + 1) for k in range(len(words))]  # Zipf: a long tail of rare words, as in COCO
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    pictures: list[Path] = []
    links = 0

    def picture() -> Path:  # a file system allows ~65,000 links to one file: a new one every 50,000
        nonlocal links
        if links % 50000 == 0:
            pictures.append(coco / f"picture{len(pictures)}.jpg")
            Image.new("RGB", (64, 48), (120, 40, 200)).save(pictures[-1], quality=90)
        links += 1
        return pictures[-1]

    rows, parquet = [], {"train": [], "validation": []}
    caption_id = 1
    for split, count, start in (("train", images, 1), ("val", VAL_IMAGES, 10_000_000)):
        folder = coco / f"{split}2017"
        folder.mkdir(exist_ok=True)
        records, annotations = [], []
        for k in range(count):
            image_id = start + 3 * k
            name = f"{image_id:012d}.jpg"
            os.link(picture(), folder / name)
            records.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
            captions = [" ".join(rng.choices(words, weights, k=rng.randint(8, 13))) for _ in range(5)]
            for caption in captions:
                annotations.append({"id": caption_id, "image_id": image_id, "caption": caption})
                caption_id += 1
                rows.append((f"{split}2017/{name}", caption, split))
            parquet["train" if split == "train" else "validation"].append((k, captions))
        (coco / "annotations" / f"captions_{split}2017.json").write_text(
            json.dumps({"images": records, "annotations": annotations}))
    with open(coco / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "split"])
        writer.writerows(rows)
    _write_parquet(root / "hf", parquet)


def _write_parquet(root: Path, splits: dict[str, list]) -> None:
    import datasets
    from PIL import Image

    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        images = []
        for k, _ in items:
            out = io.BytesIO()
            Image.new("RGB", (16, 16), (k % 256, (k // 256) % 256, (k // 65536) % 256 + (split == "train") * 100)
                      ).save(out, "PNG")
            images.append({"bytes": out.getvalue(), "path": None})
        table = datasets.Dataset.from_dict({"image": images, "caption": [c for _, c in items]})
        table.cast_column("image", datasets.Image()).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))


def datamodule(source: str, root: Path):
    options = dict(image_size=32, num_workers=0, cache_images=False, progress=False, min_word_count=5)
    if source == "coco":
        from captioning.data.coco import CocoCaptionsDataModule
        return CocoCaptionsDataModule(str(root / "coco"), augment=False, **options)
    if source == "folder":
        from captioning.data.folder import FolderDataModule
        return FolderDataModule(str(root / "coco"), augment=False, **options)
    from captioning.data.hf import HuggingFaceDataModule
    return HuggingFaceDataModule(str(root / "hf"), augment=False, **options)


def child(source: str, root: Path) -> None:
    """One start, in this process: the seconds to the first training batch and the peak memory, as JSON."""
    tic = time.perf_counter()
    dm = datamodule(source, root)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    seconds = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "pairs": len(dm.datasets["train"]),
                      "vocab": len(dm.vocab), "batch": list(batch["images"].shape)}))


def clear_caches(root: Path) -> None:
    """Everything a start keeps beside the data: the vocabulary, the parsed splits and encoded captions
    (``captions/``), the images a Hugging Face dataset wrote out, its datasets cache."""
    for source in ("coco", "hf"):
        for vocab in (root / source).glob("vocab_*.json"):
            vocab.unlink()
        shutil.rmtree(root / source / "captions", ignore_errors=True)
    shutil.rmtree(root / "hf" / "images", ignore_errors=True)
    shutil.rmtree(root / "hf-home", ignore_errors=True)


def start(source: str, root: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(root / "hf-home"), "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", source, "--root", str(root)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{source} at {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=118287)
    parser.add_argument("--small", type=int, default=4000, help="the small set's training images (0: none)")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--root", default=None, help="where the sets are written (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    if args.child:
        child(args.child, Path(args.root))
        return
    sources = [s for s in args.sources.split(",") if s]
    if unknown := set(sources) - set(SOURCES):
        sys.exit(f"--sources: {', '.join(sorted(unknown))} not one of {', '.join(SOURCES)}")
    base = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_setup_"))
    results = []
    for images in [n for n in (args.small, args.images) if n]:
        root = base / f"n{images}"
        if not (root / "hf" / "data").is_dir():
            shutil.rmtree(root, ignore_errors=True)
            tic = time.perf_counter()
            write_sets(root, images)
            print(f"wrote {images:,} + {VAL_IMAGES:,} images x 5 captions in {time.perf_counter() - tic:.0f} s",
                  flush=True)
        for source in sources:
            clear_caches(root)
            cold = start(source, root)
            warm = start(source, root)
            results.append({"source": source, "images": images, "cold_s": cold["seconds"], "warm_s": warm["seconds"],
                            "cold_peak_mb": cold["peak_mb"], "warm_peak_mb": warm["peak_mb"], "pairs": cold["pairs"],
                            "vocab": cold["vocab"]})
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'source':8} {'images':>8} {'pairs':>8} {'vocab':>6} {'cold s':>7} {'warm s':>7} {'peak MB':>8} "
          f"{'x small (warm)':>14}")
    for r in results:
        small = next((s for s in results if s["source"] == r["source"] and s["images"] == args.small), None)
        ratio = f"{r['warm_s'] / small['warm_s']:.1f}" if small and small is not r else "-"
        print(f"{r['source']:8} {r['images']:8,} {r['pairs']:8,} {r['vocab']:6,} {r['cold_s']:7.1f} {r['warm_s']:7.1f} "
              f"{max(r['cold_peak_mb'], r['warm_peak_mb']):8,.0f} {ratio:>14}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.root:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
