"""`python -m brainrobust` lists what the results store holds (see brainrobust.cli)."""

from brainrobust.cli import main

main()
