"""`python -m pipelines.train jobs/train_all.yaml [--set key=value ...]` (what `ray job submit -- ...` runs)."""

import argparse
import sys

from pipelines.train.driver import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
