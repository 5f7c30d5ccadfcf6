#!/usr/bin/env bash
# Q4 - Can stable, predictive models generate hypotheses? (docs/method.md section 5)
# Measures (with the real weights, the defaults below): the talk's targeted-perturbation videos and the "standard vs robustified" panel:
#   decrease FFA on faces (the 4 test images with the highest measured FFA response),
#   increase EBA and increase PPA (from the 4 images with the lowest measured response),
# L2 schedule 0.5 .. 32 (warm-started, 32 PGD steps per eps), on a standard and a robust ResNet-50,
# then maximally exciting images for FFA, EBA and PPA (4 seeds, 256 steps) on both models.
# Start images are ranked by MEASURED responses, so both models start from the same images.
# Needs the two models' weights (see `python -m brainrobust models`); for an offline smoke run
# use e.g. STANDARD=tiny_cnn_random ROBUST=resnet18_random.
# Cost: per model x subject, 3 settings x 4 images x 7 eps x 32 PGD steps = 2,688 image-steps
# (forward + backward at 224 px), plus 3 ROIs x 4 seeds x 256 MEI steps = 3,072 image-steps:
# minutes on one GPU for both models; multiply by the per-image-step cost that
# `python -m brainrobust.plan targeted` estimates for the model (from per-unit costs measured on an H200).
# Usage: experiments/targeted.sh [extra hydra overrides, e.g. data=nsd data.root=/data/nsd]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STANDARD=${STANDARD:-resnet50}
ROBUST=${ROBUST:-robust_resnet50_eps3}
SUBJECTS=${SUBJECTS:-1}
COMMON=(experiment=targeted model="$STANDARD,$ROBUST" subject="$SUBJECTS")
$PY run.py --multirun "${COMMON[@]}" probe.targeted.roi=FFA probe.targeted.direction=decrease \
  probe.targeted.images.select=top "$@"
$PY run.py --multirun "${COMMON[@]}" probe.targeted.roi=EBA probe.targeted.direction=increase \
  probe.targeted.images.select=bottom "$@"
$PY run.py --multirun "${COMMON[@]}" probe.targeted.roi=PPA probe.targeted.direction=increase \
  probe.targeted.images.select=bottom "$@"
$PY run.py --multirun "${COMMON[@]}" 'probe=[mei]' "$@"
# Videos, strips and response plots per run, the side-by-side panels (standard rows above robust
# rows) and the MEI gallery (ROI x model): brainrobust.analysis.gallery.gallery.
$PY -m brainrobust.analysis --root results --out figures/targeted --only targeted
