"""What the Ray Data jobs that run the models share (batch colorization and evaluation): one actor class per model
stage, the columns they and the CPU tasks hand each other, and the resource plan that sizes their actor pools
from the cluster."""
