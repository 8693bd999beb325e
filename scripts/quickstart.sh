#!/usr/bin/env bash
# The main job: set up, then train and evaluate the small bundle on CryoNuSeg with a short schedule (about 6 min on 2 CPU cores).
# Outputs go to runs/quickstart/ so the bundle's own trained model stays untouched.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET_DIR="${CRYONUSEG_DIR:-../shared/datasets/cryonuseg}"
EPOCHS="${EPOCHS:-20}"
OUT=runs/quickstart

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    # the CPU build on this machine's disk; any torch >= 2.3 works elsewhere
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"

if [ ! -d "$DATASET_DIR/tissue images" ]; then
    echo "CryoNuSeg not found at $DATASET_DIR: run '.venv/bin/nucleiseg download --dest data/cryonuseg' and set CRYONUSEG_DIR=data/cryonuseg" >&2
    exit 1
fi

.venv/bin/python -m monai.bundle run training \
    --config_file bundles/nuclei_unet_small/configs/train.json \
    --bundle_root "$OUT" --dataset_dir "$DATASET_DIR" --epochs "$EPOCHS" --val_interval 3
.venv/bin/python -m monai.bundle run evaluating \
    --config_file bundles/nuclei_unet_small/configs/evaluate.json \
    --bundle_root "$OUT" --dataset_dir "$DATASET_DIR"
echo "test-split report: $OUT/eval/test/metrics.json (TensorBoard: .venv/bin/tensorboard --logdir $OUT/runs)"
