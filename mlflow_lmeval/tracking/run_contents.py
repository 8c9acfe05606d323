"""What an evaluation run holds: params, metrics (tied to each task as dataset and to the
checkpoint's model), dataset inputs, tags, and redacted artifacts.

MLflow imported lazily (see store.py); ``lm_eval.utils`` too, for the description: 0.3-0.5 s
measured on this machine, which the CLI's commands that publish nothing should not pay.
"""

from __future__ import annotations

import csv
import json
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..dvc_context import dvc_context_tags
from ..results_file import checkpoint_section, live_section, samples_files, write_results_file
from . import store
from .identity import dataset_digest
from .keys import flatten_params, results_table, task_metrics, task_sections
from .position_loss import position_metrics, write_position_plot
from .redact import env_secrets, redact, scrub_text
from .uri import project_root

TAG_MODEL_ID = "lmeval.model_id"


def complete_run(client, run, results_dir: Path, results: dict, identity: Mapping[str, str],
                 training_run_id: str | None, step: int, model_id: str | None, timestamp_ms: int) -> None:
    """Log whatever the run lacks, metrics at ``timestamp_ms`` (``evaluation_timestamp_ms``). Params and
    metrics already there are skipped (a partial run)."""
    from mlflow.entities import LoggedModelInput, Param

    run_id = run.info.run_id
    params = flatten_params(results.get("eval_config") or {})
    params.update(flatten_params(results.get("config") or {}, prefix="lm_eval."))
    params = [Param(k, v) for k, v in params.items() if k not in run.data.params]
    metrics = _metric_entities(results, step, timestamp_ms, model_id, skip=run.data.metrics)
    metrics += position_metrics(results, timestamp_ms, skip=run.data.metrics)  # their step is a position
    tags = store.tag_list(_run_tags(results, identity, training_run_id, step, model_id))
    store.log_batch(client, run_id, params=params, tags=tags)
    store.retry_on_conflict(lambda: client.log_inputs(run_id, datasets=_dataset_inputs(results),
                                                      models=[LoggedModelInput(model_id)] if model_id else None))
    store.log_batch(client, run_id, metrics=metrics)
    with tempfile.TemporaryDirectory(prefix="lmeval-artifacts-") as directory:
        write_artifacts(Path(directory), results_dir, results)
        client.log_artifacts(run_id, directory)


def _metric_entities(results: Mapping[str, Any], step: int, timestamp_ms: int, model_id: str | None = None,
                     skip: Iterable[str] = ()) -> list:
    """MLflow Metric objects: each task's metrics tied to the task as dataset and to the model.

    The dataset's digest keys on the documents scored and the settings (``dataset_digest``): on the
    model, a limited or otherwise different evaluation of a task sits beside a full one's value
    under its own dataset, never over it."""
    from mlflow.entities import Metric

    skip, metrics, digests = set(skip), [], {}
    for task, key, number in task_metrics(results):
        if key in skip:
            continue
        if model_id:
            digest = digests.setdefault(task, dataset_digest(results, task))
            metrics.append(Metric(key, number, timestamp_ms, step, model_id=model_id,
                                  dataset_name=task, dataset_digest=digest))
        else:
            metrics.append(Metric(key, number, timestamp_ms, step))
    return metrics


def _dataset_inputs(results: Mapping[str, Any]) -> list:
    """Each task (and group) as an evaluation dataset, with the digest its metrics carry."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for task, _ in task_sections(results):
        source = {"task": task, "version": (results.get("versions") or {}).get(task)}
        profile = {"n-samples": (results.get("n-samples") or {}).get(task),
                   "n-shot": (results.get("n-shot") or {}).get(task)}
        dataset = Dataset(name=task, digest=dataset_digest(results, task), source_type="lm_eval_task",
                          source=json.dumps(source, default=str), profile=json.dumps(profile, default=str))
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", "evaluation")]))
    return inputs


def _git_commit(root: Path) -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _lm_eval_version(results: Mapping[str, Any]) -> str | None:
    if results.get("lm_eval_version"):
        return str(results["lm_eval_version"])
    try:
        return version("lm_eval")
    except Exception:  # a missing version is only a missing tag
        return None


def _run_tags(results: Mapping[str, Any], identity: Mapping[str, str], training_run_id: str | None,
              step: int, model_id: str | None) -> dict[str, Any]:
    live = live_section(results) is not None
    return {
        **identity,
        "lmeval.kind": "live_evaluation" if live else "checkpoint_evaluation",
        "lmeval.checkpoint_path": checkpoint_section(results).get("path"),
        "lmeval.checkpoint_step": str(step),
        "lmeval.training_run_id": training_run_id,
        "lmeval.tasks": ",".join(name for name, _ in task_sections(results)),
        "lmeval.lm_eval_version": _lm_eval_version(results),
        "lmeval.git_commit": results.get("git_hash") or _git_commit(project_root()),
        TAG_MODEL_ID: model_id,
        "mlflow.note.content": _description(results),  # the run page's Description
        "mlflow.loggedArtifacts": json.dumps([{"path": "results_table.json", "type": "table"}]),
        **dvc_context_tags(),
    }


def _description(results: Mapping[str, Any]) -> str | None:
    """lm-eval's own Markdown results table (and its groups table), as lm-eval prints it."""
    from lm_eval.utils import make_table

    tables = {"versions": {}, **results}
    try:
        text = make_table(tables)
        if tables.get("groups"):
            text += "\n" + make_table(tables, "groups")
    except Exception:  # a description is a nicety; the metrics and the table artifact hold it all
        return None
    return text


def write_artifacts(directory: Path, results_dir: Path, results: Mapping[str, Any]) -> None:
    """Redacted copies of everything the run should carry: results, table, config, the loss by
    position's chart, and the samples files results.json lists (no other file of the directory)."""
    secrets = env_secrets()
    clean = redact(results, secrets=secrets)
    write_results_file(directory, clean)
    (directory / "eval_config.json").write_text(
        json.dumps(clean.get("eval_config") or {}, indent=2, ensure_ascii=False), encoding="utf-8")
    rows = results_table(results)
    columns = list(rows[0]) if rows else ["Task", "Version", "Filter", "n-shot", "Metric", "Value", "Stderr"]
    # pandas' "split" layout: what mlflow.log_table writes, so the UI shows it as a table; written
    # whole (log_table would append to an existing file and break idempotency).
    table = {"columns": columns, "data": [[row[c] for c in columns] for row in rows]}
    (directory / "results_table.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    with open(directory / "results_table.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    write_position_plot(directory, results)
    samples = sorted(samples_files(results_dir, results).values())
    if samples:
        (directory / "samples").mkdir()
    for source in samples:
        with open(source, encoding="utf-8", errors="replace") as reader, \
                open(directory / "samples" / source.name, "w", encoding="utf-8") as writer:
            writer.writelines(scrub_text(line, secrets) for line in reader)

