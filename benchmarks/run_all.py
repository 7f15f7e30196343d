"""Run every benchmark, one after another: ``python benchmarks/run_all.py [--quick]``.

Each prints its table; the JSON results go to ``outputs/benchmarks/<name>.json``. Extra arguments
(``--quick``, ``--device cuda``...) are passed to the scripts that take them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_core", "bench_decoding", "bench_metrics", "bench_data", "bench_scst", "bench_loop", "bench_export",
           "bench_setup", "bench_encoders")
COMMON = ("bench_core", "bench_decoding", "bench_data", "bench_scst", "bench_export", "bench_encoders")  # the scripts built on benchmarks/common.py


def main(argv: list[str]) -> int:
    out = HERE.parent / "outputs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in SCRIPTS:
        args = list(argv) if name in COMMON else []
        command = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(out / f"{name}.json")]
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(name)
    print(f"\nresults in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
