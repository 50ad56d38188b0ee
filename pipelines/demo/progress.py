"""Training progress for the demo's console: a thread that reads each stage's latest step, loss and images/s from
the MLflow store the workers log to (the same figures the MLflow UI shows) and prints one line for all stages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pipelines.tracking.runs import KIND_TAG, RUN_NAME_TAG, STAGE_TAG

SHORT = {"colorizer": "colorizer", "color_upsampler": "colour-up", "spatial_upsampler": "spatial-up"}


def stage_runs(client, experiment: str, run_name: str) -> dict[str, object]:
    """The child runs (one per stage) of the submission called `run_name`, by stage; {} until they exist."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}' and "
                              f"tags.`{KIND_TAG}` = 'stage'")
    return {r.data.tags[STAGE_TAG]: r for r in runs}


def latest(client, run) -> tuple[int, float, float] | None:
    """(step, loss, images/s) of the run's latest logged training window, None before the first."""
    history = client.get_metric_history(run.info.run_id, "loss")
    if not history:
        return None
    last = max(history, key=lambda m: m.step)
    return last.step, last.value, run.data.metrics.get("images_per_s", 0.0)


def progress_line(figures: dict[str, tuple[int, float, float] | None], max_steps: dict[str, int],
                  seconds: float) -> str:
    """`train   95 s  colorizer 120/600 loss 3.41 5.2 img/s | colour-up ...`."""
    parts = []
    for stage, total in max_steps.items():
        got = figures.get(stage)
        parts.append(f"{SHORT[stage]} starting" if got is None else
                     f"{SHORT[stage]} {got[0]}/{total} loss {got[1]:.2f} {got[2]:.2g} img/s")
    return f"train {seconds:4.0f} s  " + " | ".join(parts)


class TrainingProgress:
    """`with TrainingProgress(uri, experiment, run_name, steps, say, every_s):` prints a line every `every_s`."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, max_steps: dict[str, int],
                 say: Callable[[str], None], every_s: float = 45.0):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.experiment, self.run_name, self.max_steps = experiment, run_name, max_steps
        self.say, self.every_s = say, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo-progress", daemon=True)

    def __enter__(self) -> TrainingProgress:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                runs = stage_runs(self.client, self.experiment, self.run_name)
                figures = {stage: latest(self.client, run) for stage, run in runs.items()}
                line = progress_line(figures, self.max_steps, time.monotonic() - self.started)
            except Exception as err:  # noqa: BLE001 - the store may be busy; the next poll tries again
                line = f"train (progress unavailable this time: {type(err).__name__})"
            self.say("    " + line)
