"""Data pipeline speed: samples/s from the DataModule (JPEG decode + transforms) vs the encoder feature cache,
and the epoch time of training with a frozen torchvision encoder, cache on vs off.

    python benchmarks/bench_data.py [--quick] [--json out.json] [--device cuda] [--threads 1] [--root DIR]

On the built-in shapes set (generated into a temporary folder, or ``--root``; 64 px JPEGs):

- ``loader``: one epoch of the training DataLoader (one sample per (image, caption) pair, each sample one
  JPEG decode + resize + normalise) with 0 and 2 workers, and the same epoch read from the feature cache of
  a frozen, randomly initialised MobileNetV2 (no decode: a row of a memory-mapped float16 array), and the
  images held decoded in memory (``data.cache_images``: resize + normalise only). Ratios are against the
  0-worker JPEG loader.
- ``build``: building that cache once (decode + encoder forward for every image of train/val/test).
- ``epoch``: one training epoch (Lightning, validation off) of the frozen MobileNetV2 + LSTM decoder, with
  the encoder run on every batch (cache off) or its features read from the cache (cache on), timed from the
  epoch's start to its end by a callback; the ratio off / on is the speed-up, and build / (off - on) the
  epochs after which the cache has paid for itself.

Timing is interleaved over rounds, each case's number the median (see common.py). On a busy machine,
``--clock cpu --threads 1 --workers 0`` counts the work rather than the time spent descheduled (the
2-worker loader rows then count only the main process, so read them from a wall-clock run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from common import (
    add_common_arguments,
    clock_of,
    interleaved_times,
    machine_info,
    median,
    print_table,
    setup_device,
    write_json,
)

from captioning.data import CocoCaptionsDataModule
from captioning.data.shapes import ensure_shapes_dataset
from captioning.module import CaptioningModule

ENCODER = {"_target_": "captioning.models.encoder.TorchvisionEncoder", "name": "mobilenet_v2", "weights": None,
           "freeze": True}
DECODER = {"_target_": "captioning.models.CaptioningRNN", "cell_type": "lstm", "wordvec_dim": 128,
           "hidden_dim": 256}
OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3}


def datamodule(root: Path, workers: int, feature_cache: bool, batch_size: int, cache_dir: Path,
               cache_images: bool = False) -> CocoCaptionsDataModule:
    # The shapes set is in the official COCO 2017 layout; the plain COCO DataModule reads it as is.
    # cache_images is off unless asked: its "auto" default would hold this small set decoded in memory, and
    # the JPEG rows would then measure no decoding at all (a COCO-sized split does not fit, so it decodes).
    return CocoCaptionsDataModule(
        root=str(root), year="2017", image_size=64, min_word_count=1, batch_size=batch_size, num_workers=workers,
        persistent_workers=workers > 0, feature_cache=feature_cache, cache_dir=str(cache_dir), progress=False,
        cache_images=cache_images)


def epoch_of(loader) -> int:
    n = 0
    for batch in loader:
        n += len(batch["captions"])
    return n


class EpochTimer(L.Callback):
    def __init__(self, clock) -> None:
        self.clock = clock

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = self.clock()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seconds = self.clock() - self.start


def fit_one_epoch(module: CaptioningModule, dm: CocoCaptionsDataModule, device: torch.device, clock) -> float:
    timer = EpochTimer(clock)
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return timer.seconds


def run(args: argparse.Namespace, device: torch.device) -> dict:
    num_train = 100 if args.quick else 400
    clock = clock_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "shapes"
        cache_dir = Path(tmp) / "features"
        ensure_shapes_dataset(root, num_train=num_train, num_val=20, num_test=20, image_size=64, seed=0,
                              progress=False)
        L.seed_everything(0, verbose=False)
        module = CaptioningModule(encoder=ENCODER, decoder=DECODER, optimizer=OPTIMIZER)

        loaders, modules = {}, {}
        for name, workers, cache, in_memory in (
                ("JPEG, 0 workers", 0, False, False), ("JPEG, 2 workers", 2, False, False),
                ("decoded images in memory (cache_images), 0 workers", 0, False, True),
                ("feature cache, 0 workers", 0, True, False), ("feature cache, 2 workers", 2, True, False)):
            dm = datamodule(root, workers, cache, args.batch_size, cache_dir, cache_images=in_memory)
            if cache:
                dm.use_encoder(module.encoder)
                if not any(cache_dir.glob("train-*")):
                    start = clock()
                    dm.prepare_data()  # builds the cache of train, val and test
                    build_seconds = clock() - start
            dm.prepare_data()
            dm.setup("fit")
            loaders[name] = dm.train_dataloader()
            modules[name] = dm
        samples = len(modules["JPEG, 0 workers"].datasets["train"])
        images = sum(len(modules["JPEG, 0 workers"]._load_split(r)) for r in ("train", "val", "test"))

        loader_times = interleaved_times({n: (lambda loader=loader: epoch_of(loader)) for n, loader in loaders.items()},
                                         torch.device("cpu"), args.rounds, clock=clock)
        base = median(loader_times["JPEG, 0 workers"])
        # with --clock cpu the workers' decoding is not on this process' clock: those rows mean little
        partial = " [main-process CPU only]" if args.clock == "cpu" else ""
        rows = [{"case": f"loader: {n}" + (partial if "2 workers" in n else ""), "seconds": median(t),
                 "per_second": samples / median(t), "ratio": base / median(t)} for n, t in loader_times.items()]
        rows.append({"case": "build the feature cache (decode + encoder, all splits)", "seconds": build_seconds,
                     "per_second": images / build_seconds, "ratio": None})

        epochs = {"off": [], "on": []}
        on_dm = datamodule(root, args.workers, True, args.batch_size, cache_dir)
        on_dm.use_encoder(module.encoder)
        off_dm = datamodule(root, args.workers, False, args.batch_size, cache_dir)
        for dm in (off_dm, on_dm):
            fit_one_epoch(module, dm, device, clock)  # warm-up: first-touch allocations, page cache, worker imports
        for _ in range(args.rounds):
            epochs["off"].append(fit_one_epoch(module, off_dm, device, clock))
            epochs["on"].append(fit_one_epoch(module, on_dm, device, clock))
        off, on = median(epochs["off"]), median(epochs["on"])
        rows.append({"case": f"training epoch, frozen mobilenet_v2 + LSTM, cache off, JPEG decode ({args.workers} workers)",
                     "seconds": off, "per_second": samples / off, "ratio": 1.0})
        rows.append({"case": f"training epoch, frozen mobilenet_v2 + LSTM, cache on ({args.workers} workers)",
                     "seconds": on, "per_second": samples / on, "ratio": off / on})
        feature_shape = list(modules["feature cache, 0 workers"].datasets["train"].source.store.feature_shape)
        for dm in modules.values():
            dm.teardown("fit")
    return {
        "data": {"set": "shapes", "image_size": 64, "train_images": num_train, "train_samples": samples,
                 "images_cached": images, "batch_size": args.batch_size, "feature_shape": feature_shape,
                 "feature_dtype": "float16"},
        "rounds": args.rounds,
        "rows": rows,
        "loader_times": loader_times,
        "epoch_times": epochs,
        "epoch_speedup_cache_on": off / on,
        "cache_build_seconds": build_seconds,
        "break_even_epochs": build_seconds / (off - on) if off > on else None,
        "machine": machine_info(device),
    }


def show(report: dict) -> None:
    rows = [[r["case"], f"{r['seconds']:.3f}", f"{r['per_second']:.0f}",
             f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""] for r in report["rows"]]
    data = report["data"]
    notes = [
        f"{data['train_samples']} training samples ({data['train_images']} images x 5 captions), batch "
        f"{data['batch_size']}; features {data['feature_shape']} {data['feature_dtype']}; median of "
        f"{report['rounds']} rounds; {report['machine']['threads']} torch threads on {report['machine']['device']}.",
        f"Epoch with the feature cache: {report['epoch_speedup_cache_on']:.2f}x faster than encoding every batch; "
        + (f"the {report['cache_build_seconds']:.1f} s build pays for itself after "
           f"{report['break_even_epochs']:.1f} epochs." if report["break_even_epochs"] else "no gain to pay for it."),
        "Loader ratios are against the 0-worker JPEG loader; epoch ratios against the cache-off epoch.",
    ]
    print_table("Data pipeline: samples/s and epoch time, feature cache vs JPEG decoding",
                ["case", "seconds", "samples/s", "ratio"], rows, notes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--root", default=None, help="shapes set folder (default: a temporary one)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers in the epoch comparison")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        sys.exit(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size}, {args.workers}")
    if args.clock == "cpu" and args.workers:
        sys.exit("--clock cpu counts this process' CPU seconds, not its DataLoader workers': use --workers 0 with it")
    device = setup_device(args)
    warnings.filterwarnings("ignore", module="lightning")
    report = run(args, device)
    show(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
