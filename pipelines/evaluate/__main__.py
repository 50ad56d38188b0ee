"""`python -m pipelines.evaluate JOB.yaml [--set key=value ...]`: the `ray job submit` entry point."""

import sys

from pipelines.evaluate.job import main

sys.exit(main())
