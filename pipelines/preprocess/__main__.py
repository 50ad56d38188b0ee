"""`python -m pipelines.preprocess JOB.yaml [--set key=value ...]`: the `ray job submit` entry point."""

import sys

from pipelines.preprocess.job import main

sys.exit(main())
