#!/usr/bin/env bash
# Q3 - Effect-matched transfer (docs/method.md section 3)
# Measures: the eps each model needs to move its ROI response by a set effect (robust models
# need much larger perturbations), and the transfer matrix of those perturbations (robust models'
# perturbations then transfer to all models).
# Stage 1: per model x subject x ROI and image, the smallest L2 eps reaching 0.5 test-set SD
#          (bracketing + bisection over runs of the default attack), perturbations stored.
# Stage 2: every run is a TARGET and applies every stage-1 source's effect-matched perturbations.
# Usage: experiments/effect_matched.sh [overrides for both stages, e.g. data=nsd data.root=/data/nsd]
#        Stage-1-only overrides go in STAGE1_ARGS (stage 2 has no probe.effect_matched), e.g.
#        STAGE1_ARGS="probe.effect_matched.effect.kind=noise_ceiling" experiments/effect_matched.sh
# By default MODELS are the two offline random-init networks (tiny_cnn_random, resnet18_random):
# it runs anywhere in minutes but shows the machinery, not the paper's result. For the study:
#   python -m brainrobust fetch weights --all
#   MODELS=resnet50,robust_resnet50_eps3,... experiments/effect_matched.sh data=nsd data.root=/data/nsd
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODELS=${MODELS:-tiny_cnn_random,resnet18_random}
SUBJECTS=${SUBJECTS:-1,2}
ROIS=${ROIS:-FFA,EBA,PPA}
# shellcheck disable=SC2086
$PY run.py --multirun experiment=effect_matched model="$MODELS" subject="$SUBJECTS" roi="$ROIS" ${STAGE1_ARGS:-} "$@"
$PY run.py --multirun experiment=transfer model="$MODELS" subject="$SUBJECTS" roi="$ROIS" \
  probe.transfer.kind=effect_matched 'probe.transfer.sources=[{experiment_name:effect_matched}]' "$@"
$PY -m brainrobust.analysis --root results --out figures/effect_matched --only transfer
