"""The training run in MLflow: params, loss/throughput at steps, checkpoints as LoggedModels.
Whatever MLflow cannot take during an outage goes to a training spool for ``sync``.

MLflow imported lazily (see store.py).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from ..errors import UserError
from . import store
from .errors import TrackingUnavailable, TrackingWarning, tracking_error
from .keys import as_float, flatten_params, mlflow_key
from .logged_models import checkpoint_info, ensure_model
from .training_spool import SPOOL_DIR_NAME, TrainingSpool
from .uri import project_root, resolve_tracking_uri

# The reference of the training run being spooled in this process (None: none is); the live
# callback spools its evaluations for that run under it, as it logs into the active MLflow run.
_spooling_reference: str | None = None


def spooled_training_reference() -> str | None:
    """``spooled:<identity>`` of the training run this process spools because MLflow never took it."""
    return _spooling_reference


class TrainingRun:
    """The training run: params, metrics at steps, checkpoints as external LoggedModel outputs.

    Tracking must never stop training: the first failure to reach MLflow is warned about once,
    and from then on params, metrics, checkpoints and the final status go to a training spool in
    ``spool_dir`` (default ``<project root>/.mlflow_lmeval_spool``) instead, which ``mlflow-lmeval
    sync <spool_dir>`` publishes later: into this run, or into a run it creates if MLflow was down
    from the start. ``reference`` names the run for checkpoints' metadata either way. The run is
    made *active*, so ``LMEvalCallback`` logs into it. If a run is already active, it is adopted
    (and not ended here).

        with TrainingRun(experiment="xlstm", params=settings) as run:
            train(..., mlflow_run_id=run.run_id, on_log=run.log_metrics,
                  on_checkpoint=lambda step, path, _: run.log_checkpoint(step, path))
    """

    def __init__(self, *, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                 params: Mapping[str, Any] | None = None, spool_dir: str | os.PathLike | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment, self.run_name = store.experiment_name(experiment), run_name
        self._params = flatten_params(params or {})
        self.spool_dir = Path(spool_dir) if spool_dir is not None else project_root() / SPOOL_DIR_NAME
        self.identity = uuid.uuid4().hex  # tags the run, so ``sync`` finds a spooled one again
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.unavailable = False  # set on the first failure to reach MLflow
        self._spool: TrainingSpool | None = None
        self._owned = self._ended = False
        self._explicit_uri = tracking_uri is not None

    @property
    def reference(self) -> str | None:
        """The run id, else ``spooled:<identity>`` while MLflow has never held the run; None if not started."""
        if self.run_id:
            return self.run_id
        return store.SPOOLED_PREFIX + self.identity if self._spool is not None else None

    @property
    def spooling(self) -> bool:
        """Are params, metrics and checkpoints going to the training spool (after an outage)?"""
        return self._spool is not None and not self._ended

    def _guarded(self, doing: str, action: Callable[[], Any]) -> Any:
        if self.unavailable:
            return None
        try:
            with store.http_limits():
                return action()
        except Exception as error:
            failure = tracking_error(error, self.tracking_uri, doing)
            # Unreachable: stop trying (once warned), or every step would pay for the retries.
            self.unavailable = isinstance(failure, TrackingUnavailable) or self.run_id is None
            later = f"; tracking is off for the rest of this run{self._start_spool()}" if self.unavailable else ""
            warnings.warn(f"{failure}{later}", TrackingWarning, stacklevel=3)
            return None

    def _start_spool(self) -> str:
        """Spool from now on; returns how the warning should tell where (or that nothing is kept)."""
        global _spooling_reference
        from mlflow.tracking.context.registry import resolve_tags

        # The tags MLflow would have given the run here and now (source, user, git commit).
        tags = {**resolve_tags({"lmeval.kind": "training"}), store.TAG_TRAINING_IDENTITY: self.identity}
        try:
            self._spool = TrainingSpool.create(self.spool_dir, identity=self.identity, run_id=self.run_id,
                                               experiment=self.experiment, run_name=self.run_name,
                                               params=self._params, tags=tags)
        except OSError as error:
            return f"; nothing is kept, the spool cannot be written: {error}"
        if self.run_id is None:
            _spooling_reference = self.reference
        return f"; spooling it in {self._spool.directory} (publish later: mlflow-lmeval sync {self.spool_dir})"

    def start(self) -> TrainingRun:
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
                tags = {"lmeval.kind": "training", store.TAG_TRAINING_IDENTITY: self.identity}
                run = mlflow.start_run(experiment_id=self.experiment_id, run_name=self.run_name,
                                       tags={t.key: t.value for t in store.tag_list(tags)})
                self.run_id, self._owned = run.info.run_id, True
            if self._params:
                params = [Param(k, v) for k, v in self._params.items()]
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
        if self.spooling and entities:  # also the batch whose failure started the spool
            self._spooled("metrics", lambda: self._spool.add_metrics(entities))

    def log_checkpoint(self, step: int, path: str | os.PathLike) -> str | None:
        """Register the checkpoint at ``path`` as an external LoggedModel output at ``step``."""
        if not self.run_id and not self.spooling:
            return None

        def register():
            client = store.client(self.tracking_uri)
            with store.locked(self.tracking_uri):
                return ensure_model(client, self.experiment_id, info, self.run_id)

        try:
            info = {**checkpoint_info(path), "step": int(step)}
        except UserError as error:
            warnings.warn(f"checkpoint {path} not registered: {error}", TrackingWarning, stacklevel=2)
            return None
        model_id = self._guarded(f"registering checkpoint {path}", register) if self.run_id else None
        if self.spooling:
            self._spooled(f"checkpoint {path}", lambda: self._spool.add_checkpoint(info))
        return model_id

    def _spooled(self, what: str, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as error:
            warnings.warn(f"{what} lost: cannot write the spool {self._spool.directory}: {error}",
                          TrackingWarning, stacklevel=3)

    def end(self, status: str = "FINISHED") -> None:
        """End the run if this object started it (FINISHED, FAILED or KILLED)."""
        global _spooling_reference
        if self.spooling and (self._owned or self.run_id is None):  # a run we started, or would have
            self._ended = True
            self._spooled("the final status", lambda: self._spool.finish(status))
            if _spooling_reference == self.reference:
                _spooling_reference = None
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))
        return False


def start_training_run(**kwargs) -> TrainingRun:
    """A started ``TrainingRun`` (call ``.end()`` when done); see TrainingRun for the arguments."""
    return TrainingRun(**kwargs).start()
