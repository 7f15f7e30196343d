"""Learning curve: grounded quality against the number of training images of the built-in set.

    python scripts/learning_curve.py                                  # 250, 500, 1000, 2000, 4000 images
    python scripts/learning_curve.py --sizes 500 1000 --budget epochs model=lstm data.holdout=pairs

Each size is one ``src/train.py`` run (through the entry point, as a user runs it; extra arguments are passed on
as overrides) on the same validation split, and the final validation metrics are collected into
``outputs/learning_curve/<time>/curve.{json,md,png}``. ``--budget steps`` (the default) trains every size for as
many optimisation steps as the default run (``--epochs`` 10 of 4,000 images: ``make train``'s time), so the curve
says what fewer images cost at the same compute; ``--budget epochs`` trains every size ``--epochs`` epochs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES, DEFAULT_EPOCHS = 4000, 10
METRICS = {  # metrics.json key -> column
    "val/grounding/precision": "object precision",
    "val/grounding/color": "colour",
    "val/grounding/shape": "shape",
    "val/grounding/single_exact": "one-object exact",
    "val/grounding/correct": "true captions",
    "val/bleu4": "BLEU-4",
    "val/cider": "CIDEr-D",
}


def train(size: int, budget: str, base_epochs: int, overrides: list[str], root: Path) -> dict:
    epochs = base_epochs if budget == "epochs" else max(base_epochs, round(base_epochs * DEFAULT_IMAGES / size))
    every = max(1, epochs // DEFAULT_EPOCHS)  # ~10 validations whatever the number of epochs
    command = [sys.executable, str(REPO / "src" / "train.py"), f"data.num_train={size}", f"trainer.max_epochs={epochs}",
               f"trainer.check_val_every_n_epoch={every}", f"task_name=learning_curve_{size}",
               f"hydra.run.dir={root / str(size)}", "test=false", "logger=csv", *overrides]
    tic = time.perf_counter()
    with open(root / f"train_{size}.log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    metrics = json.loads((root / str(size) / "metrics.json").read_text())
    return {"images": size, "epochs": epochs, "wall_s": round(time.perf_counter() - tic, 1),
            **{column: metrics["final"].get(key) for key, column in METRICS.items()}}


def write_table(rows: list[dict], path: Path) -> str:
    columns = ["images", "epochs", *METRICS.values(), "wall_s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) and c != "wall_s" else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"the table is in {path.with_suffix('.md')}; the plot needs matplotlib: pip install -e '.[plots]' "
                 "(make install has it)")
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    sizes = [r["images"] for r in rows]
    for column in ("object precision", "true captions", "one-object exact", "BLEU-4"):
        ax.plot(sizes, [r[column] for r in rows], marker="o", label=column)
    ax.set_xscale("log")
    ax.minorticks_off()  # the log axis's minor labels crowd out the sizes
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("training images")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    parser.add_argument("--budget", choices=("steps", "epochs"), default="steps")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help="epochs of the 4,000-image run (the budget's unit); default 10, the default run's")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/learning_curve/<time>")
    parser.add_argument("overrides", nargs="*", help="passed on to src/train.py")
    args = parser.parse_args()
    root = args.out or REPO / "outputs" / "learning_curve" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        rows.append(train(size, args.budget, args.epochs, args.overrides, root))
        print(json.dumps(rows[-1]), flush=True)
        (root / "curve.json").write_text(json.dumps(rows, indent=1))
    print(write_table(rows, root / "curve.md"))
    budget = "same steps as 4,000 x 10 epochs" if args.budget == "steps" else "10 epochs each"
    plot(rows, root / "curve.png", f"built-in set, validation ({budget}) {' '.join(args.overrides)}".strip())
    print(f"written to {root}/curve.{{json,md,png}}")


if __name__ == "__main__":
    main()
