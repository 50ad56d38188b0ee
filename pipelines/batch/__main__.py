"""`python -m pipelines.batch JOB.yaml [--set key=value ...]`: the `ray job submit` entry point."""

import sys

from pipelines.batch.job import main

sys.exit(main())
