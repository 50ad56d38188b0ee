"""The preprocessing job (`python -m pipelines.preprocess JOB.yaml`, `coltran preprocess`): raw images -> the
Parquet dataset of pipelines.dataset."""
