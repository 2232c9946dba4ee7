#!/usr/bin/env bash
# Train, ship and evaluate geoseg's two land-cover models on the North Carolina Landsat-7 scene.
# Run from the repository root. CPU only is fine (1 thread each, both at once on 2 cores: ~10 min).
# The fixed split: train = columns 0-325 (all of them train the shipped models; the settings were
# chosen on two validation folds inside them, see README.md), test = columns 326-488, read only by
# the final `geoseg evaluate --region 326,0,163,443`.
set -euo pipefail
IMG=sample_data/nc_landsat7/image_6band_uint8.tif
REF=sample_data/nc_landsat7/landcover96_labels.tif
TEST_REGION=326,0,163,443          # col_off,row_off,width,height: the test columns
TEST_CLASSES=1,3,4,5,6,7           # classes present in the test columns

ship() {  # ship <name> <run folder>
  cp "$2/weights.pdparams" "geoseg/weights/$1.pdparams"
  sed "s/^weights: weights.pdparams/weights: $1.pdparams/" "$2/weights.yaml" > "geoseg/weights/$1.yaml"
}

# 1. Train (the configs hold every setting): both at once, one thread each.
OMP_NUM_THREADS=1 geoseg -v train --config sample_data/recipes/nc_deeplabv3p.yaml & dl=$!
OMP_NUM_THREADS=1 geoseg -v train --config sample_data/recipes/nc_unet.yaml & unet=$!
wait "$dl" && wait "$unet"   # a failed run stops the script here

# 2. Ship the final weights (EMA at the last iteration) inside the package.
mkdir -p geoseg/weights
ship deeplabv3p runs/nc_deeplabv3p
ship unet runs/nc_unet

# 3. Predict the whole scene with the shipped models (no --weights) and evaluate on the test columns
#    once; the figures go into each card's metrics.test.
for m in deeplabv3p unet; do
  geoseg -q predict "$IMG" --model "$m" --out "runs/eval_$m/" --vector none --overwrite
  geoseg evaluate "runs/eval_$m/image_6band_uint8_landcover.tif" --reference "$REF" \
    --region "$TEST_REGION" --miou-classes "$TEST_CLASSES" --record-card "geoseg/weights/$m.yaml"
done
