"""MLflow for every job: the runs of a submission (runs.py), the model registry (registry.py) and its default
names (names.py), and the pyfunc model that a registered stage is (pyfunc.py)."""
