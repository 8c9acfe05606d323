"""A training run MLflow could not take, kept on disk until ``sync`` can publish it.

    <spool>/training-<identity>/
      training_run.json   identity, run id (if MLflow made one before the outage), experiment,
                          run name, params, tags, status, start and end time
      metrics.jsonl       one metric point a line: key, value, timestamp, step
      checkpoints.jsonl   one checkpoint a line: path, step, fingerprint

Lines are appended as training goes, so a crash loses at most the line being written (a torn
last line is skipped when read). Publishing compares with what MLflow holds and writes only what
is missing, so it can be repeated at any time. MLflow imported lazily (see store.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import store
from .logged_models import ensure_model
from .uri import resolve_tracking_uri

SPOOL_DIR_NAME = ".mlflow_lmeval_spool"  # under the project root, unless a spool dir is given
RECORD_FILE, METRICS_FILE, CHECKPOINTS_FILE = "training_run.json", "metrics.jsonl", "checkpoints.jsonl"
TERMINAL = frozenset({"FINISHED", "FAILED", "KILLED"})


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Whole or not at all: a temporary name first, then renamed."""
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
    staging.replace(path)


def _read_lines(path: Path) -> Iterator[dict]:
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue  # the torn last line of a crash


class TrainingSpool:
    """The writer: what a ``TrainingRun`` would have sent, appended to ``directory``."""

    def __init__(self, directory: Path):
        self.directory = directory

    @classmethod
    def create(cls, spool_dir: str | os.PathLike, *, identity: str, run_id: str | None, experiment: str,
               run_name: str | None, params: Mapping[str, str], tags: Mapping[str, str]) -> TrainingSpool:
        """Start a spool; raises OSError (the caller decides what a lost spool means)."""
        directory = Path(spool_dir) / f"training-{identity}"
        directory.mkdir(parents=True, exist_ok=True)
        record = {"format": "mlflow_lmeval.training_spool/1", "identity": identity, "run_id": run_id,
                  "experiment": experiment, "run_name": run_name, "params": dict(params), "tags": dict(tags),
                  "status": "RUNNING", "start_time": int(time.time() * 1000), "end_time": None}
        _write_json(directory / RECORD_FILE, record)
        return cls(directory)

    def _append(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        with open(self.directory / name, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, default=str) + "\n" for row in rows)

    def add_metrics(self, metrics: Iterable) -> None:
        """MLflow Metric entities (key, value, timestamp, step)."""
        self._append(METRICS_FILE, ({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                                    for m in metrics))

    def add_checkpoint(self, info: Mapping[str, Any]) -> None:
        self._append(CHECKPOINTS_FILE, [info])

    def finish(self, status: str) -> None:
        record = read_record(self.directory)
        record.update(status=status, end_time=int(time.time() * 1000))
        _write_json(self.directory / RECORD_FILE, record)


def read_record(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the training spool {directory}: {error}") from None
    if not isinstance(record, dict) or not record.get("identity"):
        raise UserError(f"{directory / RECORD_FILE} is not a training spool (no identity)")
    return record


def find_training_spools(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Training spools named or lying anywhere under the given paths (sorted, each once)."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if (path / RECORD_FILE).is_file():
            found[path] = None
        elif path.is_dir():
            found.update(dict.fromkeys(sorted(p.parent for p in path.rglob(RECORD_FILE))))
    return list(found)


def _find_or_create_run(client, uri: str, record: Mapping[str, Any]):
    """The run of this spool: the one it names, else the one ``sync`` made (its identity tag), else new.

    Its tags are those resolved when training started (source, user, git commit of the training).
    """
    with store.locked(uri):  # two syncs on this machine must not both create it
        for reference in filter(None, (record.get("run_id"), store.SPOOLED_PREFIX + record["identity"])):
            run = store.get_run_or_none(client, reference)
            if run is not None:
                return run, False
        experiment_id = store.ensure_experiment(client, record["experiment"], uri)
        tags = store.tag_list({**record.get("tags", {}), store.TAG_TRAINING_IDENTITY: record["identity"]})
        run = client.create_run(experiment_id, start_time=record.get("start_time"), run_name=record.get("run_name"),
                                tags={t.key: t.value for t in tags})
        return run, True


def _missing_points(client, run_id: str, points: list[dict]) -> list:
    """The spooled points MLflow lacks (same key, step, timestamp and value = already there)."""
    from mlflow.entities import Metric

    missing = []
    for key in sorted({point["key"] for point in points}):
        held = {(p.step, p.timestamp, p.value) for p in client.get_metric_history(run_id, key)}
        missing += [Metric(key, float(p["value"]), int(p["timestamp"]), int(p["step"])) for p in points
                    if p["key"] == key and (int(p["step"]), int(p["timestamp"]), float(p["value"])) not in held]
    return missing


def publish_training_spool(directory: str | os.PathLike, *, tracking_uri: str | None = None,
                           max_retries: int | None = None, timeout: float | None = None) -> tuple[str, bool]:
    """Make MLflow hold the spooled training run: (run id, whether anything was written).

    Creates the run once (found again by its identity tag), then adds the params, metric points and
    checkpoint LoggedModels it lacks, and its final status. Raises TrackingUnavailable when the
    server is unreachable, UserError on an unreadable spool.
    """
    from mlflow.entities import Param

    directory = Path(directory)
    record = read_record(directory)
    uri = resolve_tracking_uri(tracking_uri)
    with store.connected(uri, f"publishing the training spool {directory}", max_retries, timeout) as client:
        run, wrote = _find_or_create_run(client, uri, record)
        run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in record.get("params", {}).items() if k not in run.data.params]
        points = _missing_points(client, run_id, list(_read_lines(directory / METRICS_FILE)))
        store.log_batch(client, run_id, metrics=points, params=params)
        linked = {output.model_id for output in (run.outputs.model_outputs if run.outputs else [])}
        for info in _read_lines(directory / CHECKPOINTS_FILE):
            with store.locked(uri):
                model_id = ensure_model(client, run.info.experiment_id, info, run_id)
            wrote |= model_id not in linked
        status = record.get("status")
        if status in TERMINAL and run.info.status != status:
            client.set_terminated(run_id, status, end_time=record.get("end_time"))
            wrote = True
    return run_id, wrote or bool(params or points)
