#!/usr/bin/env bash
# Q5 - Would the stimuli drive the ROI in a brain? Closed-loop in-silico validation (docs/insilico.md).
# Extends: the papers stop at the model that made a stimulus; here each stimulus method (targeted
# PGD up / down, random noise of the same norm, MEIs, the encoder's top / bottom natural images)
# is made by one source encoder at matched L2 and L-inf budgets and scored by encoders that never
# saw it (the same model fit to other subjects, other models fit to the same and to other
# subjects) and, on the synthetic brain (data=synthetic_brain), by every subject's true response.
# Cost (2 CPU cores, the defaults: tiny_cnn_random source, 8 start images, 4 budgets, 32
# Auto-PGD steps, 64 MEI steps, held-out subjects 2 and 3, one held-out model, the brain's 8
# subjects): 1 min 52 s for the first ROI from a cold cache (writing the synthetic brain 13 s,
# fitting the 5 held-out encoders), 80-90 s per further ROI, 20 s for the figures: about 5 min.
# On real NSD, `python -m brainrobust.plan insilico data=nsd data.root=...` prices a sweep (the
# brain scorers then drop out: only the synthetic world has a ground truth).
# Usage: [RESULTS=results FIGURES=figures/insilico] experiments/insilico.sh [extra hydra overrides,
#        e.g. model=resnet18_random subject=2]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROIS=${ROIS:-FFA,EBA,PPA}
RESULTS=${RESULTS:-results}
FIGURES=${FIGURES:-figures/insilico}
# One source encoder per job, each target ROI in turn (the encoder carries all three, so the
# other two give the selectivity baseline).
$PY run.py --multirun experiment=insilico probe.insilico.roi="$ROIS" paths.results_dir="$RESULTS" "$@"
$PY -m brainrobust.analysis --root "$RESULTS" --out "$FIGURES" --only insilico
