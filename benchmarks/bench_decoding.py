"""Batched decoding speed: captions/s of every strategy against greedy, and beam search's cost over greedy.

    python benchmarks/bench_decoding.py [--quick] [--json out.json] [--device cuda] [--threads 1]
                                        [--batch 256] [--max-length 16]

A randomly initialised ``CaptioningRNN`` (lstm and attention; W=256, H=512, V=10000, D=512 features,
a 7x7 map for attention) decodes a batch of random features. A random model rarely emits ``<END>``, so
every method runs all ``max_length`` steps: the comparison is at equal length, which is the fair one
(each row reports the mean caption length to show it). ``greedy`` is ``greedy_decode`` (log-probabilities
summed as it decodes, as evaluation uses it). The anchors' strategies run beside it: diverse beam search (2
groups x 3), beam 3 with trigram blocking, n-best lists, nucleus sampling, the repetition penalty, and an ensemble
of two models (greedy). Target: beam 3 <= 3.5x the greedy time.
"""

from __future__ import annotations

import argparse

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

from captioning.models import CaptioningRNN
from captioning.models.decoding import Ensemble, StepRules, beam_search, greedy_decode, sample_decode

DIMS = {"W": 256, "H": 512, "V": 10000, "D": 512, "side": 7}
TARGET_BEAM3_OVER_GREEDY = 3.5


def run_cell(cell: str, batch: int, max_length: int, device: torch.device, rounds: int, clock) -> dict:
    torch.manual_seed(0)
    model = CaptioningRNN(DIMS["V"], DIMS["D"], DIMS["W"], DIMS["H"], cell_type=cell).to(device).eval()
    shape = (batch, DIMS["D"], DIMS["side"], DIMS["side"]) if cell == "attention" else (batch, DIMS["D"])
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(1)
    second = CaptioningRNN(DIMS["V"], DIMS["D"], DIMS["W"], DIMS["H"], cell_type=cell).to(device).eval()
    same = torch.nn.Identity()  # both members read the features as given: the ensemble's own cost only
    pair = Ensemble([same, same], [model, second])
    trigrams = StepRules(block_ngrams=3, end_id=model.end_id)
    repeats = StepRules(repetition_penalty=1.2, end_id=model.end_id)
    methods = {
        "greedy": lambda: greedy_decode(model, features, max_length).captions,
        "beam 3": lambda: beam_search(model, features, beam_size=3, max_length=max_length).captions,
        "beam 5": lambda: beam_search(model, features, beam_size=5, max_length=max_length).captions,
        "diverse 2x3": lambda: beam_search(model, features, beam_size=6, max_length=max_length, groups=2,
                                           diversity=0.5).captions,
        "beam 3, block trigrams": lambda: beam_search(model, features, beam_size=3, max_length=max_length,
                                                      rules=trigrams).captions,
        "beam 5, 5-best": lambda: beam_search(model, features, beam_size=5, max_length=max_length,
                                              n_best=5).captions,
        "greedy, repetition 1.2": lambda: greedy_decode(model, features, max_length, repeats).captions,
        "nucleus 0.9": lambda: sample_decode(model, features, max_length, top_p=0.9).captions,
        "nucleus 0.9, 5 samples": lambda: sample_decode(model, features, max_length, top_p=0.9, n_best=5).captions,
        "ensemble of 2, greedy": lambda: greedy_decode(pair, features, max_length).captions,
    }
    # decoded under inference_mode as the entry points do, by models made outside it as they load them
    with torch.inference_mode():
        lengths = {name: float(fn().ne(model.null_id).sum(dim=1).float().mean()) for name, fn in methods.items()}
        memory = {name: peak_memory(fn, device) for name, fn in methods.items()}
        times = interleaved_times(methods, device, rounds, clock=clock)
    greedy = median(times["greedy"])
    rows = []
    for name in methods:
        seconds = median(times[name])
        rows.append({"method": name, "seconds": seconds, "all_seconds": times[name], "captions_per_s": batch / seconds,
                     "time_over_greedy": seconds / greedy, "mean_length": lengths[name], **memory[name]})
    return {"cell": cell, "rows": rows,
            "beam3_over_greedy": median(times["beam 3"]) / greedy,
            "meets_target": median(times["beam 3"]) / greedy <= TARGET_BEAM3_OVER_GREEDY}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--max-length", type=int, default=16, help="words per caption (default 16)")
    parser.add_argument("--cells", default="lstm,attention", help="comma-separated cells (default lstm,attention)")
    args = parser.parse_args(argv)
    device = setup_device(args)
    if args.batch < 1 or args.max_length < 1:
        parser.error(f"--batch and --max-length must be positive, got {args.batch} and {args.max_length}")
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for cell in cells:
        if cell not in ("rnn", "lstm", "attention"):
            parser.error(f"--cells: unknown cell {cell!r}; choose from rnn, lstm, attention")
    results = [run_cell(cell, args.batch, args.max_length, device, args.rounds, clock_of(args)) for cell in cells]
    report = {"benchmark": "decoding", "machine": machine_info(device), "rounds": args.rounds, "clock": args.clock,
              "batch": args.batch,
              "max_length": args.max_length, "dims": DIMS, "target_beam3_over_greedy": TARGET_BEAM3_OVER_GREEDY,
              "results": results}
    for result in results:
        rows = [[r["method"], f"{r['seconds'] * 1e3:.0f}", f"{r['captions_per_s']:,.0f}",
                 f"{r['time_over_greedy']:.2f}x", f"{r['mean_length']:.1f}", f"{r['peak_mib']:.0f}",
                 f"{r['increase_mib']:.0f}"] for r in result["rows"]]
        verdict = "meets" if result["meets_target"] else "MISSES"
        print_table(
            f"decoding {result['cell']}, batch {args.batch}, max_length {args.max_length} on {device}, "
            f"{report['machine']['threads']} threads, {args.clock} clock",
            ["method", "ms", "captions/s", "time / greedy", "mean length", "peak MiB", "+MiB"], rows,
            [f"beam 3 / greedy time = {result['beam3_over_greedy']:.2f}x ({verdict} the <= "
             f"{TARGET_BEAM3_OVER_GREEDY}x target). A random model rarely ends a caption, so every method runs "
             "all max_length steps (see 'mean length'): equal lengths, a fair comparison."],
        )
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
