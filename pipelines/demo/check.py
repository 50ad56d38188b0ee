"""What the demo's summary reports about its own result: how far the colorized held-out photos' chroma is from
their originals, next to a plain gray image's distance (a model that learned nothing does no better than gray),
and each stage's held-out bits/dim with the registered (EMA) weights, as logged at the last training step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from coltran.chroma import chroma
from pipelines.tracking.runs import KIND_TAG, RUN_NAME_TAG, STAGE_TAG


@dataclass
class ChromaCheck:
    images: int  # colourings compared
    colour_error: float  # mean |CbCr(colourised) - CbCr(original)| over pixels and colourings
    gray_error: float  # the same for a gray image (chroma 0): mean |CbCr(original)|

    @property
    def ratio(self) -> float:
        return self.colour_error / max(self.gray_error, 1e-9)


def chroma_check(rows: list[dict], dest: Path) -> ChromaCheck:
    """Compare every output of the manifest `rows` (done; `source` the original photo, or the folder holding it
    at `key`) with its original."""
    colour, gray, count = [], [], 0
    for row in rows:
        source = Path(row["source"])
        with Image.open(source / row["key"] if source.is_dir() else source) as image:
            truth = chroma(np.asarray(image.convert("RGB")))
        gray.append(np.abs(truth).mean())
        for output in row["outputs"]:
            with Image.open(dest / output) as image:
                colour.append(np.abs(chroma(np.asarray(image.convert("RGB"))) - truth).mean())
            count += 1
    if not count:
        raise ValueError(f"no colorized outputs to compare under {dest}")
    return ChromaCheck(count, float(np.mean(colour)), float(np.mean(gray)))


def heldout_bits_per_dim(client, experiment: str, run_name: str) -> dict[str, float]:
    """Per stage, the last `eval/bits_per_dim` (EMA weights, the ones registered) of the submission `run_name`."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}' and "
                              f"tags.`{KIND_TAG}` = 'stage'")
    figures = {}
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "eval/bits_per_dim")
        if history:
            figures[run.data.tags[STAGE_TAG]] = max(history, key=lambda m: m.step).value
    return figures


def submission_run_id(client, experiment: str, run_name: str) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}' and "
                              f"tags.`{KIND_TAG}` = 'submission'")
    return runs[0].info.run_id if runs else None
