#!/usr/bin/env bash
# The GPU figures in one short run, on a machine with a CUDA GPU (docs/architecture.md, "Checking on a GPU"):
#   1. the recurrent cores against cuDNN's (benchmarks/bench_core.py --device cuda, every size and cell);
#   2. the default run on the GPU in bfloat16 (trainer=gpu: bf16-mixed), two epochs on the built-in set: the
#      seconds of each epoch, its images/s and the scores, which say whether bf16 learns as float32 does.
#
#   scripts/gpu_check.sh [OUT_DIR [OVERRIDE ...]]   # OUT_DIR default: $OUT, else outputs/gpu_check; the overrides go
#                                                   # to train.py (e.g. data.root=/data/shapes)
#
# What it writes to OUT_DIR: gpu_check.txt (everything printed), core.json, train_metrics.json, train.log.
# Python packages the machine lacks can travel as wheels in .whl/ (installed into /tmp/site, nothing else touched).
# CHECK_DEVICE=cpu runs the same steps on the CPU (trainer=cpu, one epoch of 20 steps): the script's own test.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-outputs/gpu_check}}
shift $(( $# > 0 ? 1 : 0 ))
DEVICE=${CHECK_DEVICE:-cuda}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
exec > >(tee "$OUT_DIR/gpu_check.txt") 2>&1

echo "== machine"
$PY - "$DEVICE" <<'EOF'
import sys, torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch " + torch.__version__ + "); CHECK_DEVICE=cpu to try the steps on the CPU")
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else "-"
print(f"torch {torch.__version__}, device {name}, bf16 {bf16}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L || true

echo "== 1. recurrent cores (bench_core.py --device $DEVICE)"
if [ "$DEVICE" = cuda ]; then core_args=(--device cuda --rounds 3); else core_args=(--quick --sizes small --cells lstm); fi
$PY benchmarks/bench_core.py "${core_args[@]}" --json "$OUT_DIR/core.json"

echo "== 2. the default run, $([ "$DEVICE" = cuda ] && echo 'bf16-mixed on the GPU, 2 epochs' || echo 'CPU, 20 steps')"
RUN_DIR=$(mktemp -d)  # checkpoints stay out of OUT_DIR: only the scores and the log come back
if [ "$DEVICE" = cuda ]; then
  train_args=(trainer=gpu trainer.max_epochs=2)
else
  train_args=(trainer=cpu trainer.max_epochs=1 +trainer.limit_train_batches=20 +trainer.limit_val_batches=2 test=false)
fi
START=$(date +%s)
$PY src/train.py "${train_args[@]}" logger=csv data.progress=false "paths.log_dir=$RUN_DIR" "hydra.run.dir=$RUN_DIR/run" "$@"
echo "train.py wall time: $(( $(date +%s) - START )) s"
cp "$RUN_DIR/run/metrics.json" "$OUT_DIR/train_metrics.json"
cp "$RUN_DIR/run/train.log" "$OUT_DIR/train.log"
grep -h "epoch done in\|precision:" "$OUT_DIR/train.log" | tail -n 4 || true
rm -rf "$RUN_DIR"
echo "== done: $OUT_DIR"
