"""Every decoding strategy on the same checkpoints, judged by truth as well as by score.

    python scripts/compare_decoding.py run_a/checkpoints/epoch009-*.ckpt run_b/... run_c/...
    python scripts/compare_decoding.py a.ckpt --split test --strategies greedy beam3 nucleus

Each strategy is one ``src/eval.py`` run per checkpoint (through the entry point, as a user runs it; the fast
metrics only, no Java), and with several checkpoints also one run of all of them as an ensemble
(``'ckpt_path=[a,b,c]'``) and, with ``--average``, of their averaged weights (scripts/average_checkpoints.py).
Rows: BLEU-4, CIDEr-D, the grounded metric where the data has one (object precision, true captions), the share of
distinct captions, for n-best strategies the share of images with a true caption among the list and the distinct
bigrams within a list, and eval.py's wall time, as mean ± spread over the checkpoints; written to
``outputs/compare_decoding/<time>/decoding.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {  # name -> eval.py overrides
    "greedy": ["decoding=greedy"],
    # "most likely": length_penalty=0; the beam default (log p per word) is beam5_power1
    "beam3": ["decoding=beam", "decoding.beam_size=3", "decoding.length_penalty=0"],
    "beam5": ["decoding=beam", "decoding.beam_size=5", "decoding.length_penalty=0"],
    "beam5_power1": ["decoding=beam", "decoding.beam_size=5", "decoding.length_penalty=1.0"],
    "beam3_gnmt": ["decoding=beam", "decoding.beam_size=3", "decoding.length_norm=gnmt", "decoding.length_penalty=1.0"],
    "beam5_gnmt": ["decoding=beam", "decoding.beam_size=5", "decoding.length_norm=gnmt", "decoding.length_penalty=1.0"],
    "diverse2x3": ["decoding=diverse_beam", "decoding.length_penalty=0"],
    "beam6_6best": ["decoding=beam", "decoding.beam_size=6", "decoding.n_best=6", "decoding.length_penalty=0"],
    "diverse2x3_6best": ["decoding=diverse_beam", "decoding.n_best=6", "decoding.length_penalty=0"],
    "nucleus_6best": ["decoding=sample", "decoding.top_p=0.9", "decoding.seed=0", "decoding.n_best=6"],
    "beam3_block3": ["decoding=beam", "decoding.beam_size=3", "decoding.block_ngrams=3", "decoding.length_penalty=0"],
    "greedy_repetition": ["decoding=greedy", "decoding.repetition_penalty=1.2"],
    "nucleus": ["decoding=sample", "decoding.top_p=0.9", "decoding.seed=0"],
    "sample": ["decoding=sample", "decoding.seed=0"],
}
COLUMNS = {  # metrics.json path -> column
    ("fast", "bleu4"): "BLEU-4",
    ("fast", "cider"): "CIDEr-D",
    ("grounding", "precision"): "object precision",
    ("grounding", "correct"): "true captions",
    ("fast", "distinct"): "distinct",
    ("nbest", "any_true"): "n-best: any true",
    ("nbest", "distinct_2"): "n-best: distinct bigrams",
}


def evaluate(ckpt: str, strategy: list[str], split: str, run_dir: Path, extra: list[str]) -> dict:
    command = [sys.executable, str(REPO / "src" / "eval.py"), f"ckpt_path={ckpt}", f"split={split}",
               f"hydra.run.dir={run_dir}", "official=false", *strategy, *extra]
    tic = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {column: (metrics.get(part) or {}).get(key) for (part, key), column in COLUMNS.items()}
    return {**row, "wall_s": round(time.perf_counter() - tic, 1)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for column in [*COLUMNS.values(), "wall_s"]:
        values = [r[column] for r in runs if r.get(column) is not None]
        if values:
            out[column] = statistics.fmean(values)
            out[f"{column} spread"] = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return out


def write_table(rows: list[dict], path: Path, members: int) -> str:
    columns = [c for c in COLUMNS.values() if any(c in r for r in rows)]
    lines = ["| decoding | " + " | ".join(columns) + " | eval s |", "|---|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = []
        for c in columns:
            if row.get(c) is None:
                cells.append("-")
                continue
            spread = row.get(f"{c} spread", 0.0)
            cells.append(f"{row[c]:.3f}" + (f" ± {spread:.3f}" if row["members"] > 1 and spread else ""))
        lines.append(f"| {row['decoding']} | " + " | ".join(cells) + f" | {row['wall_s']:.0f} |")
    note = f"\n(mean ± half the range over {members} checkpoints; ensemble rows: one run of all of them)\n"
    text = "\n".join(lines) + "\n" + (note if members > 1 else "")
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of one data set (e.g. the best of 3 seeds)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--ensemble", nargs="*", default=["greedy", "beam3"], choices=list(STRATEGIES),
                        help="strategies to decode the ensemble of all checkpoints with (with 2 or more)")
    parser.add_argument("--average", action="store_true", help="also their averaged weights, greedy")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--out", type=Path, default=None, help="default outputs/compare_decoding/<time>")
    parser.add_argument("overrides", nargs="*", default=[], help="passed on to src/eval.py (after --)")
    args = parser.parse_args()
    root = args.out or REPO / "outputs" / "compare_decoding" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.strategies:
        runs = [evaluate(ckpt, STRATEGIES[name], args.split, root / f"{name}_{k}", args.overrides)
                for k, ckpt in enumerate(args.checkpoints)]
        rows.append({"decoding": name, "members": len(runs), "runs": runs, **summarise(runs)})
        print(json.dumps(rows[-1]), flush=True)
    if len(args.checkpoints) > 1:
        together = "[" + ",".join(str(Path(c).absolute()) for c in args.checkpoints) + "]"
        for name in args.ensemble:
            run = evaluate(together, STRATEGIES[name], args.split, root / f"ensemble_{name}", args.overrides)
            rows.append({"decoding": f"ensemble of {len(args.checkpoints)}, {name}", "members": 1, "runs": [run], **run})
            print(json.dumps(rows[-1]), flush=True)
        if args.average:
            averaged = root / "averaged.ckpt"
            subprocess.run([sys.executable, str(REPO / "scripts" / "average_checkpoints.py"), *args.checkpoints,
                            "--out", str(averaged)], check=True)
            run = evaluate(str(averaged), STRATEGIES["greedy"], args.split, root / "averaged_greedy", args.overrides)
            rows.append({"decoding": f"weights of {len(args.checkpoints)} averaged, greedy", "members": 1,
                         "runs": [run], **run})
            print(json.dumps(rows[-1]), flush=True)
    (root / "decoding.json").write_text(json.dumps(rows, indent=1))
    print(write_table(rows, root / "decoding.md", len(args.checkpoints)))
    print(f"written to {root}/decoding.{{json,md}}")


if __name__ == "__main__":
    main()
