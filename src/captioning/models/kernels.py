"""The compiled recurrence loops: ``csrc/recurrence.cpp``, the LSTM and attention-LSTM forward and BPTT of
:mod:`captioning.models.bptt` with the per-step loop in C++ (the same ATen ops in the same order).

At the built-in set's sizes a step's ops take microseconds each and the interpreter's per-op cost doubles
them; the loop in C++ removes that. It is built once, at install (``make install`` runs
``python -m captioning.models.kernels``; about 20 s with torch's C++ extension tooling and ninja) into a
folder keyed by the source, torch and Python versions (``~/.cache/captioning/kernels/<key>``, or
``$CAPTIONING_KERNELS_DIR``). A run never compiles: :func:`load` imports the built module if it is there and
otherwise returns None, and bptt.py runs its Python loops (same results). ``CAPTIONING_KERNELS=off`` forces
the Python loops.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["NAME", "build", "build_directory", "load", "for_tensor"]

NAME = "captioning_recurrence"
SOURCE = Path(__file__).with_name("csrc") / "recurrence.cpp"
# -fno-trapping-math (as torch itself is built): without it GCC keeps the gate arithmetic's clamps as branches and
# vectorises the forward cell only where AVX-512 masks can stand in for them (on an AVX2 CPU 6x slower)
CFLAGS = ("-O3", "-march=native", "-fno-trapping-math")
# OpenMP: ATen's parallel_for is header code that runs on the calling thread unless the extension itself is compiled
# with it; the steps' products and cells are shared between the threads through it (torch's own OpenMP runtime, the
# one already loaded, runs them). A compiler without OpenMP (Apple's clang) builds the same loops on one thread.
OPENMP = ("-fopenmp",)
_UNSET = object()
_loaded: object = _UNSET


def build_directory() -> Path:
    """Where the module for this source, torch and Python is (or would be) built."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + OPENMP).encode(), torch.__version__.encode(), sys.version.encode(),
                 _cpu().encode()):
        digest.update(part)
    root = os.environ.get("CAPTIONING_KERNELS_DIR") or Path.home() / ".cache" / "captioning" / "kernels"
    return Path(root) / digest.hexdigest()[:16]


def _cpu() -> str:
    """The processor the module is compiled for (-march=native): its instruction-set flags where Linux lists them,
    so a home folder shared by different machines keeps one build per kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _library(directory: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        path = directory / f"{NAME}{suffix}"
        if path.is_file():
            return path
    return None


def load() -> ModuleType | None:
    """The built module, or None (not built, or ``CAPTIONING_KERNELS=off``). Never compiles."""
    global _loaded
    if _loaded is _UNSET:
        _loaded = None
        path = None if os.environ.get("CAPTIONING_KERNELS", "").lower() in ("off", "0", "false") \
            else _library(build_directory())
        if path is not None:
            try:
                spec = importlib.util.spec_from_file_location(NAME, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _loaded = module
            except (ImportError, OSError) as error:  # e.g. built against other libraries than these
                warnings.warn(
                    f"captioning: the compiled recurrence {path} does not load ({error}); training goes on with the "
                    f"Python loops. Delete {path.parent} and run `python -m captioning.models.kernels` to build it "
                    "again for this torch.", RuntimeWarning, stacklevel=2)
    return _loaded  # type: ignore[return-value]


def for_tensor(t: torch.Tensor) -> ModuleType | None:
    """The module where it pays: CPU tensors (on a GPU the Python loop only queues kernels)."""
    return load() if t.device.type == "cpu" else None


def build(verbose: bool = False) -> Path:
    """Compile the module into :func:`build_directory` (torch.utils.cpp_extension; needs a C++ compiler and ninja)."""
    import logging

    # its import warns that no CUDA runtime is found on CPU machines: irrelevant to a CPU-only module
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load as compile_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        compile_extension(NAME, [str(SOURCE)], build_directory=str(directory), extra_cflags=list(CFLAGS + OPENMP),
                          extra_ldflags=list(OPENMP), verbose=verbose)
    except Exception:  # noqa: BLE001 - e.g. no OpenMP in this compiler: the loops on one thread are still worth it
        compile_extension(NAME, [str(SOURCE)], build_directory=str(directory), extra_cflags=list(CFLAGS),
                          verbose=verbose)
    global _loaded
    _loaded = _UNSET
    path = _library(directory)
    if path is None:
        raise RuntimeError(f"building {SOURCE} left no {NAME} module in {directory}.")
    return path


def main(argv: list[str]) -> int:
    tic = time.perf_counter()
    try:
        path = build(verbose="-v" in argv)
    except Exception as error:  # noqa: BLE001 - any failure means: run on the Python loops, and say why
        print(f"captioning: could not build the compiled recurrence ({SOURCE.name}): {error}\n"
              "Training works without it (the same math in Python loops, slower at small sizes); to build it "
              "later, install a C++ compiler and `pip install ninja`, then run `python -m captioning.models.kernels`.",
              file=sys.stderr)
        return 1
    print(f"captioning: the compiled recurrence is ready ({time.perf_counter() - tic:.0f} s): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
