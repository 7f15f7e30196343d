"""Shared benchmark helpers: device set-up, interleaved timing, matmul peak, peak memory, table and JSON.

Timing is interleaved: every round runs every case once (and the matmul peak once), and each case's
number is the median over rounds. On a shared machine the speed drifts by tens of percent within
minutes; interleaving makes that drift hit all cases alike, so the ratios in one run are meaningful
even when the absolute numbers are not.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "add_common_arguments",
    "setup_device",
    "synchronize",
    "clock_of",
    "time_once",
    "interleaved_times",
    "matmul_peak_case",
    "peak_memory",
    "machine_info",
    "print_table",
    "write_json",
]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run; noisier numbers)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 5, --quick 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a shared machine "
                             "--threads 1 gives steadier numbers: 2 threads on 2 busy cores wait on each other")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds (default). cpu: the process' CPU seconds (CPU only) - on a "
                             "busy machine with --threads 1 this counts the work, not the time spent descheduled")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def setup_device(args: argparse.Namespace) -> torch.device:
    """Validate --device/--threads/--rounds, set threads; returns the device. Exits with a message on bad input."""
    if args.threads is not None:
        if args.threads < 1:
            sys.exit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.rounds < 1:
        sys.exit(f"--rounds must be >= 1, got {args.rounds}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        sys.exit(f"--device {args.device!r} is not a torch device ({err}); use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda asked for, but torch sees no CUDA device; run with --device cpu")
        # Compare like with like: cuDNN would otherwise use TF32 while our float32 matmuls do not.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif device.type != "cpu":
        sys.exit(f"--device {args.device!r}: only cpu and cuda are supported")
    if args.clock == "cpu" and device.type != "cpu":
        sys.exit("--clock cpu measures CPU seconds and only makes sense with --device cpu")
    return device


def clock_of(args: argparse.Namespace) -> Callable[[], float]:
    """The timer --clock names: elapsed seconds, or the process' CPU seconds."""
    return time.process_time if args.clock == "cpu" else time.perf_counter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds for one call of fn by clock, the device's queue drained before and after."""
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def interleaved_times(
    cases: dict[str, Callable[[], object]], device: torch.device, rounds: int, warmup: int = 1,
    progress: Callable[[str], None] | None = None, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of every case, measured round-robin: {name: [seconds per round]}."""
    for name, fn in cases.items():
        for _ in range(warmup):
            fn()
        if progress:
            progress(f"warmed up {name}")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            times[name].append(time_once(fn, device, clock))
        if progress:
            progress(f"round {r + 1}/{rounds} done")
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_peak_case(device: torch.device, n: int = 2048, reps: int = 3,
                     dtype: torch.dtype = torch.float32) -> tuple[Callable[[], None], float]:
    """A case doing ``reps`` (n x n) @ (n x n) products in ``dtype`` (float32; bfloat16 for the cores under bf16
    autocast), and the FLOPs it does (2 n^3 each).

    Its FLOP/s is "the machine's matmul peak" in that dtype: what the faster of torch's own matmul (its BLAS) and
    oneDNN's (which torch.nn.LSTM and the hand-written core use on CPU, :mod:`captioning.models.gemm`)
    reaches on a large square product, on this machine, now. On some CPUs the two differ by 2x.
    """
    from captioning.models import gemm

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    candidates = {"torch.mm": lambda: torch.mm(a, b, out=out), "oneDNN": lambda: gemm.mm(a, b)}
    seconds = {}
    for name, fn in candidates.items():
        fn()
        seconds[name] = min(time_once(fn, device) for _ in range(3))
    fastest = candidates[min(seconds, key=seconds.get)]

    def run() -> None:
        for _ in range(reps):
            fastest()

    return run, 2.0 * n**3 * reps


# --- memory ------------------------------------------------------------------------------------------
def _read_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the RSS before a case counts only live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Run fn once; the peak memory it took, in MiB.

    cuda: ``torch.cuda.max_memory_allocated`` during the call, and its increase over the memory allocated
    before it. cpu: the process' peak RSS during the call (``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``) and its increase over the RSS before it; where that is unavailable, the
    process' lifetime peak RSS (``ru_maxrss``) and no increase.
    """
    mib = 1024.0**2
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": peak / mib, "increase_mib": (peak - before) / mib, "kind": "cuda max_memory_allocated"}
    _trim_heap()
    before = _read_status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        resettable = before is not None
    except OSError:
        resettable = False
    fn()
    if resettable:
        peak = _read_status_kib("VmHWM")
        if peak is not None:
            return {"peak_mib": peak / 1024, "increase_mib": (peak - before) / 1024, "kind": "process RSS"}
    import resource

    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "increase_mib": float("nan"),
            "kind": "process lifetime peak RSS"}


# --- reporting ---------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def print_table(title: str, columns: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for k, column in enumerate(columns):
        table.add_column(column, justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(width=max(120, Console().width))
    console.print(table)
    for note in notes:
        console.print(note)


def write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
