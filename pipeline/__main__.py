"""`python -m pipeline RECIPE.yaml` is `optimize RECIPE.yaml`; launchers take it as
`torchrun --nproc-per-node N -m pipeline RECIPE.yaml`."""

from pipeline.cli import main

main()
