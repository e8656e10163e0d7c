#!/usr/bin/env bash
# Make every model and test vector the project uses. Idempotent: each step
# skips work whose files already exist. Run from any directory.
#
#   scripts/models.sh [--train] [--all] [--force]
#
#   (default)  install the Python tooling (scripts/setup-python.sh) and export
#              MobileNetV2 (real ImageNet weights) and ResNet-18 with their test
#              vectors and the photo to build/models/ (scripts/export_models.py)
#   --train    also fetch MNIST to build/mnist/ (scripts/fetch-mnist.sh) and train
#              models/mnist-cnn.onnx with its samples (scripts/train_mnist.py),
#              unless models/mnist-cnn.{onnx,json} and samples/reference.json exist
#   --all      also export VGG-16 (~550 MB, ~20 s)
#   --force    retrain / re-export even when the files exist
#
# models/ is committed; build/ is not. Retraining on the same machine kind
# reproduces models/ bit for bit (fixed seed, 2 threads).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

train=0
export_args=()
force=0
for arg in "$@"; do
  case "$arg" in
    --train) train=1 ;;
    --all) export_args+=(--all) ;;
    --force) force=1; export_args+=(--force) ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

PY=$(scripts/setup-python.sh)

if [ "$train" -eq 1 ]; then
  if [ "$force" -eq 1 ] || [ ! -f models/mnist-cnn.onnx ] || [ ! -f models/mnist-cnn.json ] ||
     [ ! -f models/samples/reference.json ]; then
    scripts/fetch-mnist.sh
    "$PY" scripts/train_mnist.py
  else
    echo "mnist-cnn: up to date in models/"
  fi
fi

"$PY" scripts/export_models.py "${export_args[@]}"
