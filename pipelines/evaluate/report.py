"""The evaluation report: a Markdown and an HTML page with the FID table (anchor rows beside the paper's figures),
bits/dim per stage, colourfulness and a grid of gray inputs / samples / ground truth, plus metrics.json; and
logging all of it to an MLflow run (a child of the training parent run when one is given)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from coltran.configs import STAGE_NAMES
from coltran.imageio import decode_image, encode_image
from pipelines.evaluate.settings import EvalSettings, settings_dict
from pipelines.tracking.runs import KIND_TAG, PARENT_TAG, RunLogger
from pipelines.train.config import flatten

# Paper, table 1 (FID on 5,000 ImageNet validation images against 5,000 others, 256x256).
PAPER_FID = {"colorized": 19.37, "grayscale": 30.19, "ground_truth": 14.68}
ROWS = (("colorized", "ColTran samples (this model)"), ("grayscale", "Grayscale inputs (anchor)"),
        ("ground_truth", "Real held-out images (anchor)"))
GAP = 4  # white pixels between grid columns


@dataclass
class EvalResult:
    metrics: dict[str, float]
    counts: dict[str, int]
    models: dict[str, str]  # stage -> label (directory@step or models:/name/version)
    steps: dict[str, int]
    untrained: bool
    grayscale_keys: list[str]  # evaluated images left out of the colour metrics
    missing: list[str]  # selected images that could not be read
    reference_cached: bool
    reference_stats_key: str  # the reference statistics' cache key (coltran.metrics.stats_key)
    grid: np.ndarray | None
    grid_keys: list[str]
    seconds_per_image: dict[str, float]
    seconds: float
    settings: EvalSettings
    run_id: str | None = field(default=None)
    plan: str = ""  # the resource plan the job ran with (pipelines.inference.plan), as printed at its start


def compose_grid(strips: list[bytes]) -> np.ndarray | None:
    """Side by side, GAP apart: each strip is one image's PNG column (gray / samples / ground truth)."""
    columns = [decode_image(bytes(s)).rgb for s in strips if len(s)]
    if not columns:
        return None
    gap = np.full((columns[0].shape[0], GAP, 3), 255, np.uint8)
    parts = [p for c in columns for p in (c, gap)][:-1]
    return np.concatenate(parts, axis=1)


def _fid_rows(result: EvalResult) -> list[tuple[str, str, str, str]]:
    counts, samples = result.counts, result.counts["num_samples"]
    images = {"colorized": counts["colour"] * samples, "grayscale": counts["colour"], "ground_truth": counts["colour"]}
    return [(label, f"{result.metrics[f'fid/{name}']:.2f}", str(images[name]), f"{PAPER_FID[name]:.2f}")
            for name, label in ROWS]


def _tables(result: EvalResult) -> list[tuple[str, list[str], list[tuple]]]:
    m = result.metrics
    tables = [(f"FID (lower is better) against {result.counts['reference_colour']} reference images",
               ["row", "FID", "images", "paper (5,000 vs 5,000)"], _fid_rows(result))]
    if "bits_per_dim/colorizer" in m:
        tables.append(("Held-out bits/dim (teacher-forced, EMA weights, all channels)", ["stage", "bits/dim",
                       "model"], [(s, f"{m[f'bits_per_dim/{s}']:.4f}", result.models[s]) for s in STAGE_NAMES]))
    tables.append(("Colourfulness (Hasler & Suesstrunk; mean over colour images)", ["images", "colourfulness"],
                   [("ColTran samples", f"{m['colourfulness/colorized']:.2f}"),
                    ("ground truth", f"{m['colourfulness/ground_truth']:.2f}")]))
    return tables


def _notes(result: EvalResult) -> list[str]:
    s, c = result.settings, result.counts
    notes = [f"{c['evaluated']} held-out images evaluated ({c['colour']} in colour metrics, {c['num_samples']} "
             f"sample(s) each), {c['reference']} reference images ({c['reference_colour']} colour), disjoint by "
             f"content; centre crop, area resize to 256x256; seed {s.seed}, mode {s.mode}, temperature {s.temperature}.",
             "FID grows as the number of images shrinks: compare runs only at the same counts; the paper's figures "
             "use 5,000 images on each side.",
             f"Reference statistics {'from the cache' if result.reference_cached else 'computed and cached'}; "
             f"{result.seconds:.0f} s in all; seconds per image: " +
             ", ".join(f"{k} {v:.2f}" for k, v in result.seconds_per_image.items()) + "."]
    if result.grayscale_keys:
        notes.append(f"Grayscale images left out of the colour metrics: {', '.join(result.grayscale_keys[:20])}"
                     + (" ..." if len(result.grayscale_keys) > 20 else ""))
    if result.missing:
        notes.append(f"Unreadable images skipped: {', '.join(result.missing[:20])}")
    if result.plan:
        notes.append("; ".join(" ".join(line.split()) for line in result.plan.splitlines()) + ".")
    if result.untrained:
        notes.append("WARNING: these models are UNTRAINED (coltran init-models): the figures are meaningless.")
    return notes


def markdown(result: EvalResult) -> str:
    lines = ["# ColTran evaluation", "", "Models: " + ", ".join(f"{s} `{label}`" for s, label in result.models.items()),
             ""]
    for title, header, rows in _tables(result):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows] + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in _notes(result)] + [""]
    if result.grid is not None:
        lines += ["## Samples", "", "Rows: gray input, " + ", ".join(f"sample {k + 1}" for k in range(
            result.counts["num_samples"])) + ", ground truth. Columns: " + ", ".join(f"`{k}`" for k in
                                                                                     result.grid_keys), "",
                  "![gray / samples / ground truth](grid.png)", ""]
    return "\n".join(lines)


def html_page(result: EvalResult) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>ColTran evaluation</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}img{max-width:100%}</style></head><body>",
             "<h1>ColTran evaluation</h1>", "<p>Models: " + ", ".join(f"{e(s)} <code>{e(label)}</code>" for s, label
                                                                      in result.models.items()) + "</p>"]
    for title, header, rows in _tables(result):
        parts += [f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows] + ["</table>"]
    parts += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in _notes(result)] + ["</ul>"]
    if result.grid is not None:
        parts += ["<h2>Samples</h2><p>Rows: gray input, samples, ground truth. Columns: " +
                  ", ".join(f"<code>{e(k)}</code>" for k in result.grid_keys) + "</p>",
                  "<img src='grid.png' alt='gray inputs, samples and ground truth'>"]
    return "\n".join(parts + ["</body></html>"])


def write_report(result: EvalResult, out: Path) -> list[Path]:
    """report.md, report.html, grid.png (when there is a grid) and metrics.json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"report.md": markdown(result), "report.html": html_page(result),
             "metrics.json": json.dumps({"metrics": result.metrics, "counts": result.counts, "models": result.models,
                                         "steps": result.steps, "grayscale_keys": result.grayscale_keys,
                                         "missing": result.missing,
                                         "reference_stats_key": result.reference_stats_key}, indent=1)}
    for name, text in files.items():
        (out / name).write_text(text)
    if result.grid is not None:
        (out / "grid.png").write_bytes(encode_image(result.grid, "png"))
    return [out / name for name in files] + ([out / "grid.png"] if result.grid is not None else [])


def _experiment_id(client: MlflowClient, spec) -> str:
    if spec.parent_run_id:
        return client.get_run(spec.parent_run_id).info.experiment_id  # raises naming the id when it is unknown
    exp = client.get_experiment_by_name(spec.experiment)
    return exp.experiment_id if exp is not None else client.create_experiment(spec.experiment)


def log_to_mlflow(result: EvalResult, out: Path) -> str:
    """A new run (child of tracking.parent_run_id when set) with the settings as params, the figures as metrics
    at the colorizer's training step, the grid as an image and the report folder as artifacts; its id."""
    spec = result.settings.tracking
    client = MlflowClient(spec.tracking_uri)
    tags: dict[str, Any] = {KIND_TAG: "evaluation", **{f"coltran.model.{s}": m for s, m in result.models.items()}}
    if spec.parent_run_id:
        tags[PARENT_TAG] = spec.parent_run_id
    name = spec.run_name or f"evaluate-{Path(result.settings.models.rstrip('/')).name or 'models'}"
    run_id = client.create_run(_experiment_id(client, spec), run_name=name, tags=tags).info.run_id
    try:
        logger, step = RunLogger(run_id, spec.tracking_uri), result.steps.get("colorizer", 0)
        logger.params(flatten(settings_dict(result.settings)))
        logger.metrics({**result.metrics, **{f"images/{k}": v for k, v in result.counts.items()}}, step=step)
        if result.grid is not None:
            logger.image(result.grid, key="evaluation/grid", step=step)
        client.log_artifacts(run_id, str(out), "report")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
