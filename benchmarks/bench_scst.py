"""Self-critical training step vs the cross-entropy step: time, peak memory, and where the SCST step goes.

    python benchmarks/bench_scst.py [--quick] [--json out.json] [--threads 1] [--cell attention]

One training step of the default captioner (SmallCNN + attention LSTM at the built-in set's size: batch 64,
64 px images, 5 references per image drawn from a 43-word language) with ``objective=xe`` and with
``objective=scst`` at K = 1 and K = 5 samples per image (greedy baseline), forward + backward + AdamW.
Interleaved, median over rounds (see common.py). Printed as ratios to the cross-entropy step, with the
share of the SCST step spent sampling/greedy-decoding and computing the CIDEr-D reward.

SCST fine-tunes a cross-entropy model, so the model is first trained ``--warmup-steps`` cross-entropy steps on
the references (random images: it learns the language, so its samples end as a trained captioner's do); a
random model rarely emits ``<END>`` and every sample runs all 16 steps (``--warmup-steps 0`` measures that).
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from common import (
    add_common_arguments,
    clock_of,
    interleaved_times,
    machine_info,
    median,
    peak_memory,
    print_table,
    setup_device,
    write_json,
)

from captioning.data.vocab import Vocabulary
from captioning.models import CaptioningRNN
from captioning.models.encoder import SmallCNN
from captioning.objectives import CrossEntropy, SelfCritical

COLORS, SHAPES = ["red", "green", "blue", "yellow", "white"], ["circle", "square", "triangle", "star"]
BATCH, IMAGES = 64, 512


def references(rng: random.Random) -> dict[int, list[str]]:
    """Captions in the built-in set's language, 5 per image."""
    refs = {}
    for i in range(IMAGES):
        c, s = rng.choice(COLORS), rng.choice(SHAPES)
        refs[i] = [f"a {rng.choice(['small', 'large'])} {c} {s} {rng.choice(['on the left', 'at the top'])}",
                   f"there is a {c} {s}", f"one {c} {s}", f"a single {c} {s}", f"the image shows a {c} {s}"]
    return refs


def warm_up(encoder: SmallCNN, decoder: CaptioningRNN, vocab: Vocabulary, refs: dict[int, list[str]], steps: int,
            device: torch.device, rng: random.Random) -> None:
    """Cross-entropy steps on random batches of the references (any of an image's five)."""
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    images = torch.randn(IMAGES, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(device)
    for _ in range(steps):
        ids = rng.sample(range(IMAGES), BATCH)
        captions = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(vocab.encode(rng.choice(refs[i]), 16)) for i in ids], batch_first=True).to(device)
        optimizer.zero_grad(set_to_none=True)
        decoder(encoder(images[ids]), captions).backward()
        optimizer.step()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--cell", default="attention", choices=("rnn", "lstm", "attention"))
    parser.add_argument("--warmup-steps", type=int, default=150,
                        help="cross-entropy steps before measuring (0: a random model)")
    args = parser.parse_args(argv)
    device = setup_device(args)
    rng = random.Random(0)
    refs = references(rng)
    vocab = Vocabulary.build(c for captions in refs.values() for c in captions)
    torch.manual_seed(0)
    encoder = SmallCNN().to(device)
    decoder = CaptioningRNN(len(vocab), encoder.out_dim, 128, 256, cell_type=args.cell,
                            image_input=args.cell != "attention", feature_pool="max").to(device)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=1e-5)
    image_ids = torch.tensor(rng.sample(range(IMAGES), BATCH))
    captions = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(vocab.encode(refs[int(i)][0], 16)) for i in image_ids], batch_first=True).to(device)
    batch = {"images": torch.randn(BATCH, 3, 64, 64, device=device), "captions": captions, "image_ids": image_ids}
    warm_up(encoder, decoder, vocab, refs, args.warmup_steps, device, rng)

    objectives = {"cross-entropy": CrossEntropy()}
    # the paper's greedy baseline at K = 1 and 5, and the shipped default (conf/objective/scst.yaml): K = 5 with
    # the mean of the other samples as the baseline (no greedy rows to decode)
    for name, k, baseline in (("scst K=1", 1, "greedy"), ("scst K=5", 5, "greedy"), ("scst K=5, mean", 5, "mean")):
        scst = SelfCritical(num_samples=k, baseline=baseline, max_length=16)
        scst.use_references(refs, vocab)
        objectives[name] = scst
    shares: dict[str, list[tuple[float, float]]] = {name: [] for name in objectives}
    lengths: dict[str, list[float]] = {name: [] for name in objectives}

    def step(name: str):
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, logs = objectives[name](decoder, encoder(batch["images"]), batch)
            loss.backward()
            optimizer.step()
            if "scst/decode_seconds" in logs:
                shares[name].append((float(logs["scst/decode_seconds"]), float(logs["scst/reward_seconds"])))
                lengths[name].append(float(logs["scst/sample_length"]))
        return run

    cases = {name: step(name) for name in objectives}
    memory = {name: peak_memory(fn, device) for name, fn in cases.items()}
    times = interleaved_times(cases, device, args.rounds, clock=clock_of(args))
    base = median(times["cross-entropy"])
    rows, results = [], []
    for name in objectives:
        seconds = median(times[name])
        decode = median([d for d, _ in shares[name]]) if shares[name] else 0.0
        reward = median([r for _, r in shares[name]]) if shares[name] else 0.0
        length = median(lengths[name]) if lengths[name] else float("nan")
        result = {"case": name, "ms": 1000 * seconds, "time_over_xe": seconds / base,
                  "decode_share": decode / seconds, "reward_share": reward / seconds, "sample_length": length,
                  **memory[name]}
        results.append(result)
        rows.append([name, f"{1000 * seconds:.0f}", f"{seconds / base:.2f}x", f"{result['decode_share']:.0%}",
                     f"{result['reward_share']:.0%}", "" if not lengths[name] else f"{length:.1f}",
                     f"{memory[name]['increase_mib']:.0f}"])
    print_table(f"training step, {args.cell}, batch {BATCH}, 64 px, after {args.warmup_steps} cross-entropy steps "
                f"({args.rounds} rounds)",
                ["objective", "ms", "time / xe", "sampling + greedy", "reward (CIDEr-D)", "sample words", "+MiB peak"],
                rows,
                ["SCST time includes sampling K captions per image, the greedy baseline, the reward and the "
                 "teacher-forced policy loss over the N*K samples."])
    write_json(args.json, {"machine": machine_info(device), "cell": args.cell, "batch": BATCH,
                           "warmup_steps": args.warmup_steps, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
