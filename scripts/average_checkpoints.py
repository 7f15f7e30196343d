"""Average the weights of several checkpoints into one model (the cheap alternative to an ensemble).

    python scripts/average_checkpoints.py outputs/train/runs/<time>/checkpoints/epoch00{7,8,9}*.ckpt --out avg.ckpt
    python src/eval.py ckpt_path=avg.ckpt

The result decodes and evaluates like any checkpoint (eval.py, caption.py, export.py) but does not resume
training. Average checkpoints of one run: models trained from different seeds do not share a basin, so their mean
is no model at all; decode those as an ensemble (``'ckpt_path=[a.ckpt,b.ckpt]'``) instead.
"""

from __future__ import annotations

import argparse
import sys

from captioning.checkpointing import average_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="two or more .ckpt files of one model config and vocabulary")
    parser.add_argument("--out", required=True, help="where to write the averaged checkpoint")
    args = parser.parse_args(argv)
    try:
        target = average_checkpoints(args.checkpoints, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Averaged {len(args.checkpoints)} checkpoints into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
