"""Fetching what runs need before they go offline: NSD files and model weights.

`python -m brainrobust fetch nsd ...` (`brainrobust.fetch.nsd`, with `--roi-only` in
`brainrobust.fetch.remote`) and `python -m brainrobust fetch weights ...`
(`brainrobust.fetch.weights`), over the HTTP client in `brainrobust.fetch.http`.
"""
