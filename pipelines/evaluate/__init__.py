"""The evaluation job (`python -m pipelines.evaluate JOB.yaml`, `coltran evaluate`): FID with its anchor rows,
held-out bits/dim and colourfulness, with a report."""
