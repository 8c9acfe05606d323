"""The training run in MLflow: params, loss/throughput at steps, checkpoints as LoggedModels.

MLflow imported lazily (see store.py).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Any, Callable, Mapping

from . import store
from .errors import TrackingUnavailable, TrackingWarning, tracking_error
from .keys import as_float, flatten_params, mlflow_key
from .logged_models import checkpoint_info, ensure_model
from .uri import resolve_tracking_uri


class TrainingRun:
    """The training run: params, metrics at steps, checkpoints as external LoggedModel outputs.

    Tracking must never stop training: the first failure to reach MLflow is warned about once,
    and from then on every call is a no-op. The run is made *active*, so ``LMEvalCallback`` logs
    into it. If a run is already active, it is adopted (and not ended here).

        with TrainingRun(experiment="xlstm", params=settings) as run:
            train(..., mlflow_run_id=run.run_id, on_log=run.log_metrics,
                  on_checkpoint=lambda step, path, _: run.log_checkpoint(step, path))
    """

    def __init__(self, *, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                 params: Mapping[str, Any] | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment, self.run_name = store.experiment_name(experiment), run_name
        self._params = dict(params or {})
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.unavailable = False  # set on the first failure to reach MLflow
        self._owned = False
        self._explicit_uri = tracking_uri is not None

    def _guarded(self, doing: str, action: Callable[[], Any]) -> Any:
        if self.unavailable:
            return None
        try:
            with store.http_limits():
                return action()
        except Exception as error:  # noqa: BLE001 - tracking must not stop training
            failure = tracking_error(error, self.tracking_uri, doing)
            # Unreachable: stop trying (once warned), or every step would pay for the retries.
            self.unavailable = isinstance(failure, TrackingUnavailable) or self.run_id is None
            later = "; tracking is off for the rest of this run" if self.unavailable else ""
            warnings.warn(f"{failure}{later}", TrackingWarning, stacklevel=3)
            return None

    def start(self) -> "TrainingRun":
        """Start (or adopt) the active run and log the params. Never raises on tracking failure."""
        def begin():
            import mlflow
            from mlflow.entities import Param

            active = mlflow.active_run()
            if active is not None:
                self.run_id, self.experiment_id = active.info.run_id, active.info.experiment_id
                if not self._explicit_uri:  # the adopted run lives in the global store
                    self.tracking_uri = resolve_tracking_uri(mlflow.get_tracking_uri())
            else:
                mlflow.set_tracking_uri(self.tracking_uri)
                client = store.client(self.tracking_uri)
                self.experiment_id = store.ensure_experiment(client, self.experiment, self.tracking_uri)
                tags = {t.key: t.value for t in store.tag_list({"lmeval.kind": "training"})}
                run = mlflow.start_run(experiment_id=self.experiment_id, run_name=self.run_name, tags=tags)
                self.run_id, self._owned = run.info.run_id, True
            if self._params:
                params = [Param(k, v) for k, v in flatten_params(self._params).items()]
                store.log_batch(store.client(self.tracking_uri), self.run_id, params=params)

        self._guarded("starting the training run", begin)
        return self

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log numeric metrics (JAX/numpy scalars welcome) at ``step``; e.g. loss, tokens_per_s."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entities = [Metric(mlflow_key(*str(k).split("/")), v, now, int(step))
                    for k, v in ((k, as_float(v)) for k, v in metrics.items()) if v is not None]
        if self.run_id and entities:
            self._guarded("logging metrics",
                          lambda: store.log_batch(store.client(self.tracking_uri), self.run_id, metrics=entities))

    def log_checkpoint(self, step: int, path: str | os.PathLike) -> str | None:
        """Register the checkpoint at ``path`` as an external LoggedModel output at ``step``."""
        if not self.run_id:
            return None

        def register():
            info = {**checkpoint_info(path), "step": int(step)}
            client = store.client(self.tracking_uri)
            with store.locked(self.tracking_uri):
                return ensure_model(client, self.experiment_id, info, self.run_id)

        return self._guarded(f"registering checkpoint {path}", register)

    def end(self, status: str = "FINISHED") -> None:
        """End the run if this object started it (FINISHED, FAILED or KILLED)."""
        if not self._owned:
            return
        import mlflow

        self._owned = False
        if self.unavailable:
            # Pop the fluent run stack without another slow round of retries against a dead server.
            with contextlib.suppress(Exception), store.http_limits(max_retries=0, timeout=2):
                mlflow.end_run(status)
            return
        self._guarded("ending the training run", lambda: mlflow.end_run(status))

    def __enter__(self) -> "TrainingRun":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))
        return False


def start_training_run(**kwargs) -> TrainingRun:
    """A started ``TrainingRun`` (call ``.end()`` when done); see TrainingRun for the arguments."""
    return TrainingRun(**kwargs).start()
