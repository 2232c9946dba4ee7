#!/usr/bin/env bash
# Train, ship and evaluate geoseg's two land-cover models on the North Carolina Landsat-7 scene.
# Run from the repository root. CPU only is fine (1 thread per run, two at once on 2 cores: ~35 min).
# The fixed split: train = columns 0-325 (all of them train the shipped models; the settings were
# chosen on validation folds inside them: folds A and B until session 12, the three-fold row-band
# cross-validation of cv_folds.py since session 13, see README.md), test = columns 326-488, read
# only by the final `geoseg evaluate --region 326,0,163,443`.
set -euo pipefail
IMG=sample_data/nc_landsat7/image_6band_uint8.tif
REF=sample_data/nc_landsat7/landcover96_labels.tif
TEST_REGION=326,0,163,443          # col_off,row_off,width,height: the test columns
TEST_CLASSES=1,3,4,5,6,7           # classes present in the test columns

ship() {  # ship <name> <run folder>
  cp "$2/weights.pdparams" "geoseg/weights/$1.pdparams"
  sed "s/^weights: weights.pdparams/weights: $1.pdparams/" "$2/weights.yaml" > "geoseg/weights/$1.yaml"
}

# 1. Train the ensemble members (the configs hold every setting; --seed makes a member): two runs at
#    a time, one thread each (~8 min per run alone, ~14 min per pair on 2 cores).
train() { OMP_NUM_THREADS=1 geoseg -q train --config "sample_data/recipes/nc_$1.yaml" --out "runs/nc_$1_s$2" --seed "$2" --overwrite; }
train deeplabv3p 0 & a=$!; train unet 0 & b=$!; wait "$a" && wait "$b"   # a failed run stops the script here
train deeplabv3p 1 & a=$!; train unet 1 & b=$!; wait "$a" && wait "$b"
train unet 2

# 2. Combine them into seed ensembles (sessions 8-9; both read bands 1-5; float16 weights: DeepLabv3+ 2 members 12.3 MB,
#    UNet 3 members 11.9 MB) and ship them inside the package.
geoseg -q ensemble runs/nc_deeplabv3p_s0 runs/nc_deeplabv3p_s1 --out runs/nc_deeplabv3p --name deeplabv3p-nc-landcover --overwrite
geoseg -q ensemble runs/nc_unet_s0 runs/nc_unet_s1 runs/nc_unet_s2 --out runs/nc_unet --name unet-nc-landcover --overwrite
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
