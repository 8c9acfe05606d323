"""The loss by context position in MLflow: a metric whose step is the position, and a chart.

``lmeval/<task>/nll_by_position`` holds one point per position bucket of results.json's
``loss_by_position``: value the bucket's mean NLL, step the bucket's end (its exclusive upper
position). MLflow draws a metric against its step, so its chart of this metric across the
evaluation runs of several checkpoints overlays their curves of loss against position.

MLflow imported lazily (see store.py); matplotlib too: 1.1-1.4 s measured on this machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..results_file import loss_by_position
from .keys import mlflow_key

METRIC = "nll_by_position"
PLOT = "loss_by_position.png"


def metric_name(task: str) -> str:
    return mlflow_key("lmeval", task, METRIC)


def position_metrics(results: Mapping[str, Any], timestamp_ms: int, skip: Iterable[str] = ()) -> list:
    """MLflow Metric objects: each task's mean NLL per position bucket, at step = the bucket's end.

    Not tied to the checkpoint's model: a LoggedModel's metrics are read as one value per step of
    training, and these steps are positions.
    """
    from mlflow.entities import Metric

    skip = set(skip)
    return [Metric(metric_name(task), float(row["mean_nll"]), timestamp_ms, int(row["end"]))
            for task, rows in loss_by_position(results).items() if metric_name(task) not in skip
            for row in rows]


def draw_curves(panels: Mapping[str, Mapping[str, list[dict]]], path: Path) -> None:
    """One panel per task, one line per label (``{task: {label: rows}}``): mean NLL against the
    bucket's end position, the position axis log-scaled. Panels without rows say so."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    names = list(panels) or ["(no loss by position: windowed mode)"]
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for axis, task in zip(axes[0], names):
        for label, rows in (panels.get(task) or {}).items():
            axis.plot([row["end"] for row in rows], [row["mean_nll"] for row in rows], marker="o", label=label or None)
        axis.set_xscale("log", base=2)
        axis.set_title(f"{task}: mean NLL by position", fontsize=9)
        axis.set_xlabel("position (bucket end)")
        axis.set_ylabel("mean NLL")
        if any(label for label in panels.get(task) or {}):
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_position_plot(directory: Path, results: Mapping[str, Any]) -> Path | None:
    """``directory/loss_by_position.png`` of one evaluation; None (nothing written) without a table."""
    tables = loss_by_position(results)
    if not tables:
        return None
    draw_curves({task: {"": rows} for task, rows in tables.items()}, directory / PLOT)
    return directory / PLOT
