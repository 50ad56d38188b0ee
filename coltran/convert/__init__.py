"""Conversion of official ColTran TensorFlow checkpoints, readable without TensorFlow installed."""
