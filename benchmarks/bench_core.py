"""The captioner's training step and its recurrent core: tokens/s against torch.nn and the matmul peak.

    python benchmarks/bench_core.py [--quick] [--json out.json] [--device cuda] [--threads 1]
                                    [--sizes large,small] [--profile lstm-manual] [--autocast bf16]

Cases, per size (interleaved, median over rounds; see common.py):

- ``step``: one training step of ``CaptioningRNN`` (forward + backward of its loss on given features and
  captions) for cell rnn / lstm / attention x backward autograd / manual, and the same model built on
  ``torch.nn.RNN`` / ``torch.nn.LSTM`` (oneDNN on CPU, cuDNN on GPU): ``nn.Linear`` h0 projection,
  ``nn.Embedding``, ``nn.LSTM(batch_first=True)``, ``nn.Linear`` vocabulary projection and
  ``F.cross_entropy(ignore_index=<NULL>, reduction="sum") / N`` (the same loss). Attention has no torch.nn
  twin; its ratio is against the nn LSTM step, which does less work.
- ``core``: the recurrence alone, ``h = core(x, h0)`` and ``(h * g).sum().backward()``, against the nn
  layer: isolates the hand-written core from the captioner's fused vocabulary loss.
- ``core ..., python loops``: the manual core with bptt.py's Python loops, beside the compiled ones
  (captioning.models.kernels) where those are built: what the compiled loop buys.

Sizes: ``large`` (COCO-like), ``default`` (the built-in set's default model: N=64, T=12, W=128, H=256),
``small`` (N=32, H=128).

Captions fill all T positions (no ``<NULL>``), so every position is projected on both sides and the FLOP
count is exact. FLOPs are the matmuls', counted analytically (element-wise work is not counted), with
G = 1 (rnn) or 4 (lstm, attention) gates and P spatial positions of the attention feature map::

    forward per token      2 * (W*G*H + H*G*H + H*V)      (+ 2 * (H*G*H + 2*H*P) for attention)
    backward per token     2 x forward (a gradient for each matmul operand)
    h0 projection          2 * N*D*H (x P for attention's 1x1 conv) forward + the same for its weight gradient
    step = 3 x (forward per token) * N*T + 2 x (h0 projection)        core = 3 x 2 * N*T * (W*G*H + H*G*H)

"fraction of peak" = FLOPs / median time / the FLOP/s of torch's float32 2048^3 matmul measured in the
same rounds. ``--autocast bf16`` runs every case under bfloat16 autocast (what ``trainer.precision=bf16-mixed``
gives the model, and ``precision=auto`` picks on a CPU with native bfloat16); the peak is then a bfloat16 matmul's.
Memory: the peak while one step runs (process RSS on CPU, max_memory_allocated on GPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import (
    add_common_arguments,
    clock_of,
    interleaved_times,
    machine_info,
    matmul_peak_case,
    median,
    peak_memory,
    print_table,
    setup_device,
    write_json,
)
from torch import Tensor, nn
from torch.nn import functional as F

from captioning.models import CaptioningRNN, kernels

SIZES = {  # N, T, W, H, V, D (feature channels), feature map side for attention
    "large": {"N": 128, "T": 16, "W": 256, "H": 512, "V": 10000, "D": 512, "side": 7},
    "small": {"N": 32, "T": 12, "W": 64, "H": 128, "V": 1000, "D": 128, "side": 4},
    # the project's default model on the built-in set (conf/model/attention.yaml, batch 64, 64 px SmallCNN)
    "default": {"N": 64, "T": 12, "W": 128, "H": 256, "V": 50, "D": 256, "side": 4},
}
CELLS = ("rnn", "lstm", "attention")
BACKWARDS = ("autograd", "manual")
NULL, START = 0, 1
TARGET_RATIO, TARGET_PEAK, TARGET_GPU_RATIO = 1.0, 0.8, 1 / 1.5


class NNCaptioner(nn.Module):
    """CaptioningRNN's model on torch.nn's recurrent layer: the baseline."""

    def __init__(self, cell: str, V: int, D: int, W: int, H: int) -> None:
        super().__init__()
        self.cell = cell
        self.feature_proj = nn.Linear(D, H)
        self.embed = nn.Embedding(V, W)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.RNN)(W, H, batch_first=True)
        self.vocab_proj = nn.Linear(H, V)

    def forward(self, features: Tensor, captions: Tensor) -> Tensor:
        captions_in, captions_out = captions[:, :-1], captions[:, 1:]
        h0 = self.feature_proj(features).unsqueeze(0)
        state = (h0, torch.zeros_like(h0)) if self.cell == "lstm" else h0
        h, _ = self.rnn(self.embed(captions_in), state)
        scores = self.vocab_proj(h)
        loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), captions_out.reshape(-1),
                               ignore_index=NULL, reduction="sum")
        return loss / captions.shape[0]


def step_flops(cell: str, s: dict) -> float:
    N, T, W, H, V, D = (s[k] for k in "NTWHVD")
    G, P = (1 if cell == "rnn" else 4), s["side"] ** 2
    per_token = 2 * (W * G * H + H * G * H + H * V)
    if cell == "attention":
        per_token += 2 * (H * G * H + 2 * H * P)
    proj = 2 * N * D * H * (P if cell == "attention" else 1)
    return 3.0 * per_token * N * T + 2.0 * proj


def core_flops(cell: str, s: dict) -> float:
    N, T, W, H = (s[k] for k in "NTWH")
    G, P = (1 if cell == "rnn" else 4), s["side"] ** 2
    per_token = 2 * (W * G * H + H * G * H) + (2 * (H * G * H + 2 * H * P) if cell == "attention" else 0)
    return 3.0 * per_token * N * T


def build_cases(size: str, device: torch.device, cells: tuple[str, ...]) -> dict:
    """{case name: (callable doing one training step, flops, baseline case name, kind)}."""
    s = SIZES[size]
    N, T, W, H, V, D, side = (s[k] for k in ("N", "T", "W", "H", "V", "D", "side"))
    g = torch.Generator().manual_seed(0)
    captions = torch.randint(3, V, (N, T + 1), generator=g)
    captions[:, 0] = START
    captions = captions.to(device)
    pooled = torch.randn(N, D, generator=g).to(device)
    fmap = torch.randn(N, D, side, side, generator=g).to(device)
    x = torch.randn(N, T, W, generator=g).to(device).requires_grad_(True)
    h0 = torch.randn(N, H, generator=g).to(device).requires_grad_(True)
    A = torch.randn(N, H, side, side, generator=g).to(device).requires_grad_(True)
    upstream = torch.randn(N, T, H, generator=g).to(device)

    def training_step(model: nn.Module, features: Tensor):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(features, captions).backward()
        return run

    def core_step(layer: nn.Module, state, python_loops: bool = False):
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            compiled = kernels.load()
            if python_loops:  # the manual BPTT's Python loops, as where the compiled ones are not built
                kernels._loaded = None
            try:
                out = layer(x, state)
                h = out[0] if isinstance(out, tuple) else out
                (h * upstream).sum().backward()
            finally:
                kernels._loaded = compiled
        return run

    cases = {}
    for cell in ("rnn", "lstm"):
        if cell in cells or ("attention" in cells and cell == "lstm"):
            model = NNCaptioner(cell, V, D, W, H).to(device)
            cases[f"step nn-{cell}"] = (training_step(model, pooled), step_flops(cell, s), None, cell)
            state = (h0.unsqueeze(0), torch.zeros_like(h0).unsqueeze(0)) if cell == "lstm" else h0.unsqueeze(0)
            cases[f"core nn-{cell}"] = (core_step(model.rnn, state), core_flops(cell, s), None, cell)
    for cell in cells:
        baseline = "nn-rnn" if cell == "rnn" else "nn-lstm"
        for backward in BACKWARDS:
            torch.manual_seed(0)
            model = CaptioningRNN(V, D, W, H, cell_type=cell, backward=backward).to(device)
            features = fmap if cell == "attention" else pooled
            name = f"{cell}-{backward}"
            cases[f"step {name}"] = (training_step(model, features), step_flops(cell, s), f"step {baseline}", cell)
            cases[f"core {name}"] = (core_step(model.core, A if cell == "attention" else h0), core_flops(cell, s),
                                     f"core {baseline}", cell)
            if backward == "manual" and cell != "rnn" and kernels.for_tensor(x) is not None:
                cases[f"core {name}, python loops"] = (
                    core_step(model.core, A if cell == "attention" else h0, python_loops=True), core_flops(cell, s),
                    f"core {baseline}", cell)
    return cases


def under_autocast(fn, device: torch.device):
    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            fn()
    return run


def run_size(size: str, device: torch.device, rounds: int, cells: tuple[str, ...], clock=time.perf_counter,
             autocast: str = "none") -> dict:
    cases = build_cases(size, device, cells)
    if autocast == "bf16":
        cases = {name: (under_autocast(fn, device), *rest) for name, (fn, *rest) in cases.items()}
    memory = {name: peak_memory(fn, device) for name, (fn, *_) in cases.items()}
    peak_fn, peak_work = matmul_peak_case(device, dtype=torch.bfloat16 if autocast == "bf16" else torch.float32)
    timed = {name: fn for name, (fn, *_) in cases.items()}
    timed["matmul peak"] = peak_fn
    times = interleaved_times(timed, device, rounds, clock=clock,
                              progress=lambda m: print(f"  [{size}] {m}", file=sys.stderr))
    peak = peak_work / median(times.pop("matmul peak"))
    s = SIZES[size]
    tokens = s["N"] * s["T"]
    rows = []
    for name, (_, flops, baseline, cell) in cases.items():
        seconds = median(times[name])
        row = {"case": name, "seconds": seconds, "all_seconds": times[name], "tokens_per_s": tokens / seconds,
               "flops": flops, "fraction_of_peak": flops / seconds / peak, **memory[name]}
        if baseline:
            row["baseline"] = baseline
            row["speedup_vs_nn"] = median(times[baseline]) / seconds
            if cell == "attention":
                row["note"] = "vs nn LSTM, which does less work (no attention)"
        rows.append(row)
    return {"size": size, "dims": s, "matmul_peak_flops": peak, "autocast": autocast, "rows": rows}


def print_report(report: dict) -> None:
    device = report["machine"]["device"]
    for result in report["results"]:
        s = result["dims"]
        rows = []
        for r in result["rows"]:
            rows.append([
                r["case"], f"{r['seconds'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}",
                f"{r['speedup_vs_nn']:.2f}x" if "speedup_vs_nn" in r else "-",
                f"{r['fraction_of_peak']:.0%}", f"{r['peak_mib']:.0f}", f"{r['increase_mib']:.0f}",
            ])
        dims = ", ".join(f"{k}={v}" for k, v in s.items())
        print_table(
            f"{result['size']} ({dims}) on {device}, {report['machine']['threads']} threads, {report['clock']} clock, "
            + ("bf16 autocast, bfloat16 " if result.get("autocast") == "bf16" else "")
            + f"matmul peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s",
            ["case", "ms", "tokens/s", "vs nn", "of peak", "peak MiB", "+MiB"], rows,
            ["'vs nn': nn time / our time (> 1 = faster); attention is compared with the nn LSTM (less work). "
             "'+MiB': memory taken by one step over what was held before it."],
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", default="large,default,small",
                        help="comma-separated: large, default (the built-in set's model), small (default all)")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells (default rnn,lstm,attention)")
    parser.add_argument("--profile", default=None, metavar="CASE",
                        help="instead of the table, profile one step case (e.g. lstm-manual, nn-lstm) at the first "
                             "size with torch.profiler and print the busiest ops")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="bf16: every case under bfloat16 autocast, as bf16-mixed training runs them (default none)")
    args = parser.parse_args(argv)
    device = setup_device(args)
    sizes = [name.strip() for name in args.sizes.split(",") if name.strip()]
    cells = tuple(name.strip() for name in args.cells.split(",") if name.strip())
    for name in sizes:
        if name not in SIZES:
            parser.error(f"--sizes: unknown size {name!r}; choose from {', '.join(SIZES)}")
    for name in cells:
        if name not in CELLS:
            parser.error(f"--cells: unknown cell {name!r}; choose from {', '.join(CELLS)}")
    if args.profile:
        return profile_case(args.profile, sizes[0], device, cells)
    report = {"benchmark": "core", "machine": machine_info(device), "rounds": args.rounds,
              "clock": args.clock, "results": [run_size(size, device, args.rounds, cells, clock_of(args), args.autocast)
                          for size in sizes]}
    report["targets"] = {"speedup_vs_nn": TARGET_GPU_RATIO if device.type == "cuda" else TARGET_RATIO,
                         "fraction_of_peak": TARGET_PEAK}
    print_report(report)
    write_json(args.json, report)
    return report


def profile_case(case: str, size: str, device: torch.device, cells: tuple[str, ...]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cases = build_cases(size, device, cells)
    name = f"step {case}"
    if name not in cases:
        sys.exit(f"--profile: unknown case {case!r}; choose from "
                 f"{', '.join(n.removeprefix('step ') for n in cases if n.startswith('step '))}")
    fn = cases[name][0]
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            fn()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))
    return {}


if __name__ == "__main__":
    main()
