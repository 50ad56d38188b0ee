"""Batch colorization (`python -m pipelines.batch JOB.yaml`, `coltran colorize`): sources -> colour images and a
manifest with one row per input, resumable."""
