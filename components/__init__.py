"""KFP components of the ferflow pipeline, one per file. Each only maps KFP inputs and
outputs onto one `ferflow.stages` function (through `ferflow.pipeline.glue` and
`ferflow.pipeline.artifacts`), the same function the CLI and dvc.yaml run."""
