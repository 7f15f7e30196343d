"""The default training loop on the built-in set: what the input pipeline and validation cost.

    python benchmarks/bench_loop.py [--quick] [--json out.json] [--steps 100]

All through Lightning with the default config (``conf/train.yaml``: attention LSTM, SmallCNN, batch 64, the
DataModule's own loader settings), in this process:

- ``in memory``: ``--steps`` training steps on batches collated beforehand and held in a list (timed from
  the first batch's start to the last one's end: fit's set-up, the same in every run, is left out), in float32
  and in bf16-mixed (what ``trainer.precision=auto`` runs on a CPU with native bfloat16);
- ``DataModule``: the same number of steps fed by the DataModule's train loader (images decoded, cached or
  read by workers, as configured);
- ``validation``: one validation of the split as fit runs it after an epoch (teacher-forced loss, greedy
  decoding, BLEU / CIDEr-D / grounded metrics), against the epoch's training time (steps x the step time).

Ratios: float32 / bf16-mixed (the speed-up), DataModule / in memory at the shipped precision (the input
pipeline's overhead; target <= 1.15) and validation / epoch (target <= 0.15), each median over ``--rounds``
interleaved rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import machine_info, median, print_table, write_json
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from captioning.utils import native_bf16, resolve_precision

CONF = Path(__file__).resolve().parents[1] / "conf"
TARGET_PIPELINE, TARGET_VALIDATION = 1.15, 0.15


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--steps", type=int, default=None, help="training steps per measurement (default 100)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, --quick 1)")
    parser.add_argument("--data", default=None, help="data root (default: the repository's data/shapes)")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.num_workers=0")
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.quick else 100)
    rounds = args.rounds or (1 if args.quick else 3)
    root = Path(args.data) if args.data else CONF.parent / "data" / "shapes"

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={root}", "data.progress=false", *args.overrides])
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    torch.manual_seed(0)
    module = instantiate(cfg.module, _recursive_=False)
    module._build_decoder(list(datamodule.vocab.idx_to_word))
    loader = datamodule.train_dataloader()
    it = iter(loader)
    batches = [next(it) for _ in range(min(steps, len(loader)))]
    del it

    class InMemory:
        """The collated batches, as one iterable (a plain list would be read as several loaders)."""

        def __iter__(self):
            return iter(batches)

        def __len__(self) -> int:
            return len(batches)

    class StepClock(L.Callback):
        """Seconds from the first training batch's start to the last one's end: the loop, not fit's set-up."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.end = time.perf_counter()

    def trainer(clock: L.Callback | None = None, **kwargs) -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tempfile.mkdtemp(), gradient_clip_val=cfg.trainer.gradient_clip_val,
                         callbacks=[clock] if clock else [], **kwargs)

    shipped = resolve_precision(cfg.trainer.precision, "cpu")  # what train.py runs in here (precision=auto)

    def fit_in_memory(precision: str) -> float:
        clock = StepClock()
        trainer(clock, limit_train_batches=len(batches), limit_val_batches=0,
                precision=precision).fit(module, train_dataloaders=InMemory())
        return clock.end - clock.start

    def fit_datamodule() -> float:
        clock = StepClock()
        trainer(clock, limit_train_batches=len(batches), limit_val_batches=0,
                precision=shipped).fit(module, datamodule=datamodule)
        return clock.end - clock.start

    def validate() -> float:
        tic = time.perf_counter()
        trainer(precision=shipped).validate(module, datamodule=datamodule, verbose=False)
        return time.perf_counter() - tic

    cases = {"in memory, 32-true": lambda: fit_in_memory("32-true"),
             "in memory, bf16-mixed": lambda: fit_in_memory("bf16-mixed"),
             "DataModule": fit_datamodule, "validation": validate}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds + 1):  # the first round warms up (workers, allocator, oneDNN primitives)
        for name, fn in cases.items():
            times[name].append(fn())
    times = {name: values[1:] for name, values in times.items()}
    fp32, bf16 = median(times["in memory, 32-true"]), median(times["in memory, bf16-mixed"])
    in_memory = bf16 if shipped == "bf16-mixed" else fp32
    step = in_memory / len(batches)
    epoch = step * len(loader)
    pipeline = median(times["DataModule"]) / in_memory
    validation = median(times["validation"]) / epoch
    speedup = fp32 / bf16

    def ms(seconds: float) -> str:
        return f"{1000 * seconds / len(batches):.1f}"

    rows = [["in memory, 32-true", f"{fp32:.2f}", ms(fp32), "1.00x", "-"],
            ["in memory, bf16-mixed", f"{bf16:.2f}", ms(bf16), f"{speedup:.2f}x faster",
             "-" if native_bf16("cpu") else "(bf16 emulated here)"],
            [f"DataModule ({shipped})", f"{median(times['DataModule']):.2f}", ms(median(times["DataModule"])),
             f"{pipeline:.2f}x in memory", f"<= {TARGET_PIPELINE}"],
            ["validation", f"{median(times['validation']):.2f}", "-", f"{validation:.0%} of an epoch",
             f"<= {TARGET_VALIDATION:.0%}"]]
    print_table(f"default training loop, {len(batches)} steps of batch {cfg.data.batch_size} ({rounds} rounds; an "
                f"epoch is {len(loader)} steps, {epoch:.1f} s in memory; trainer.precision=auto is {shipped} here)",
                ["case", "s", "ms / step", "ratio", "target"], rows)
    write_json(args.json, {"machine": machine_info(torch.device("cpu")), "steps": len(batches),
                           "epoch_steps": len(loader), "times": times, "precision": shipped,
                           "bf16_speedup": speedup, "pipeline_over_memory": pipeline,
                           "validation_over_epoch": validation,
                           "meets_targets": pipeline <= TARGET_PIPELINE and validation <= TARGET_VALIDATION})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
