#!/usr/bin/env bash
# Q2 - Do models share failure modes? Their most sensitive perturbation directions
# (docs/method.md sections 4 and 6).
# Measures: the model x model subspace-similarity matrix per ROI and subject (standard models
# have distinct subspaces; robust models share directions), against the random baseline k / D.
# Runs: every model in MODELS x subjects x ROIs, top-10 subspaces of the first 50 test images
# (randomized block Krylov iteration, 5 oversampling columns, run until converged), then the
# matrices. Cost: (k + oversample) x (2 iterations + 1) Jacobian products per image and ROI (about
# a backward pass each): at most 495 (16 iterations), typically 165 (5); an ROI with fewer voxels
# takes the exact Jacobian (one product per voxel).
# Usage: experiments/subspace.sh [extra hydra overrides, e.g. data=nsd data.root=/data/nsd]
# By default MODELS are the two offline random-init networks (tiny_cnn_random, resnet18_random):
# it runs anywhere in minutes but shows the machinery, not the paper's result. For the study:
#   python -m brainrobust fetch weights --all
#   MODELS=resnet50,robust_resnet50_eps3,... experiments/subspace.sh data=nsd data.root=/data/nsd
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODELS=${MODELS:-tiny_cnn_random,resnet18_random}
SUBJECTS=${SUBJECTS:-1,2}
ROIS=${ROIS:-FFA,EBA,PPA}
$PY run.py --multirun experiment=subspace model="$MODELS" subject="$SUBJECTS" roi="$ROIS" "$@"
$PY -m brainrobust.analysis.subspaces --root results --out figures/subspace \
  --rois "$ROIS" --subjects "$SUBJECTS"
