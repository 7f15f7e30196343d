"""Captions/s of the exported greedy loop (ONNX Runtime, TorchScript) against the PyTorch model's, on CPU.

    python benchmarks/bench_export.py [--quick] [--json out.json] [--batch 64] [--cell attention]

The default captioner's architecture (SmallCNN + attention LSTM, W=128, H=256, a 43-word vocabulary, 64 px
images), randomly initialised and exported with captioning.export; each case captions the same batch of
images (encoder + greedy decoding for 16 steps: the random model never ends early), interleaved, median over
rounds. The exported loop is NumPy around one graph call per step (captioning/runtime.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings

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

from captioning.export import export_captioner, load_exported
from captioning.models.decoding import greedy_decode
from captioning.module import CaptioningModule

WORDS = ["<NULL>", "<START>", "<END>", "<UNK>", *[f"w{k}" for k in range(39)]]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cell", default="attention", choices=("rnn", "lstm", "attention"))
    args = parser.parse_args(argv)
    device = setup_device(args)
    torch.manual_seed(0)
    module = CaptioningModule(
        encoder={"_target_": "captioning.models.encoder.SmallCNN"},
        decoder={"_target_": "captioning.models.CaptioningRNN", "cell_type": args.cell, "wordvec_dim": 128,
                 "hidden_dim": 256, "image_input": args.cell != "attention", "feature_pool": "max"},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True}, vocab=WORDS,
        decoding={"_target_": "captioning.models.decoding.CaptionDecoder", "strategy": "greedy", "max_length": 16},
    ).eval()
    images = torch.randn(args.batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in ("onnx", "torchscript"):
            folders[fmt] = export_captioner(module, 64, tempfile.mkdtemp(prefix=f"export-{fmt}-"), fmt)
        exported = {fmt: load_exported(folder) for fmt, folder in folders.items()}
    array = images.numpy()

    def pytorch() -> None:
        with torch.inference_mode():
            greedy_decode(module.decoder, module.encoder(images), 16)

    cases = {"PyTorch (greedy_decode)": pytorch,
             "ONNX Runtime (run.py)": lambda: exported["onnx"].greedy(array, 16),
             "TorchScript (run.py)": lambda: exported["torchscript"].greedy(array, 16)}
    times = interleaved_times(cases, device, args.rounds, clock=clock_of(args))
    base = median(times["PyTorch (greedy_decode)"])
    rows, results = [], []
    for name in cases:
        seconds = median(times[name])
        results.append({"case": name, "seconds": seconds, "captions_per_s": args.batch / seconds,
                        "speed_over_pytorch": base / seconds})
        rows.append([name, f"{1000 * seconds:.1f}", f"{args.batch / seconds:,.0f}", f"{base / seconds:.2f}x"])
    print_table(f"greedy captions of {args.batch} images, {args.cell}, 16 steps ({args.rounds} rounds, "
                f"{torch.get_num_threads()} threads)", ["decoder", "ms", "captions/s", "speed vs PyTorch"], rows)
    write_json(args.json, {"machine": machine_info(device), "batch": args.batch, "cell": args.cell, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
