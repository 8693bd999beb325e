#!/usr/bin/env bash
# The main job: set up, then train the small bundle on its three sources with a short schedule and evaluate it on
# every source's held-out tiles (9 to 11 min on 2 cores of a CPU with native bf16, 53 min on an AVX2-only one;
# README).
# Outputs go to runs/quickstart/ so the bundle's own trained model stays untouched.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_ROOT="${NUCLEISEG_DATA:-../shared/datasets}"
EPOCHS="${EPOCHS:-10}"
OUT=runs/quickstart

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    # the CPU build on this machine's disk; any torch >= 2.3 works elsewhere
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"

for source in cryonuseg monuseg2018_train nuinsseg; do
    if [ ! -d "$DATA_ROOT/$source" ]; then
        echo "$source not found in $DATA_ROOT: set NUCLEISEG_DATA to the folder holding cryonuseg/, monuseg2018_train/ and nuinsseg/ (see README, The data)" >&2
        exit 1
    fi
done

# a new run folder each time (a finished one is resumed only with --resume true)
if [ -d "$OUT" ]; then
    echo "replacing the earlier quickstart run in $OUT (keep one by moving it elsewhere first)"
    rm -rf "$OUT"
fi
.venv/bin/nucleiseg train --bundle bundles/nuclei_unet_small \
    --bundle_root "$OUT" --data_root "$DATA_ROOT" --epochs "$EPOCHS" --val_interval 5
.venv/bin/nucleiseg evaluate --bundle bundles/nuclei_unet_small --bundle_root "$OUT" --data_root "$DATA_ROOT"
echo "report per source: $OUT/eval/test/metrics.json (TensorBoard: .venv/bin/tensorboard --logdir $OUT/runs)"
