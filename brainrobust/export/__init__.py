"""Stimulus export: the stimuli of runs as a set a real experiment can show (docs/export.md).

    sources.py        which runs RUN_OR_SWEEP names; one adapter per kind of stored stimuli
    encoders.py       each run's encoder rebuilt from its stored config; the held-out encoders
    pixels.py         8-bit rounding, Lanczos resizing, PNG bytes, what an encoder sees of a file
    manifest.py       manifest.csv / .json, conditions.csv, README.md
    stimulus_set.py   `export_stimulus_set`: assembles, predicts, measures, writes atomically
"""
