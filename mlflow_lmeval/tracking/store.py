"""Talking to the tracking store: a client, this machine's lock on it, bounded HTTP retries,
experiments, runs, and batches within MLflow's limits.

MLflow imported lazily: ``import mlflow`` took 2.0-3.4 s on this machine (``from mlflow import
MlflowClient`` 2.3 s), and importing this package must stay cheap for the CLI and for
``TrackingUnavailable``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..paths import writable_directory_problem
from . import store_lock
from .errors import TrackingError, translated
from .keys import fit_key, key_part
from .redact import env_secrets, redact_uri, scrub_text
from .uri import resolve_tracking_uri, sqlite_file

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_EXPERIMENT = "mlflow_lmeval"
DEFAULT_MAX_RETRIES = 2  # with backoff factor 1: a dead server costs ~2-3 s per request, not minutes
DEFAULT_TIMEOUT_S = 10
_MAX_TAG_VALUE = 8000
_BATCH_METRICS, _BATCH_PARAMS_TAGS = 1000, 100  # MLflow's per-request batch limits
# MLflow 3.17's UI opens an experiment of this kind in its machine-learning view, not the GenAI one.
TAG_EXPERIMENT_KIND, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
# A training run MLflow does not hold yet is referred to as ``spooled:<identity>`` (in checkpoints'
# metadata and live spool entries); ``sync`` creates it with this tag, so the reference finds it.
TAG_TRAINING_IDENTITY = "lmeval.training_identity"
SPOOLED_PREFIX = "spooled:"
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
             "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")


@contextlib.contextmanager
def http_limits(max_retries: int | None = None, timeout: float | None = None) -> Iterator[None]:
    """Bound MLflow's HTTP retries for the duration of a block.

    MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) make a dead server hang a
    caller for minutes. An explicit argument wins, then the user's own environment, then ours.
    MLflow reads these variables on every request, so setting them around a call is enough.
    """
    saved = {name: os.environ.get(name) for name in _HTTP_ENV}
    retries, seconds, backoff, jitter = (saved[name] for name in _HTTP_ENV)
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": max_retries if max_retries is not None else retries or DEFAULT_MAX_RETRIES,
        "MLFLOW_HTTP_REQUEST_TIMEOUT": int(timeout) if timeout is not None else seconds or DEFAULT_TIMEOUT_S,
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": backoff or 1,
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": jitter or 0.5,
    }
    os.environ.update({name: str(value) for name, value in wanted.items()})
    # urllib3 logs each retry as a WARNING ("Retrying (Retry(total=0, ...)) after connection broken
    # by ..."), which lm-eval's root handler prints above our one line; that line says it all.
    retries_log = logging.getLogger("urllib3.connectionpool")
    level = retries_log.level
    retries_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        retries_log.setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_uri(uri: str) -> None:
    """A one-line UserError (exit 2) for an absolute tracking URI that no store can be made of,
    found before any work: a scheme MLflow has no store for, a local store whose directory cannot
    be written, or MLflow's file store where MLflow 3 refuses it. Whether a server answers is left
    to publishing: the evaluation runs anyway, and ``sync`` publishes it later."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    where = redact_uri(uri)
    try:
        _tracking_store_registry.get_store_builder(uri)
    except UnsupportedModelRegistryStoreURIException as error:
        schemes = ", ".join(scheme for scheme in error.supported_uri_schemes if scheme)
        scheme = urllib.parse.urlparse(uri).scheme
        raise UserError(f"tracking URI {where}: MLflow has no store for the scheme {scheme!r} (known: {schemes})") from None
    if (database := sqlite_file(uri)) is not None:
        directory, what = database.parent, "database"
        if database.is_dir():
            raise UserError(f"tracking URI {where}: {database} is a directory, not a database file")
    elif uri.startswith("file:"):
        directory, what = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)), "file store"
    else:
        return
    problem = writable_directory_problem(directory)
    if problem:
        raise UserError(f"tracking URI {where}: cannot write the {what}'s directory {directory}: {problem}")
    if what == "file store" and not MLFLOW_ALLOW_FILE_STORE.get():
        raise UserError(f"tracking URI {where} is MLflow's file store, which MLflow 3 refuses unless "
                        f"MLFLOW_ALLOW_FILE_STORE=true; a database works: sqlite:///{directory}/mlflow.db")


def locked(uri: str):
    """This machine's lock on the store (see store_lock.py); the notice names it without secrets."""
    return store_lock.store_lock(uri, redact_uri(uri))


_opened_sqlite: set[str] = set()


def client(uri: str):
    """An MlflowClient of the store; the first open of a SQLite file in this process holds the lock."""
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:") or uri in _opened_sqlite:
        return MlflowClient(tracking_uri=uri)
    # The first open of a new SQLite file migrates its schema; two processes at once fail.
    with locked(uri):
        opened = MlflowClient(tracking_uri=uri)
        opened.search_experiments(max_results=1)
    _opened_sqlite.add(uri)
    return opened


@contextlib.contextmanager
def connected(uri: str, doing: str, max_retries: int | None = None, timeout: float | None = None) -> Iterator[Any]:
    """A client of the store, with bounded retries, whose failures become one-line TrackingErrors."""
    with http_limits(max_retries, timeout), translated(uri, doing):
        yield client(uri)


def experiment_name(experiment: str | None) -> str:
    """The experiment asked for, else ``MLFLOW_EXPERIMENT_NAME``, else ``mlflow_lmeval``."""
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def ensure_experiment(mlflow_client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing, marked as model development.

    With a SQLite store, artifacts go beside the database (``mlartifacts/``) rather than into
    ``./mlruns`` of whatever directory the process started in.
    """
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if (database := sqlite_file(uri)) is not None:
            location = (database.parent / "mlartifacts" / key_part(name).replace(" ", "_")).as_uri()
        try:
            return mlflow_client.create_experiment(name, artifact_location=location,
                                                   tags={TAG_EXPERIMENT_KIND: MODEL_DEVELOPMENT})
        except Exception:
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"experiment {name!r} is deleted; restore it in MLflow or pick another --experiment")
    if not (experiment.tags or {}).get(TAG_EXPERIMENT_KIND):  # a kind the user chose stays
        mlflow_client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, MODEL_DEVELOPMENT)
    return experiment.experiment_id


def set_experiment(name: str | None = None, tracking_uri: str | None = None) -> str:
    """Point MLflow's own API (``mlflow.start_run``...) at an experiment of the project's store, as
    ``mlflow.set_experiment`` does; returns the experiment's id.

    The store is ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<project
    root>/mlflow.db``; the experiment ``name``, else ``MLFLOW_EXPERIMENT_NAME``, else
    ``mlflow_lmeval``, created if missing (``ensure_experiment``: a SQLite store's artifacts beside
    its database). The experiments MLflow makes itself, its ``Default`` one and
    ``mlflow.set_experiment``'s, keep their artifacts in ``./mlruns`` of the directory the process
    runs in, and so would every evaluation run published under a run of theirs.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    with connected(uri, "setting the experiment") as mlflow_client:
        experiment_id = ensure_experiment(mlflow_client, experiment_name(name), uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def resolve_experiment_id(mlflow_client, uri: str, experiment: str | None, parent_run) -> str:
    """An explicit experiment wins; else the training run's (so children nest under it in the UI);
    else ``MLFLOW_EXPERIMENT_NAME``; else ``mlflow_lmeval``."""
    if experiment is None and parent_run is not None:
        return parent_run.info.experiment_id
    return ensure_experiment(mlflow_client, experiment_name(experiment), uri)


def active_experiment_ids(mlflow_client) -> list[str]:
    """Every experiment of the store that is not deleted."""
    from mlflow.entities import ViewType

    return [e.experiment_id for e in mlflow_client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def get_run_or_none(mlflow_client, run_id: str):
    """The run, or None when this store does not know it (a checkpoint from another server).

    ``run_id`` may also be a ``spooled:<identity>`` reference: the run ``sync`` made of that
    training spool, None before it has.
    """
    from mlflow.exceptions import MlflowException

    if run_id.startswith(SPOOLED_PREFIX):
        identity = run_id[len(SPOOLED_PREFIX):]
        experiment_ids = active_experiment_ids(mlflow_client)
        runs = mlflow_client.search_runs(
            experiment_ids, filter_string=f"tags.`{TAG_TRAINING_IDENTITY}` = '{key_part(identity)}'",
            order_by=["attributes.start_time ASC"], max_results=1) if experiment_ids else []
        return runs[0] if runs else None
    try:
        return mlflow_client.get_run(run_id)
    except MlflowException as error:
        if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(error).lower():
            return None
        raise


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def log_batch(mlflow_client, run_id: str, metrics: Iterable = (), params: Iterable = (), tags: Iterable = ()) -> None:
    """``log_batch`` of MLflow entities within MLflow's per-request limits."""
    for chunk in _chunks(list(metrics), _BATCH_METRICS):
        mlflow_client.log_batch(run_id, metrics=chunk)
    for chunk in _chunks(list(params), _BATCH_PARAMS_TAGS):
        mlflow_client.log_batch(run_id, params=chunk)
    for chunk in _chunks(list(tags), _BATCH_PARAMS_TAGS):
        mlflow_client.log_batch(run_id, tags=chunk)


def tag_list(tags: Mapping[str, Any]) -> list:
    """RunTag entities within MLflow's limits, secrets scrubbed; None values left out."""
    from mlflow.entities import RunTag

    secrets = env_secrets()
    return [RunTag(fit_key(k), scrub_text(str(v), secrets)[:_MAX_TAG_VALUE]) for k, v in tags.items() if v is not None]


_CONFLICT_HINTS = ("integrityerror", "unique constraint", "duplicate key")


def retry_on_conflict(action: Callable[[], Any], attempts: int = 3) -> Any:
    """MLflow's store creates a task's dataset row on first use without handling a concurrent
    insert of the same row; a second try finds the row the other publisher made."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as error:
            if attempt == attempts - 1 or not any(hint in str(error).lower() for hint in _CONFLICT_HINTS):
                raise
            time.sleep(0.2 * (attempt + 1))
