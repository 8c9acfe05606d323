"""Making MLflow hold what results dirs hold, exactly once: ``publish_results``, ``sync``, and every
evaluation's metrics also on its training run, at its step (the learning curves).

``results.json`` is the source of truth; publishing only reads it, so it can be repeated at any
time (after an outage, after a DVC run-cache hit) and never duplicates a run, a metric or a model.
MLflow imported lazily (see store.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..results_file import (
    RESULTS_FILE,
    checkpoint_section,
    evaluated_step,
    find_results_dirs,
    live_target,
    read_results,
    recorded_training_run_id,
)
from . import store
from .errors import TrackingUnavailable, TrackingWarning
from .identity import TAG_IDENTITY, evaluation_identity, evaluation_timestamp_ms
from .keys import LIVE_PREFIX, flatten_metrics
from .logged_models import checkpoint_info, ensure_model, training_run_by_fingerprint
from .redact import redact_uri
from .run_contents import TAG_MODEL_ID, complete_run
from .training_spool import find_training_spools, publish_training_spool
from .uri import resolve_tracking_uri

TAG_PUBLISHER = "lmeval.publisher"  # host:pid of the process writing the run, to tell live from abandoned
# A RUNNING run written from another machine is taken for abandoned after this long.
ABANDONED_AFTER_S = 3600


@dataclasses.dataclass(frozen=True)
class PublishOutcome:
    """What publishing one results dir did.

    ``created`` is True when this call wrote the evaluation to MLflow (a new run, or completing a
    partial one), False when MLflow already held it and nothing was written.
    """

    run_id: str
    created: bool
    model_id: str | None = None
    results_dir: str | None = None


def _find_evaluation_runs(client, experiment_ids: list[str], identity: str) -> list:
    """Runs of this identity, newest first (deleted ones excluded)."""
    return list(client.search_runs(
        experiment_ids, filter_string=f"tags.`{TAG_IDENTITY}` = '{identity}'",
        order_by=["attributes.start_time DESC"], max_results=50,
    ))


def _the_one_kept(runs: list):
    """Of the runs of one identity, the one publishers keep: the FINISHED run with the smallest id."""
    finished = sorted((run for run in runs if run.info.status == "FINISHED"), key=lambda r: r.info.run_id)
    return finished[0] if finished else None


def evaluation_run(client, identity: str):
    """The run of an evaluation identity in any active experiment: the one ``sync`` keeps, else
    (still being published) its run with the smallest id; None if MLflow has none."""
    experiment_ids = store.active_experiment_ids(client)
    runs = _find_evaluation_runs(client, experiment_ids, identity) if experiment_ids else []
    return _the_one_kept(runs) or min(runs, key=lambda r: r.info.run_id, default=None)


def _publisher() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _is_abandoned(run) -> bool:
    """Is this unfinished run a leftover of a publish that died, rather than one in progress?"""
    if run.info.status != "RUNNING":
        return True  # FAILED or KILLED: whoever wrote it has stopped
    host, _, pid = (run.data.tags.get(TAG_PUBLISHER) or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return int(pid) == os.getpid()  # our own, from an attempt that raised
    return time.time() - run.info.start_time / 1000 > ABANDONED_AFTER_S


def _keep_one_finished(client, experiment_id: str, identity: str):
    """Delete all but one FINISHED run of an identity; return the one kept.

    Publishers on different machines can each create a run for the same evaluation. Each calls
    this after finishing its own, and all keep the smallest run id: whoever finishes last sees
    every finished run, so exactly one survives. Their contents are equal (same results.json).
    """
    finished = sorted((r for r in _find_evaluation_runs(client, [experiment_id], identity)
                       if r.info.status == "FINISHED"), key=lambda r: r.info.run_id)
    for duplicate in finished[1:]:
        client.delete_run(duplicate.info.run_id)
    return finished[0] if finished else None


def _mark_failed(client, run_id: str) -> None:
    """Best effort, one quick try: a dead server cannot be told, and the next publish completes it."""
    with contextlib.suppress(Exception), store.http_limits(max_retries=0):
        client.set_terminated(run_id, "FAILED")


def _publish_evaluation(client, uri: str, results_dir: Path, results: dict, experiment: str | None,
                        training_run_id: str | None) -> PublishOutcome:
    """Publish a checkpoint's evaluation as a child run of its training run; holding the store's lock."""
    step = evaluated_step(results)
    parent, training_run_id, experiment_id = find_training_run(client, uri, results, experiment, training_run_id)
    if training_run_id and parent is None:
        warnings.warn(f"training run {training_run_id} is not in {redact_uri(uri)}; publishing without a parent link",
                      TrackingWarning, stacklevel=3)
    training_run_id = parent.info.run_id if parent else training_run_id  # a spooled reference resolved
    identity = evaluation_identity(results)

    runs = _find_evaluation_runs(client, [experiment_id], identity[TAG_IDENTITY])
    run = _the_one_kept(runs)
    if run is not None:  # published before, maybe by a version that left the training run without it
        if parent is not None:
            _link_to_parent(client, run, parent.info.run_id)
            _log_points_once(client, parent.info.run_id, step, flatten_metrics(results),
                             evaluation_timestamp_ms(results, run_start_ms=run.info.start_time))
        return PublishOutcome(run.info.run_id, False, run.data.tags.get(TAG_MODEL_ID), str(results_dir))

    leftover = next((run for run in runs if _is_abandoned(run)), None)
    if leftover is not None:  # an interrupted publish: complete it
        run = leftover
        client.set_tag(run.info.run_id, TAG_PUBLISHER, _publisher())
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        from mlflow.tracking.context.registry import resolve_tags

        tags = {**identity, TAG_PUBLISHER: _publisher(),
                **({"mlflow.parentRunId": parent.info.run_id} if parent else {})}
        run = client.create_run(experiment_id, run_name=f"eval-step-{step}",
                                tags={t.key: t.value for t in store.tag_list(resolve_tags(tags))})
    run_id = run.info.run_id
    try:
        model_id = None
        checkpoint = checkpoint_section(results)
        if checkpoint.get("fingerprint"):
            model_id = ensure_model(client, experiment_id, checkpoint_info(checkpoint),
                                    parent.info.run_id if parent else None)
        complete_run(client, run, results_dir, results, identity, training_run_id, step, model_id,
                     evaluation_timestamp_ms(results, run_start_ms=run.info.start_time))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        _mark_failed(client, run_id)
        raise
    kept = _keep_one_finished(client, experiment_id, identity[TAG_IDENTITY])
    if parent is not None:  # the learning curve: this checkpoint's scores on the training run, at its step
        # Timed by the run every later publish finds (the one kept), so a repeat sees these points.
        _log_points_once(client, parent.info.run_id, step, flatten_metrics(results),
                         evaluation_timestamp_ms(results, run_start_ms=kept.info.start_time))
    return PublishOutcome(kept.info.run_id, kept.info.run_id == run_id, model_id, str(results_dir))


def find_training_run(client, uri: str, results: Mapping, experiment: str | None,
                      training_run_id: str | None = None) -> tuple[Any, str | None, str]:
    """(the training run or None, its reference, the evaluation's experiment id) for ``results``.

    The run ``training_run_id`` names, else the one results.json records (``recorded_training_run_id``),
    else the source run of the checkpoint's LoggedModel, found by fingerprint in the experiment
    (``training_run_by_fingerprint``): the pipeline's checkpoints hold no run id. The experiment is
    ``experiment``, else the training run's (``store.resolve_experiment_id``). A reference the
    store does not hold (yet) comes back with None for the run, for the caller to warn of.
    """
    reference = training_run_id or recorded_training_run_id(results)
    parent = store.get_run_or_none(client, reference) if reference else None
    experiment_id = store.resolve_experiment_id(client, uri, experiment, parent)
    fingerprint = checkpoint_section(results).get("fingerprint")
    if reference is None and isinstance(fingerprint, str):
        reference = training_run_by_fingerprint(client, experiment_id, fingerprint)
        parent = store.get_run_or_none(client, reference) if reference else None
    return parent, reference, experiment_id


def _link_to_parent(client, run, parent_run_id: str) -> None:
    """Make an evaluation published before its training run was in MLflow (spooled) its child."""
    if "mlflow.parentRunId" not in run.data.tags:
        store.log_batch(client, run.info.run_id, tags=store.tag_list(
            {"mlflow.parentRunId": parent_run_id, "lmeval.training_run_id": parent_run_id}))


def _log_points_once(client, run_id: str, step: int, metrics: Mapping[str, float], timestamp_ms: int) -> bool:
    """Log ``metrics`` at ``step`` with the evaluation's fixed timestamp, unless they are there already.

    One batch per evaluation, so the first key's history tells whether it went in; MLflow's store
    would also drop an identical point, but this spares sending it. False if nothing was logged.
    """
    from mlflow.entities import Metric

    items = sorted((key, float(value)) for key, value in metrics.items())
    if not items:
        return False
    probe = client.get_metric_history(run_id, items[0][0])
    if any(point.step == step and point.timestamp == timestamp_ms for point in probe):
        return False
    store.log_batch(client, run_id, metrics=[Metric(key, value, timestamp_ms, step) for key, value in items])
    return True


def _training_run_id(client, uri: str, reference: str) -> str:
    """The id of the training run a live evaluation names; a spooled one must have been synced."""
    if not reference.startswith(store.SPOOLED_PREFIX):
        return reference
    run = store.get_run_or_none(client, reference)
    if run is None:
        raise UserError(f"training run {reference} is not in {redact_uri(uri)} yet: sync its training spool first")
    return run.info.run_id


def log_live_metrics(run_id: str, step: int, metrics: Mapping[str, float], timestamp_ms: int,
                     tracking_uri: str | None = None) -> bool:
    """Log metrics into an existing run at ``step``; False if that exact point is already there.

    A fixed timestamp makes a repeat a no-op in MLflow's store, and the check keeps us from even
    sending one. Raises MLflow's own errors: callers decide what a failure means.
    """
    return _log_points_once(store.client(resolve_tracking_uri(tracking_uri)), run_id, step, metrics, timestamp_ms)


def publish_results(
    results_dir: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    training_run_id: str | None = None,
    max_retries: int | None = None,
    timeout: float | None = None,
) -> PublishOutcome:
    """Make MLflow hold the evaluation in ``results_dir``, exactly once.

    One child run of the training run (``training_run_id``, else ``checkpoint.mlflow_run_id`` in
    results.json, else the one that logged the checkpoint's model: ``find_training_run``),
    identified by checkpoint fingerprint x task-config digest x score settings. A FINISHED run with
    that identity means nothing is written; a RUNNING/FAILED one left by an interrupted publish is
    completed. Metrics go in at the checkpoint's step, also on
    the checkpoint's LoggedModel with each task as dataset.

    The metrics also go on the training run at the checkpoint's step (``lmeval/<task>/<metric>``),
    once, with the evaluation's timestamp: a run published without them (an older version) gets
    them now. A live evaluation spooled by ``LMEvalCallback`` (``"live"`` in results.json) goes only
    into its training run at its step, as ``lmeval_live/<task>/<metric>``.

    ``experiment`` None means: the training run's experiment, else ``MLFLOW_EXPERIMENT_NAME``,
    else ``mlflow_lmeval``. Raises TrackingUnavailable (exit 3) when the server is unreachable or
    refuses access, TrackingError (exit 4) when it rejects the data, UserError on a bad results dir.
    """
    results_dir = Path(results_dir)
    results = read_results(results_dir)
    uri = resolve_tracking_uri(tracking_uri)
    with store.connected(uri, f"publishing {results_dir}", max_retries, timeout) as client:
        target = live_target(results)
        if target is not None:
            reference, step = target
            run_id = _training_run_id(client, uri, reference)
            created = _log_points_once(client, run_id, step, flatten_metrics(results, LIVE_PREFIX),
                                       evaluation_timestamp_ms(results))
            return PublishOutcome(run_id, created, None, str(results_dir))
        with store.locked(uri):
            return _publish_evaluation(client, uri, results_dir, results, experiment, training_run_id)


def sync(results_dirs: Iterable[str | os.PathLike], **kwargs) -> list[PublishOutcome]:
    """Publish every results dir (or tree of them) that MLflow lacks; a second run writes nothing.

    Training spools among them (a ``TrainingRun`` during an outage) go first, so the evaluations
    find their training run. ``kwargs`` go to ``publish_results``. Returns the evaluations'
    outcomes. A path with nothing to publish in it or below it is refused before anything is
    published (a mistyped directory, not "all done"). Stops at the first TrackingUnavailable (no
    point hammering a dead server); other bad dirs are reported together after the rest are published.
    """
    spools, directories, empty = {}, {}, []
    for path in results_dirs:
        found_spools, found_dirs = find_training_spools([path]), find_results_dirs([path])
        if not found_spools and not found_dirs:
            empty.append(str(path))
        spools.update(dict.fromkeys(found_spools))
        directories.update(dict.fromkeys(found_dirs))
    if empty:
        raise UserError(f"nothing to publish in {', '.join(empty)}: no {RESULTS_FILE} (nor a training spool) there or below")
    outcomes, failures = [], []
    limits = {name: kwargs.get(name) for name in ("tracking_uri", "max_retries", "timeout")}
    for spool in spools:
        try:
            publish_training_spool(spool, **limits)
        except UserError as error:
            failures.append(f"{spool}: {error}")
    for directory in directories:
        try:
            outcomes.append(publish_results(directory, **kwargs))
        except TrackingUnavailable:
            raise
        except UserError as error:
            failures.append(f"{directory}: {error}")
    if failures:
        error = UserError(f"{len(failures)} results dir(s) not published: " + "; ".join(failures))
        error.outcomes = outcomes  # what did get published, for callers that want to report it
        raise error
    return outcomes
