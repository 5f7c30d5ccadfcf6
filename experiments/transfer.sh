#!/usr/bin/env bash
# Q3 - Do models share failure modes? (docs/method.md section 3)
# Measures: the source x target transfer matrix per ROI, subject and eps (standard models'
# perturbations do not transfer; robust models' transfer to other robust models).
# Stage 1: the sensitivity sweep stores perturbations per model x subject x ROI (the same runs as
#          experiments/sensitivity.sh: same config, same results key, so they are reused if done).
# Stage 2: every model x subject x ROI run is a TARGET and applies every stage-1 source's stored
#          perturbations of its ROI (other models and other subjects), plus a random control.
# Cost: stage 1 as experiments/sensitivity.sh; stage 2 is forward passes only (sources x targets x
#       eps x images x (1 + random draws)).
# Usage: experiments/transfer.sh [extra hydra overrides, e.g. data=nsd data.root=/data/nsd]
# By default MODELS are the two offline random-init networks (tiny_cnn_random, resnet18_random):
# it runs anywhere in minutes but shows the machinery, not the paper's result. For the study:
#   python -m brainrobust fetch weights --all
#   MODELS=resnet50,robust_resnet50_eps3,... experiments/transfer.sh data=nsd data.root=/data/nsd
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODELS=${MODELS:-tiny_cnn_random,resnet18_random}
SUBJECTS=${SUBJECTS:-1,2}
ROIS=${ROIS:-FFA,EBA,PPA}
$PY run.py --multirun experiment=sensitivity model="$MODELS" subject="$SUBJECTS" roi="$ROIS" "$@"
$PY run.py --multirun experiment=transfer model="$MODELS" subject="$SUBJECTS" roi="$ROIS" "$@"
$PY -m brainrobust.analysis --root results --out figures/transfer --only transfer
