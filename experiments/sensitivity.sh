#!/usr/bin/env bash
# Q1 - How sensitive are brain models to small adversarial perturbations? (docs/method.md section 2)
# Measures: sensitivity vs eps per model, and sensitivity vs predictivity across models
# (the talk's "does adversarial sensitivity discriminate between equally well-predicting models").
# Runs: every model in MODELS x subjects x ROIs, L2 ladder {0.01 .. 3}, the default attack
# (annealed step, 100 steps x 2 restarts: conf/attack/cosine.yaml), 4 random draws.
# Cost: see `python -m brainrobust.plan sensitivity` for the estimate from measured per-unit costs.
# Usage: experiments/sensitivity.sh [extra hydra overrides, e.g. data=nsd data.root=/data/nsd]
# By default MODELS are the two offline random-init networks (tiny_cnn_random, resnet18_random):
# it runs anywhere in minutes but shows the machinery, not the paper's result. For the study:
#   python -m brainrobust fetch weights --all
#   MODELS=resnet50,robust_resnet50_eps3,... experiments/sensitivity.sh data=nsd data.root=/data/nsd
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODELS=${MODELS:-tiny_cnn_random,resnet18_random}
SUBJECTS=${SUBJECTS:-1,2}
ROIS=${ROIS:-FFA,EBA,PPA}
$PY run.py --multirun experiment=sensitivity model="$MODELS" subject="$SUBJECTS" roi="$ROIS" "$@"
$PY -m brainrobust.analysis --root results --out figures/sensitivity --only sensitivity
