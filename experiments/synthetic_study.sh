#!/usr/bin/env bash
# The whole study in miniature on the synthetic twin, offline, on CPU: what `make figures` runs.
# Every paper question once, with the two offline random-init models standing in for a standard
# and a robust network (random models are NOT robust: the pictures show the machinery, not the
# paper's result), then the figures and the HTML report from the results store.
# Cost: about 10-15 minutes on 2 CPU cores; finished runs are skipped on rerun.
# Usage: experiments/synthetic_study.sh [results dir] [figures dir]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${1:-results/synthetic_study}
FIGURES=${2:-figures}
MODELS=tiny_cnn_random,resnet18_random
# resnet18_random reads the 64 px twin at 64 px: no upsampling on CPU.
COMMON=(paths.results_dir="$RESULTS" model.input_size=64 logger=none trainer.enable_progress_bar=false)

# Q1 sensitivity (stores the perturbations that Q2 transfer reuses).
$PY run.py --multirun experiment=sensitivity model=$MODELS subject=1,2 roi=FFA,PPA "${COMMON[@]}" \
  epsilon=l2_small probe.sensitivity.max_images=16
# Q2 transfer across models and subjects, from the stored perturbations.
$PY run.py --multirun experiment=transfer model=$MODELS subject=1,2 roi=FFA,PPA "${COMMON[@]}" \
  epsilon=l2_small probe.transfer.max_images=16
# Q2 perturbation subspaces.
$PY run.py --multirun experiment=subspace model=$MODELS subject=1 roi=FFA "${COMMON[@]}" \
  probe.subspace.max_images=4
# Q4 targeted perturbations (decrease FFA on the top FFA images) and MEIs.
$PY run.py --multirun experiment=targeted model=$MODELS subject=1 "${COMMON[@]}" \
  probe.targeted.images.n=2 probe.targeted.attack.steps=8 'probe.targeted.eps_schedule=[0.5,1,2,4,8]'
$PY run.py --multirun experiment=targeted model=$MODELS subject=1 'probe=[mei]' "${COMMON[@]}" \
  probe.mei.seeds=2 probe.mei.steps=96
$PY -m brainrobust.analysis --root "$RESULTS" --out "$FIGURES"
