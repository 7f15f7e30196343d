"""Encoder families at their native size: feature extraction images/s, and the training throughput of the decoder
on each family's cached features, as ratios against torchvision's mobilenet_v2 measured in the same run.

    python benchmarks/bench_encoders.py [--quick] [--json out.json] [--device cuda] [--threads 1] [--batch 8]
                                        [--encoders mobilenet_v2,vit_b_16,...]

- ``extract``: a frozen encoder (random weights: the speed is the architecture's) on a batch of images at the
  size its contract declares (224 for all of these), in inference mode — what building the feature cache costs.
- ``train on cache``: one optimisation step (forward, backward, Adam) of the attention LSTM decoder (W=256,
  H=512, a 1,000-word vocabulary, 16 words) on a batch of 32 of that encoder's features — what a cached run's
  step costs: a ViT-B's 768 x 14 x 14 grid has 4x the positions of mobilenet_v2's 1280 x 7 x 7 map.

timm and open_clip are extras: their rows are left out (and said so) when they are not installed.
Timing is interleaved over rounds, each case's number the median (see common.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

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

from captioning.models import CaptioningRNN

ENCODERS = {
    "mobilenet_v2": ("captioning.models.encoder.TorchvisionEncoder", {"name": "mobilenet_v2", "freeze": True}, None),
    "resnet50": ("captioning.models.encoder.TorchvisionEncoder", {"name": "resnet50", "freeze": True}, None),
    "vit_b_16": ("captioning.models.encoder.TorchvisionEncoder", {"name": "vit_b_16", "freeze": True}, None),
    "swin_t": ("captioning.models.encoder.TorchvisionEncoder", {"name": "swin_t", "freeze": True}, None),
    "timm vit_small_patch16_224": ("captioning.models.hub_encoders.TimmEncoder",
                                   {"name": "vit_small_patch16_224"}, "timm"),
    "timm convnext_tiny": ("captioning.models.hub_encoders.TimmEncoder", {"name": "convnext_tiny"}, "timm"),
    "open_clip ViT-B-32": ("captioning.models.hub_encoders.OpenClipEncoder", {"name": "ViT-B-32"}, "open_clip"),
}
BASELINE = "mobilenet_v2"
NATIVE = 224


def build(name: str):
    import importlib

    target, options, _ = ENCODERS[name]
    module, cls = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**options).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=8, help="images per extraction batch")
    parser.add_argument("--encoders", default=",".join(ENCODERS))
    args = parser.parse_args()
    device = setup_device(args)
    names = [n for n in args.encoders.split(",") if n]
    if unknown := set(names) - set(ENCODERS):
        sys.exit(f"--encoders: {', '.join(sorted(unknown))} not among {', '.join(ENCODERS)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    missing = [n for n in names if ENCODERS[n][2] and importlib.util.find_spec(ENCODERS[n][2]) is None]
    names = [n for n in names if n not in missing]

    torch.manual_seed(0)
    extract, train, shapes = {}, {}, {}
    for name in names:
        encoder = build(name).to(device)
        size = encoder.image_contract.size or NATIVE
        images = torch.randn(args.batch, 3, size, size, device=device)
        with torch.inference_mode():
            features = encoder(images)
        shapes[name] = (size, tuple(features.shape[1:]))

        def extract_case(encoder=encoder, images=images):
            with torch.inference_mode():
                encoder(images)

        cached = features[:1].clone().expand(32, *features.shape[1:]).contiguous().requires_grad_(False)
        decoder = CaptioningRNN(vocab_size=1000, input_dim=features.shape[1], wordvec_dim=256, hidden_dim=512,
                                cell_type="attention").to(device)
        optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
        captions = torch.randint(3, 1000, (32, 17), device=device)
        captions[:, 0] = 1

        def train_case(decoder=decoder, optimizer=optimizer, cached=cached, captions=captions):
            optimizer.zero_grad(set_to_none=True)
            decoder(cached, captions).backward()
            optimizer.step()

        extract[name], train[name] = extract_case, train_case

    clock = clock_of(args)
    extract_times = interleaved_times(extract, device, args.rounds, clock=clock,
                                      progress=lambda m: print(f"extract: {m}", flush=True))
    train_times = interleaved_times(train, device, args.rounds, clock=clock,
                                    progress=lambda m: print(f"train on cache: {m}", flush=True))
    base_extract, base_train = median(extract_times[BASELINE]), median(train_times[BASELINE])
    rows, report = [], {"machine": machine_info(device), "batch": args.batch, "rounds": args.rounds, "results": {}}
    for name in names:
        e, t = median(extract_times[name]), median(train_times[name])
        size, shape = shapes[name]
        rows.append([name, f"{size}", "x".join(map(str, shape)), f"{args.batch / e:,.1f}", f"{base_extract / e:.2f}",
                     f"{32 / t:,.0f}", f"{base_train / t:.2f}"])
        report["results"][name] = {"size": size, "features": list(shape), "extract_images_per_s": args.batch / e,
                                   "extract_ratio": base_extract / e, "train_images_per_s": 32 / t,
                                   "train_ratio": base_train / t}
    notes = [f"ratios: speed against {BASELINE} in this run (>1 faster); random weights, frozen, {device}"]
    if missing:
        notes.append(f"left out (extra not installed): {', '.join(missing)}")
    print_table("Encoders at their native size", ["encoder", "size", "features D x h x w", "extract img/s",
                                                  "x mobilenet_v2", "train on cache img/s", "x mobilenet_v2"],
                rows, notes)
    write_json(args.json, report)


if __name__ == "__main__":
    main()
