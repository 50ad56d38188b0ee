"""The preprocessed dataset that connects preprocessing to training, batch and evaluation: its Parquet row format,
the raw-input -> training-example transform, and its manifest."""
