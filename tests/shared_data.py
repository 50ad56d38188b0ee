"""The read-only test data in `../shared/data` (see its README) and what a test does when it is missing:
locally it skips, under CI=true it fails naming the missing path, so a clone without the data cannot pass
green with its strongest checks gone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = DATA / "imagenet-sample-500"  # 500 ImageNet JPEGs
TINY = DATA / "tiny-imagenet-200-val.tar"
TF_TEST = DATA / "official-coltran-tf" / "test"  # official TF checkpoints and outputs
TF_PREPROCESS = DATA / "official-coltran-tf" / "preprocess"  # official TF input pipeline outputs


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing_message(path: Path) -> str:
    return (f"test data {path} is missing: the suite reads ../shared/data beside the checkout "
            f"(expected at {DATA}; see its README)")


def require_shared_data(*paths: Path) -> None:
    """Call from a test or fixture: skip (locally) or fail (CI=true) when any of `paths` is absent."""
    for path in paths:
        if not path.exists():
            (pytest.fail if in_ci() else pytest.skip)(missing_message(path))


def needs_shared_data(*paths: Path) -> pytest.MarkDecorator:
    """A mark for tests or modules; conftest.py turns it into `require_shared_data(*paths)` before setup."""
    return pytest.mark.shared_data(*paths)
