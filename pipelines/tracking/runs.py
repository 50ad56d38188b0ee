"""MLflow runs of a submission: a parent run per submission with a child run per stage, found again by tags so
that a resumed submission continues the same runs, and `RunLogger`, which logs to one run by id without MLflow's
process-global state (what a rank-0 worker, the driver and the evaluation report use)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

RUN_NAME_TAG, KIND_TAG, STAGE_TAG = "coltran.run_name", "coltran.kind", "coltran.stage"
PARENT_TAG = "mlflow.parentRunId"
TRACKING_ENV = "MLFLOW_TRACKING_URI"


@dataclass
class SubmissionRuns:
    experiment_id: str
    parent_id: str
    children: dict[str, str]  # stage -> run id
    resumed: bool  # the parent run existed already (same run name re-submitted)


def open_submission(run_name: str, stages: list[str], *, experiment: str,
                    tracking_uri: str | None = None) -> SubmissionRuns:
    """Get or create the parent run tagged with `run_name` and one child run per stage under it."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    found = client.search_runs([exp_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{KIND_TAG}` = "
                                         "'submission'", order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        parent_id = found[0].info.run_id
        client.update_run(parent_id, status="RUNNING")
    else:
        parent_id = client.create_run(exp_id, run_name=run_name,
                                      tags={RUN_NAME_TAG: run_name, KIND_TAG: "submission"}).info.run_id
    children = {}
    # the stage runs only: evaluations logged under the same parent are children too
    for run in client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{KIND_TAG}` = 'stage'"):
        children.setdefault(run.data.tags.get(STAGE_TAG), run.info.run_id)
    for stage in stages:
        if stage not in children:
            tags = {RUN_NAME_TAG: run_name, KIND_TAG: "stage", STAGE_TAG: stage, PARENT_TAG: parent_id}
            children[stage] = client.create_run(exp_id, run_name=f"{run_name}/{stage}", tags=tags).info.run_id
        else:
            client.update_run(children[stage], status="RUNNING")
    return SubmissionRuns(exp_id, parent_id, {s: children[s] for s in stages}, resumed=bool(found))


def finish_run(run_id: str, ok: bool, tracking_uri: str | None = None) -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


class RunLogger:
    """Logs to one existing run by id (no global state): what a rank-0 worker and the driver use."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, array: np.ndarray, key: str, step: int) -> None:
        self.client.log_image(self.run_id, np.ascontiguousarray(array, np.uint8), key=key, step=step)

    def tags(self, values: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def params(self, values: dict[str, Any]) -> list[str]:
        """Log params not logged yet; MLflow params are immutable, so keys whose value changed since (a
        resumed run with an edited job file) are recorded in the tag `coltran.changed_params` and returned."""
        existing = self.client.get_run(self.run_id).data.params
        values = {k: _param_text(v) for k, v in values.items()}
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start:start + 100])
        if changed:
            self.tags({"coltran.changed_params": json.dumps({k: values[k] for k in changed})[:5000]})
        return changed

    def artifact_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)
    return text[:6000]  # the tracking server's limit on a param value
