"""``LMEvalCallback``: lm-eval on the live training params every N steps/epochs, logged to the active run.

Framework-agnostic: it only needs an ``evaluate_fn(params) -> lm-eval results`` and a place in the
training loop to be called from. Tracking can fail; training must not. Whatever cannot be logged
is written to a spool dir as a results dir that ``flush_spool`` (or ``mlflow-lmeval sync``) publishes
later into the same run at the same step; that run may itself be spooled (``TrainingRun`` when
MLflow was down as training started), and is then published first.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError
from .results_file import RESULTS_FILE, live_results, write_results_file
from .tracking import (
    LIVE_PREFIX,
    SPOOL_DIR_NAME,
    SPOOLED_PREFIX,
    PublishOutcome,
    TrackingUnavailable,
    TrackingWarning,
    as_float,
    find_training_spools,
    flatten_metrics,
    http_limits,
    log_live_metrics,
    project_root,
    publish_results,
    publish_training_spool,
    resolve_tracking_uri,
    spooled_training_reference,
    tracking_error,
)

# JAX and MLflow imported lazily: 3.2 s and 2.0-3.4 s measured on this machine. The callback works
# without JAX (one process), and ``mlflow_lmeval`` itself must load without either.
PUBLISHED_MARKER = "published.json"


def _default_process_index() -> int:
    try:
        import jax
    except ImportError:
        return 0
    return jax.process_index()


def _json_default(value: Any) -> Any:
    """JAX/numpy scalars as floats; anything else JSON cannot hold as its text."""
    number = as_float(value)
    return number if number is not None else str(value)


def as_results(output: Mapping[str, Any]) -> dict[str, Any]:
    """lm-eval's whole output, or just its ``results`` mapping, as a whole output without samples."""
    if isinstance(output.get("results"), Mapping):
        results = {k: v for k, v in output.items() if k != "samples"}
    else:
        results = {"results": dict(output)}
    return json.loads(json.dumps(results, default=_json_default))


def write_spool_entry(spool_dir: str | os.PathLike, results: Mapping[str, Any], *, run_id: str | None,
                      step: int, timestamp_ms: int) -> Path:
    """Write a live evaluation as a results dir ``spool_dir/live-step<N>-<id>/results.json``.

    Written to a temporary name first, so a crash never leaves a half results.json to publish.
    """
    entry = Path(spool_dir) / f"live-step{int(step):09d}-{uuid.uuid4().hex[:8]}"
    entry.mkdir(parents=True, exist_ok=False)
    payload = live_results(results, run_id=run_id, step=step, timestamp_ms=timestamp_ms)
    write_results_file(entry, payload, default=_json_default)
    return entry


def pending_spool_entries(spool_dir: str | os.PathLike) -> list[Path]:
    """Spooled results dirs not yet published, oldest step first."""
    spool = Path(spool_dir)
    if not spool.is_dir():
        return []
    entries = (path.parent for path in spool.glob(f"*/{RESULTS_FILE}"))
    return sorted(entry for entry in entries if not (entry / PUBLISHED_MARKER).exists())


def flush_spool(spool_dir: str | os.PathLike, **publish_kwargs) -> list[PublishOutcome]:
    """Publish the training runs spooled in ``spool_dir``, then every pending spool entry
    (``publish_kwargs`` go to ``publish_results``); returns the entries' outcomes.

    Each published entry gets a ``published.json`` marker and is skipped next time; publishing is
    idempotent anyway. Raises TrackingUnavailable if the server is still down (the rest stay).
    """
    limits = {name: publish_kwargs.get(name) for name in ("tracking_uri", "max_retries", "timeout")}
    for training_spool in find_training_spools([spool_dir]):
        publish_training_spool(training_spool, **limits)
    outcomes = []
    for entry in pending_spool_entries(spool_dir):
        outcome = publish_results(entry, **publish_kwargs)
        (entry / PUBLISHED_MARKER).write_text(json.dumps({"run_id": outcome.run_id}), encoding="utf-8")
        outcomes.append(outcome)
    return outcomes


class LMEvalCallback:
    """Evaluate live params with lm-eval and log the scores to the active MLflow run.

    ``evaluate_fn(params)`` returns lm-eval's results (whole output or its ``results`` mapping).
    It runs on *every* process (a sharded model needs all hosts for its collectives); only process
    0 logs. Metric keys follow ``tracking.keys.metric_key`` with the live prefix
    (``lmeval_live/<task>/acc``) at the training step, apart from checkpoint evaluations of the
    same step (``lmeval/<task>/acc``) on the same run.

    Hooks, as in the trainer this replaces:
    - ``on_validation_epoch_start(epoch_idx, step_idx)``: evaluates when ``epoch_idx`` is a multiple
      of ``every_n_epochs`` or ``step_idx`` one of ``every_n_steps`` (both None: every call);
    - ``on_test_epoch_start(epoch_idx)``: always evaluates, at the last step seen;
    - ``callback(step, params)`` (also ``__call__``): evaluates when ``step`` is a multiple of
      ``every_n_steps`` (None: every call), so it can be called every step.
    The hooks take no params, so they use ``params_fn()`` (None if not given).

    On a tracking failure it warns, spools the results, and stops trying for ``retry_after_s`` so
    a dead server does not slow every evaluation; on recovery it flushes the spool itself.
    """

    def __init__(
        self,
        evaluate_fn: Callable[[Any], Mapping[str, Any]],
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        spool_dir: str | os.PathLike | None = None,
        tracking_uri: str | None = None,
        *,
        params_fn: Callable[[], Any] | None = None,
        process_index: Callable[[], int] | None = None,
        retry_after_s: float = 300.0,
        max_retries: int | None = None,
        timeout: float | None = None,
    ):
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        self.evaluate_fn, self.params_fn = evaluate_fn, params_fn
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.spool_dir = Path(spool_dir) if spool_dir is not None else project_root() / SPOOL_DIR_NAME
        self.tracking_uri = tracking_uri
        self.process_index = process_index or _default_process_index
        self.retry_after_s = retry_after_s
        self._limits = (max_retries, timeout)
        self.last_step = 0
        self._last_evaluated_step: int | None = None
        self._offline_until = 0.0
        self._warned_no_run = False
        self.history: dict[int, dict[str, float]] = {}  # step -> metrics logged or spooled

    # -- hooks ------------------------------------------------------------------------------

    def on_validation_epoch_start(self, epoch_idx: int, step_idx: int) -> dict[str, float] | None:
        """Evaluate if this epoch or step is due; returns the flattened metrics (None if skipped)."""
        self.last_step = int(step_idx)
        by_epoch = self.every_n_epochs is not None and epoch_idx % self.every_n_epochs == 0
        by_step = self.every_n_steps is not None and step_idx % self.every_n_steps == 0
        unfiltered = self.every_n_epochs is None and self.every_n_steps is None
        if not (by_epoch or by_step or unfiltered) or self._last_evaluated_step == step_idx:
            return None
        return self._evaluate(int(step_idx), self._live_params())

    def on_test_epoch_start(self, epoch_idx: int) -> dict[str, float] | None:
        """Evaluate unconditionally, logged at the last step seen."""
        return self._evaluate(self.last_step, self._live_params())

    def callback(self, step: int, params: Any) -> dict[str, float] | None:
        """Evaluate ``params`` at ``step`` if it is a multiple of ``every_n_steps``."""
        self.last_step = int(step)
        if self.every_n_steps is not None and step % self.every_n_steps != 0:
            return None
        return self._evaluate(int(step), params)

    __call__ = callback

    def flush_spool(self) -> list[PublishOutcome]:
        """Publish what was spooled during an outage; raises TrackingUnavailable if still down."""
        uri = self._tracking_uri()
        outcomes = flush_spool(self.spool_dir, tracking_uri=uri, max_retries=self._limits[0], timeout=self._limits[1])
        self._offline_until = 0.0
        return outcomes

    # -- internals --------------------------------------------------------------------------

    def _live_params(self) -> Any:
        return self.params_fn() if self.params_fn is not None else None

    def _tracking_uri(self) -> str:
        import mlflow

        return resolve_tracking_uri(self.tracking_uri or mlflow.get_tracking_uri())

    def _evaluate(self, step: int, params: Any) -> dict[str, float] | None:
        output = self.evaluate_fn(params)  # on every process: see the class docstring
        self._last_evaluated_step = step
        if self.process_index() != 0:
            return None
        results = as_results(output)
        metrics = flatten_metrics(results, LIVE_PREFIX)
        self.history[step] = metrics
        self._log(step, results, metrics)
        return metrics

    def _log(self, step: int, results: dict, metrics: dict[str, float]) -> None:
        """Log to the active run, or spool. Never raises for tracking trouble."""
        import mlflow

        timestamp_ms = int(time.time() * 1000)
        active = mlflow.active_run()
        run_id = active.info.run_id if active else spooled_training_reference()
        if run_id is None or run_id.startswith(SPOOLED_PREFIX):  # no run, or one MLflow has not got yet
            reason = "there is no active MLflow run" if run_id is None else "the training run is spooled"
            self._spool(results, run_id, step, timestamp_ms, None if self._warned_no_run else reason)
            self._warned_no_run = True
            return
        if time.monotonic() < self._offline_until:
            self._spool(results, run_id, step, timestamp_ms, None)
            return
        try:
            with http_limits(*self._limits):
                log_live_metrics(run_id, step, metrics, timestamp_ms, self._tracking_uri())
        except Exception as error:
            failure = tracking_error(error, self._tracking_uri(), f"logging lm-eval metrics at step {step}")
            self._offline_until = time.monotonic() + self.retry_after_s
            self._spool(results, run_id, step, timestamp_ms, str(failure))
            return
        if pending_spool_entries(self.spool_dir):
            self._flush_quietly()

    def _spool(self, results: dict, run_id: str | None, step: int, timestamp_ms: int, reason: str | None) -> None:
        try:
            entry = write_spool_entry(self.spool_dir, results, run_id=run_id, step=step, timestamp_ms=timestamp_ms)
        except OSError as error:
            warnings.warn(f"lm-eval metrics at step {step} are lost: cannot spool them in {self.spool_dir}: {error}",
                          TrackingWarning, stacklevel=4)
            return
        if reason:  # one warning per outage, not one per evaluation
            warnings.warn(f"{reason}; lm-eval metrics at step {step} spooled in {entry} "
                          f"(publish later with `mlflow-lmeval sync {self.spool_dir}`)", TrackingWarning, stacklevel=4)

    def _flush_quietly(self) -> None:
        try:
            self.flush_spool()
        except (TrackingUnavailable, UserError) as error:
            self._offline_until = time.monotonic() + self.retry_after_s
            warnings.warn(f"spooled lm-eval metrics not published yet: {error}", TrackingWarning, stacklevel=4)
