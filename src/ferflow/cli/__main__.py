"""`python -m ferflow.cli`: the `ferflow` console script (torchrun and the tests start it so)."""

from ferflow.cli import main

main()
