"""MLflow tracking: evaluation runs linked to training runs, checkpoints as LoggedModels, idempotent sync.

``results.json`` is the source of truth. Everything here only *reads* it and makes MLflow agree
with it, so publishing can be repeated at any time (after an outage, after a DVC run-cache hit)
and never duplicates a run, a metric or a model.

Layout: pure functions first (metric names, tables, digests, redaction, URIs), then thin MLflow
adapters (``publish_results``, ``sync``, ``ensure_checkpoint_model``, ``TrainingRun``). MLflow is
imported lazily: it takes over a second, and ``TrackingUnavailable`` must be cheap to import.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from . import config as config_module
from . import store_lock
from .errors import UserError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RESULTS_FILE = "results.json"
DEFAULT_EXPERIMENT = "mlflow_lmeval"
DEFAULT_MAX_RETRIES = 2  # with backoff factor 1: a dead server costs ~2-3 s per request, not minutes
DEFAULT_TIMEOUT_S = 10
REDACTED = "[REDACTED]"

# Tags that identify an evaluation; the identity tag is what idempotent publishing searches for.
TAG_IDENTITY = "lmeval.identity"
TAG_FINGERPRINT = "lmeval.fingerprint"
TAG_TASK_DIGEST = "lmeval.task_config_digest"
TAG_SETTINGS_DIGEST = "lmeval.settings_digest"
TAG_MODEL_ID = "lmeval.model_id"
TAG_PUBLISHER = "lmeval.publisher"  # host:pid of the process writing the run, to tell live from abandoned
# A RUNNING run written from another machine is taken for abandoned after this long.
ABANDONED_AFTER_S = 3600

_NOT_METRICS = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})
# Entries of lm-eval's own ``config`` section that cannot change a score (our settings say so in
# EvalConfig's metadata). Everything else, including entries added later, counts towards the
# identity, which errs on the safe side.
_LM_EVAL_NON_SCORE = frozenset({
    "batch_size", "batch_sizes", "device", "use_cache", "model", "show_progress", "cache_requests", "write_out",
    "log_samples",
})
_MAX_KEY = 250  # MLflow's limit on metric/param/tag keys
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_BATCH_METRICS, _BATCH_PARAMS_TAGS = 1000, 100  # MLflow's per-request batch limits


class TrackingError(UserError):
    """Publishing failed for another reason (MLflow refused a value, a run is missing, a local
    file could not be staged); the results stay on disk."""

    exit_code = 4


class TrackingUnavailable(TrackingError):
    """The tracking server is unreachable or refused our credentials."""

    exit_code = 3


class TrackingWarning(UserWarning):
    """A tracking failure that training survives (the results wait in a spool)."""


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


# ----------------------------------------------------------------------------------------------
# Metric names and tables (pure)
# ----------------------------------------------------------------------------------------------


def _key_part(text: Any) -> str:
    """One path component of an MLflow key: MLflow accepts only ``[/\\w.\\- :]``."""
    text = str(text).replace("@", "_at_").replace("/", "_")
    text = re.sub(r"[^\w.\- :]", "_", text)
    # MLflow also rejects keys that a path normalisation would change ("a/./b", "a/../b").
    return "_" if text in ("", ".", "..") else text


def _fit_key(key: str) -> str:
    """Keep a key within MLflow's length limit, staying unique by a short hash of the original."""
    if len(key) <= _MAX_KEY:
        return key
    return key[: _MAX_KEY - 9] + "-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def metric_key(task: str, lm_eval_key: str) -> str | None:
    """lm-eval's ``"<metric>,<filter>"`` key as an MLflow metric key, or None if it is no metric.

    ``("arc", "acc,none")`` -> ``"lmeval/arc/acc"``; ``("gsm8k", "exact_match,strict-match")`` ->
    ``"lmeval/gsm8k/exact_match/strict-match"``; ``"alias"``, ``"name"``, ``"sample_len"`` -> None.
    Characters MLflow rejects become ``_`` (``@`` becomes ``_at_``).
    """
    metric, _, filter_name = str(lm_eval_key).partition(",")
    if not metric or metric in _NOT_METRICS:
        return None
    parts = ["lmeval", _key_part(task), _key_part(metric)]
    if filter_name and filter_name != "none":
        parts.append(_key_part(filter_name))
    return _fit_key("/".join(parts))


def as_float(value: Any) -> float | None:
    """A metric value as a Python float; None for strings ("N/A"), bools, None and arrays.

    Accepts numpy and JAX scalars (anything with ``__float__`` that is a single number).
    """
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _task_sections(results_dict: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(task or group name, its metrics) for every task and group, each once."""
    sections = results_dict.get("results") if isinstance(results_dict.get("results"), Mapping) else results_dict
    seen = set()
    for source in (sections, results_dict.get("groups") or {}):
        for name, values in source.items():
            if isinstance(values, Mapping) and name not in seen:
                seen.add(name)
                yield name, values


def flatten_metrics(results_dict: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric metric and stderr of every task and group, keyed by ``metric_key``.

    Takes lm-eval's whole output (with ``"results"``) or just its ``results`` mapping.
    "N/A" and other non-numeric values are left out.
    """
    flat = {}
    for task, values in _task_sections(results_dict):
        for raw_key, value in values.items():
            key, number = metric_key(task, raw_key), as_float(value)
            if key is not None and number is not None:
                flat[key] = number
    return flat


def _table_value(value: Any) -> Any:
    number = as_float(value)
    return number if number is not None else (None if value is None else str(value))


def results_table(results_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric, filter): Task, Version, Filter, n-shot, Metric, Value, Stderr.

    Also the raw ``lm-eval key`` and the ``MLflow key`` it maps to, so the mapping stays visible.
    """
    versions, n_shot = results_dict.get("versions") or {}, results_dict.get("n-shot") or {}
    rows = []
    for task, values in _task_sections(results_dict):
        for raw_key, value in values.items():
            metric, _, filter_name = str(raw_key).partition(",")
            if metric in _NOT_METRICS or metric.endswith("_stderr") or metric_key(task, raw_key) is None:
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}" if filter_name else f"{metric}_stderr", "N/A")
            rows.append({
                "Task": task,
                "Version": _table_value(versions.get(task, "N/A")),
                "Filter": filter_name or "none",
                "n-shot": _table_value(n_shot.get(task, "N/A")),
                "Metric": metric,
                "Value": _table_value(value),
                "Stderr": _table_value(stderr),
                "lm-eval key": raw_key,
                "MLflow key": metric_key(task, raw_key),
            })
    return rows


# ----------------------------------------------------------------------------------------------
# Secrets (pure)
# ----------------------------------------------------------------------------------------------

# Words that mark a secret anywhere in a key, and short words that must stand alone ("key" in
# "api_key", not in "monkey"; "token" in "hf_token", not in "tokenizer_path").
_STRONG_SECRET = re.compile(r"password|passwd|passphrase|secret|credential|apikey|private_key", re.I)
_WEAK_SECRET = re.compile(r"(?:^|[^a-z])(?:key|token|pass|authorization|cookie)(?:$|[^a-z])", re.I)
_URI_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@\"']+@")
# "token=abc" inside a string (lm-eval's model_args, query strings); "=" only, so prose survives.
_INLINE_SECRET = re.compile(r"(\b[\w.\-]*(?:password|passwd|secret|token|api_?key|access_key)=)([^\s,;&\"'}]+)", re.I)


def is_secret_key(key: str) -> bool:
    """Does a config key or environment variable name look like it holds a credential?"""
    return bool(_STRONG_SECRET.search(key) or _WEAK_SECRET.search(key))


def _env_secrets() -> list[str]:
    """Values of secret-looking environment variables (long enough not to be a common word)."""
    values = {
        value for name, value in os.environ.items()
        if is_secret_key(name) and len(value) >= 6 and value.lower() not in ("true", "false", "none", "null")
    }
    return sorted(values, key=len, reverse=True)  # longest first, so no secret is half-replaced


def scrub_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """Remove ``user:pass@`` from URIs, ``token=...`` pairs, and secret env values from text."""
    text = _URI_USERINFO.sub(r"\1" + REDACTED + "@", text)
    text = _INLINE_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in _env_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact(value: Any, key: str = "", secrets: Iterable[str] | None = None) -> Any:
    """A copy of a JSON-like value with secret-keyed entries replaced and strings scrubbed."""
    secrets = _env_secrets() if secrets is None else list(secrets)
    if key and is_secret_key(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, "", secrets) for v in value]
    if isinstance(value, str):
        return scrub_text(value, secrets)
    return value


def redact_uri(uri: str) -> str:
    """A tracking URI safe to print: no ``user:pass@``."""
    return _URI_USERINFO.sub(r"\1" + REDACTED + "@", uri)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as flat MLflow params (``a.b`` keys, JSON lists), secrets redacted."""
    secrets = _env_secrets()
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{_key_part(key)}"
        if isinstance(value, Mapping) and value and not is_secret_key(str(key)):
            flat.update(flatten_params(value, prefix=name + "."))
            continue
        value = redact(value, str(key), secrets)
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[_fit_key(name)] = text[:_MAX_PARAM_VALUE]
    return flat


# ----------------------------------------------------------------------------------------------
# Identity of an evaluation (pure)
# ----------------------------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _sha256(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def _normalise_config(value: Any, key: str = "") -> Any:
    """A task config without where it happened to live on disk.

    The same evaluation run in a ``dvc exp run --temp`` copy has other absolute paths; keeping them
    would make each copy a "different" evaluation and defeat idempotent publishing.
    """
    if isinstance(value, Mapping):
        return {k: _normalise_config(v, str(k)) for k, v in value.items() if k != "config_source"}
    if isinstance(value, list):
        return [_normalise_config(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(value)
    return value


def task_digest(results: Mapping[str, Any], task: str) -> str:
    """32 hex chars identifying one task (or group): its normalised config, documents, version and n-shot.

    Short enough for MLflow's dataset digest (36 chars).
    """
    configs, subtasks = results.get("configs") or {}, results.get("group_subtasks") or {}
    described = {
        "config": _normalise_config(configs.get(task)),
        # the digest of the documents scored (absent in results from before it was recorded)
        "documents": (results.get("task_documents") or {}).get(task),
        "version": (results.get("versions") or {}).get(task),
        "n-shot": (results.get("n-shot") or {}).get(task),
        "subtasks": [task_digest(results, sub) for sub in subtasks.get(task, ()) if sub != task],
    }
    return _sha256(described)[:32]


def task_config_digest(results: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over every task's and group's config, version and n-shot."""
    names = sorted(set(results.get("configs") or {}) | {name for name, _ in _task_sections(results)})
    return "sha256:" + _sha256({name: task_digest(results, name) for name in names})


def settings_digest(results: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over the evaluation settings that can change a score."""
    def section(name: str) -> dict:
        value = results.get(name)
        return dict(value) if isinstance(value, Mapping) else {}

    return "sha256:" + _sha256({
        "eval_config": config_module.score_settings(section("eval_config")),
        "lm_eval": {k: v for k, v in section("config").items() if k not in _LM_EVAL_NON_SCORE},
    })


def evaluation_identity(results: Mapping[str, Any]) -> dict[str, str]:
    """The tags that identify an evaluation: checkpoint fingerprint x task configs x settings.

    Without a checkpoint fingerprint (a live evaluation of training params) the scores, step and
    spool record stand in for it, so a given results.json still maps to exactly one run.
    """
    checkpoint = results.get("checkpoint") or {}
    unfingerprinted = {"results": results.get("results"), "step": checkpoint.get("step"), "live": results.get("live")}
    fingerprint = checkpoint.get("fingerprint") or "results:" + _sha256(unfingerprinted)
    parts = {
        TAG_FINGERPRINT: str(fingerprint),
        TAG_TASK_DIGEST: task_config_digest(results),
        TAG_SETTINGS_DIGEST: settings_digest(results),
    }
    return {TAG_IDENTITY: _sha256(parts), **parts}


def evaluation_timestamp_ms(results: Mapping[str, Any], results_file: Path | None = None) -> int:
    """When the evaluation ran, in ms: lm-eval's ``date``, else the file's mtime.

    Metrics are logged with this fixed timestamp, so logging them again is a no-op in MLflow's
    store (same key, step, timestamp and value) instead of a duplicate point.
    """
    live = results.get("live") or {}
    if as_float(live.get("timestamp_ms")) is not None:
        return int(live["timestamp_ms"])
    date = as_float(results.get("date"))
    if date is not None and date > 0:
        return int(date * 1000)
    if results_file is not None and results_file.exists():
        return int(results_file.stat().st_mtime * 1000)
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------------
# Where things live
# ----------------------------------------------------------------------------------------------


def project_root(start: str | os.PathLike | None = None) -> Path:
    """``DVC_ROOT`` if set (DVC points it at the real repo even in ``exp run --temp`` copies), else
    the nearest directory up from ``start``/cwd holding ``.dvc`` or ``.git``, else one holding
    ``dvc.yaml``, else cwd.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for markers in ((".dvc", ".git"), ("dvc.yaml",)):
        for directory in (here, *here.parents):
            if any((directory / marker).exists() for marker in markers):
                return directory
    return here


def _absolute_uri(uri: str) -> str:
    """Make a local store URI absolute (relative to DVC_ROOT inside a stage, else cwd)."""
    base = Path(os.environ.get("DVC_ROOT") or os.getcwd())
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if path and not path.startswith("/") and path != ":memory:":
            return f"sqlite:///{(base / path).resolve()}{sep}{query}"
        return uri
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return (base / uri).resolve().as_uri()
    return uri


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """explicit > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<project root>/mlflow.db``; always absolute.

    Also turns MLflow's telemetry off unless the user asked for it.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{project_root() / 'mlflow.db'}"
    return _absolute_uri(str(uri))


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
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - a missing version is only a missing tag
        return None


# ----------------------------------------------------------------------------------------------
# MLflow plumbing: bounded retries, one-line errors, experiments
# ----------------------------------------------------------------------------------------------

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
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_UNAVAILABLE_HINTS = (
    "max retries exceeded", "connection refused", "failed to establish a new connection",
    "failed with timeout", "timed out", "remotedisconnected", "connection aborted",
    "connection reset", "name or service not known", "unable to open database file",
    "error code 401", "error code 403", "unauthorized", "unauthenticated", "permission_denied",
    "customer_unauthorized", "api request to",
)


def _is_unavailable(error: BaseException) -> bool:
    """Is this a dead/unreachable/unauthorised server rather than a rejected request?"""
    import requests

    seen = error
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                             ConnectionError, TimeoutError)):
            return True
        code = getattr(seen, "error_code", None)
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(error).lower()
    return any(hint in text for hint in _UNAVAILABLE_HINTS)


def _one_line(error: BaseException, limit: int = 240) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = scrub_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REASONS = (  # (hint in the error's text, what to say), first match wins
    (("error code 401", "unauthorized", "unauthenticated"), "401 unauthorized"),
    (("error code 403", "permission_denied", "forbidden"), "403 forbidden"),
    (("connection refused", "failed to establish a new connection"), "connection refused"),
    (("timed out", "timeout"), "timed out"),
    (("name or service not known", "nodename nor servname", "temporary failure in name resolution"), "host not found"),
    (("unable to open database file",), "cannot open the database file"),
    (("connection reset", "remotedisconnected", "connection aborted"), "connection dropped"),
)


def unavailable_reason(error: BaseException) -> str:
    """A few words for why a server could not be used: refused, timed out, 401, ..."""
    text = str(error).lower()
    for hints, reason in _REASONS:
        if any(hint in text for hint in hints):
            return reason
    return _one_line(error, 60)


def tracking_error(error: BaseException, uri: str, doing: str) -> TrackingError:
    """Translate an MLflow/HTTP failure into a one-line TrackingUnavailable or TrackingError.

    An unreachable server gets a short reason, not the HTTP library's whole exception."""
    if isinstance(error, TrackingError):
        return error
    where = redact_uri(uri)
    if _is_unavailable(error):
        return TrackingUnavailable(f"tracking server {where} unreachable or refused access ({unavailable_reason(error)}) while {doing}")
    return TrackingError(f"{doing} failed (tracking URI {where}): {_one_line(error)}")


@contextlib.contextmanager
def _translated(uri: str, doing: str) -> Iterator[None]:
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - every tracking failure becomes a one-line error
        raise tracking_error(error, uri, doing) from error


_opened_sqlite: set[str] = set()


def _locked(uri: str):
    """This machine's lock on the store (see store_lock.py); the notice names it without secrets."""
    return store_lock.store_lock(uri, redact_uri(uri))


def _client(uri: str):
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:") or uri in _opened_sqlite:
        return MlflowClient(tracking_uri=uri)
    # The first open of a new SQLite file migrates its schema; two processes at once fail.
    with _locked(uri):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    _opened_sqlite.add(uri)
    return client


def _sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].partition("?")[0]
        if path.startswith("/"):
            return Path(path).parent
    return None


def _ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing.

    With a SQLite store, artifacts go beside the database (``mlartifacts/``) rather than into
    ``./mlruns`` of whatever directory the process started in.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if (directory := _sqlite_dir(uri)) is not None:
            location = (directory / "mlartifacts" / _key_part(name).replace(" ", "_")).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - another process may have created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"experiment {name!r} is deleted; restore it in MLflow or pick another --experiment")
    return experiment.experiment_id


def _experiment_name(experiment: str | None) -> str:
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _get_run_or_none(client, run_id: str):
    """The run, or None when this store does not know it (a checkpoint from another server)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(error).lower():
            return None
        raise


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_batch(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    """log_batch within MLflow's per-request limits."""
    for chunk in _chunks(list(metrics), _BATCH_METRICS):
        client.log_batch(run_id, metrics=chunk)
    for chunk in _chunks(list(params), _BATCH_PARAMS_TAGS):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks(list(tags), _BATCH_PARAMS_TAGS):
        client.log_batch(run_id, tags=chunk)


def _tag_list(tags: Mapping[str, Any]):
    from mlflow.entities import RunTag

    secrets = _env_secrets()
    return [RunTag(_fit_key(k), scrub_text(str(v), secrets)[:_MAX_TAG_VALUE]) for k, v in tags.items() if v is not None]


# ----------------------------------------------------------------------------------------------
# Checkpoints as LoggedModels
# ----------------------------------------------------------------------------------------------

_FINGERPRINT = re.compile(r"^[\w:.\-]+$")


def checkpoint_info(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """``{path, step, fingerprint, mlflow_run_id}`` (and ``hf_config`` for a Hugging Face checkpoint)
    from a checkpoint dir's metadata.json, a Hugging Face dir's files, or a dict."""
    if isinstance(source, Mapping):
        info = dict(source)
    else:
        from .models.loading import HUGGING_FACE, checkpoint_format

        directory = Path(source)
        if checkpoint_format(directory) == HUGGING_FACE:
            from .models import hf

            info = hf.checkpoint_info(directory)
        else:
            try:
                metadata = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise UserError(f"not a checkpoint (no readable metadata.json): {directory}") from error
            info = {**metadata, "path": str(directory.resolve())}
    fingerprint = info.get("fingerprint")
    if not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint):
        raise UserError(f"checkpoint {info.get('path')!r} has no valid fingerprint: {fingerprint!r}")
    result = {"path": info.get("path"), "step": int(info.get("step") or 0), "fingerprint": fingerprint,
              "mlflow_run_id": info.get("mlflow_run_id")}
    if isinstance(info.get("hf_config"), Mapping):
        result["hf_config"] = dict(info["hf_config"])
    return result


def _find_checkpoint_model(client, experiment_id: str, fingerprint: str):
    """The checkpoint's model: the oldest with its fingerprint (twins sort by id after time)."""
    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": True}],
    ).to_list()
    return min(models, key=lambda m: (m.creation_timestamp, m.model_id)) if models else None


def _ensure_model(client, experiment_id: str, info: Mapping[str, Any], training_run_id: str | None) -> str:
    """The checkpoint's one external LoggedModel: found by fingerprint, else created; then linked
    as an output of the training run at its step (once)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    model = _find_checkpoint_model(client, experiment_id, info["fingerprint"])
    if model is None:
        secrets = _env_secrets()
        path = scrub_text(str(info.get("path")), secrets)
        model = client.create_logged_model(
            experiment_id=experiment_id,
            name=f"checkpoint-step-{info['step']}",
            source_run_id=training_run_id,
            tags={"mlflow.modelIsExternal": "true", TAG_FINGERPRINT: info["fingerprint"],
                  "lmeval.checkpoint_path": path, "lmeval.checkpoint_step": str(info["step"])},
            params={"step": str(info["step"]), "path": path, "fingerprint": info["fingerprint"],
                    **flatten_params(info.get("hf_config") or {}, prefix="hf_config.")},
            model_type="checkpoint",
        )
        # A publisher on another machine (outside our lock) may have created one meanwhile: keep
        # the oldest, so both go on with the same model.
        oldest = _find_checkpoint_model(client, experiment_id, info["fingerprint"])
        if oldest is not None and oldest.model_id != model.model_id:
            client.delete_logged_model(model.model_id)
            model = oldest
    if model.status != LoggedModelStatus.READY:
        # New, or left PENDING by an attempt that died before finalising: finish it, make no twin.
        _write_external_model_spec(client, model)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    if training_run_id:
        run = client.get_run(training_run_id)
        outputs = run.outputs.model_outputs if run.outputs else []
        if not any(output.model_id == model.model_id for output in outputs):
            client.log_outputs(training_run_id, [LoggedModelOutput(model.model_id, int(info["step"]))])
    return model.model_id


def _write_external_model_spec(client, model) -> None:
    """The MLmodel file MLflow writes for external models, so the checkpoint can be registered."""
    try:
        from mlflow.models.model import MLMODEL_FILE_NAME
        from mlflow.models.utils import get_external_mlflow_model_spec
    except ImportError:  # an internal helper; registering is a nicety, not a requirement
        return
    with tempfile.TemporaryDirectory() as directory:
        get_external_mlflow_model_spec(model).save(os.path.join(directory, MLMODEL_FILE_NAME))
        client.log_model_artifacts(model.model_id, directory)


def _resolve_experiment_id(client, uri: str, experiment: str | None, parent_run) -> str:
    """An explicit experiment wins; else the training run's (so children nest under it in the UI);
    else ``MLFLOW_EXPERIMENT_NAME``; else ``mlflow_lmeval``."""
    if experiment is None and parent_run is not None:
        return parent_run.info.experiment_id
    return _ensure_experiment(client, _experiment_name(experiment), uri)


def ensure_checkpoint_model(
    checkpoint_dir_or_info: str | os.PathLike | Mapping[str, Any],
    training_run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    *,
    max_retries: int | None = None,
    timeout: float | None = None,
) -> str:
    """The id of the checkpoint's external LoggedModel, created once per fingerprint.

    ``training_run_id`` defaults to the checkpoint's ``mlflow_run_id``; when known, the model's
    ``source_run_id`` is that run and the model is logged as its output at the checkpoint's step.
    """
    info = checkpoint_info(checkpoint_dir_or_info)
    training_run_id = training_run_id or info.get("mlflow_run_id")
    uri = resolve_tracking_uri(tracking_uri)
    with http_limits(max_retries, timeout), _translated(uri, f"registering checkpoint {info['path']}"):
        client = _client(uri)
        with _locked(uri):
            parent = _get_run_or_none(client, training_run_id) if training_run_id else None
            experiment_id = _resolve_experiment_id(client, uri, experiment, parent)
            return _ensure_model(client, experiment_id, info, parent.info.run_id if parent else None)


# ----------------------------------------------------------------------------------------------
# Publishing results dirs
# ----------------------------------------------------------------------------------------------


def read_results(results_dir: str | os.PathLike) -> dict[str, Any]:
    """The results.json of a results dir; a one-line UserError if it is missing or broken."""
    path = Path(results_dir) / RESULTS_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no {RESULTS_FILE} in {results_dir}; evaluate first, then publish") from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise UserError(f"{path} is not an lm-eval results file (no 'results' mapping)")
    return results


def _metric_entities(results: Mapping[str, Any], step: int, timestamp_ms: int, model_id: str | None = None,
                     skip: Iterable[str] = ()) -> list:
    """MLflow Metric objects: each task's metrics tied to the task as dataset and to the model."""
    from mlflow.entities import Metric

    skip, metrics = set(skip), []
    for task, values in _task_sections(results):
        digest = task_digest(results, task)
        for raw_key, value in values.items():
            key, number = metric_key(task, raw_key), as_float(value)
            if key is None or number is None or key in skip:
                continue
            if model_id:
                metrics.append(Metric(key, number, timestamp_ms, step, model_id=model_id,
                                      dataset_name=task, dataset_digest=digest))
            else:
                metrics.append(Metric(key, number, timestamp_ms, step))
    return metrics


def _dataset_inputs(results: Mapping[str, Any]) -> list:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for task, _ in _task_sections(results):
        source = {"task": task, "version": (results.get("versions") or {}).get(task)}
        profile = {"n-samples": (results.get("n-samples") or {}).get(task),
                   "n-shot": (results.get("n-shot") or {}).get(task)}
        dataset = Dataset(name=task, digest=task_digest(results, task), source_type="lm_eval_task",
                          source=json.dumps(source, default=str), profile=json.dumps(profile, default=str))
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", "evaluation")]))
    return inputs


def _run_tags(results: Mapping[str, Any], identity: Mapping[str, str], training_run_id: str | None,
              step: int, model_id: str | None) -> dict[str, Any]:
    from .dvc_context import dvc_context_tags

    checkpoint = results.get("checkpoint") or {}
    live = results.get("live") is not None
    return {
        **identity,
        "lmeval.kind": "live_evaluation" if live else "checkpoint_evaluation",
        "lmeval.checkpoint_path": checkpoint.get("path"),
        "lmeval.checkpoint_step": str(step),
        "lmeval.training_run_id": training_run_id,
        "lmeval.tasks": ",".join(name for name, _ in _task_sections(results)),
        "lmeval.lm_eval_version": _lm_eval_version(results),
        "lmeval.git_commit": results.get("git_hash") or _git_commit(project_root()),
        TAG_MODEL_ID: model_id,
        "mlflow.loggedArtifacts": json.dumps([{"path": "results_table.json", "type": "table"}]),
        **dvc_context_tags(),
    }


def _write_artifacts(directory: Path, results_dir: Path, results: Mapping[str, Any]) -> None:
    """Redacted copies of everything the run should carry: results, table, config, samples."""
    secrets = _env_secrets()
    clean = redact(results, secrets=secrets)
    (directory / RESULTS_FILE).write_text(json.dumps(clean, indent=2, ensure_ascii=False), encoding="utf-8")
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
    samples = sorted(results_dir.glob("samples_*.jsonl"))
    if samples:
        (directory / "samples").mkdir()
    for source in samples:
        with open(source, encoding="utf-8", errors="replace") as reader, \
                open(directory / "samples" / source.name, "w", encoding="utf-8") as writer:
            for line in reader:
                writer.write(scrub_text(line, secrets))


def _find_evaluation_runs(client, experiment_id: str, identity: str) -> list:
    """Runs of this identity, newest first (deleted ones excluded)."""
    return list(client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_IDENTITY}` = '{identity}'",
        order_by=["attributes.start_time DESC"], max_results=50,
    ))


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
    finished = sorted((r for r in _find_evaluation_runs(client, experiment_id, identity)
                       if r.info.status == "FINISHED"), key=lambda r: r.info.run_id)
    for duplicate in finished[1:]:
        client.delete_run(duplicate.info.run_id)
    return finished[0] if finished else None


_CONFLICT_HINTS = ("integrityerror", "unique constraint", "duplicate key")


def _retry_on_conflict(action: Callable[[], Any], attempts: int = 3) -> Any:
    """MLflow's store creates a task's dataset row on first use without handling a concurrent
    insert of the same row; a second try finds the row the other publisher made."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - only a lost insert race is retried
            if attempt == attempts - 1 or not any(hint in str(error).lower() for hint in _CONFLICT_HINTS):
                raise
            time.sleep(0.2 * (attempt + 1))


def _mark_failed(client, run_id: str) -> None:
    """Best effort, one quick try: a dead server cannot be told, and the next publish completes it."""
    with contextlib.suppress(Exception), http_limits(max_retries=0):
        client.set_terminated(run_id, "FAILED")


def _publish_evaluation(client, uri: str, results_dir: Path, results: dict, experiment: str | None,
                        training_run_id: str | None) -> PublishOutcome:
    checkpoint = results.get("checkpoint") or {}
    live = results.get("live") or {}
    step = int(checkpoint.get("step") or live.get("step") or 0)
    training_run_id = training_run_id or checkpoint.get("mlflow_run_id") or live.get("run_id")
    parent = _get_run_or_none(client, training_run_id) if training_run_id else None
    if training_run_id and parent is None:
        warnings.warn(f"training run {training_run_id} is not in {redact_uri(uri)}; publishing without a parent link",
                      TrackingWarning, stacklevel=3)
    experiment_id = _resolve_experiment_id(client, uri, experiment, parent)
    identity = evaluation_identity(results)

    runs = _find_evaluation_runs(client, experiment_id, identity[TAG_IDENTITY])
    finished = sorted((run for run in runs if run.info.status == "FINISHED"), key=lambda r: r.info.run_id)
    if finished:
        run = finished[0]
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
                                tags={t.key: t.value for t in _tag_list(resolve_tags(tags))})
    run_id = run.info.run_id
    try:
        model_id = None
        if checkpoint.get("fingerprint"):
            model_id = _ensure_model(client, experiment_id, checkpoint_info(checkpoint),
                                     parent.info.run_id if parent else None)
        _complete_run(client, run, results_dir, results, identity, training_run_id, step, model_id)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        _mark_failed(client, run_id)
        raise
    kept = _keep_one_finished(client, experiment_id, identity[TAG_IDENTITY])
    return PublishOutcome(kept.info.run_id, kept.info.run_id == run_id, model_id, str(results_dir))


def _complete_run(client, run, results_dir: Path, results: dict, identity: Mapping[str, str],
                  training_run_id: str | None, step: int, model_id: str | None) -> None:
    """Log whatever the run lacks. Params and metrics already there are skipped (a partial run)."""
    from mlflow.entities import LoggedModelInput, Param

    run_id = run.info.run_id
    params = flatten_params(results.get("eval_config") or {})
    params.update(flatten_params(results.get("config") or {}, prefix="lm_eval."))
    params = [Param(k, v) for k, v in params.items() if k not in run.data.params]
    timestamp = evaluation_timestamp_ms(results, results_dir / RESULTS_FILE)
    metrics = _metric_entities(results, step, timestamp, model_id, skip=run.data.metrics)
    tags = _tag_list(_run_tags(results, identity, training_run_id, step, model_id))
    _log_batch(client, run_id, params=params, tags=tags)
    _retry_on_conflict(lambda: client.log_inputs(run_id, datasets=_dataset_inputs(results),
                                                 models=[LoggedModelInput(model_id)] if model_id else None))
    _log_batch(client, run_id, metrics=metrics)
    with tempfile.TemporaryDirectory(prefix="lmeval-artifacts-") as directory:
        _write_artifacts(Path(directory), results_dir, results)
        client.log_artifacts(run_id, directory)


def log_live_metrics(run_id: str, step: int, metrics: Mapping[str, float], timestamp_ms: int,
                     tracking_uri: str | None = None) -> bool:
    """Log metrics into an existing run at ``step``; False if that exact point is already there.

    A fixed timestamp makes a repeat a no-op in MLflow's store, and the check below keeps us from
    even sending one. Raises MLflow's own errors: callers decide what a failure means.
    """
    from mlflow.entities import Metric

    client = _client(resolve_tracking_uri(tracking_uri))
    items = sorted((key, float(value)) for key, value in metrics.items())
    if not items:
        return False
    probe = client.get_metric_history(run_id, items[0][0])
    if any(point.step == step and point.timestamp == timestamp_ms for point in probe):
        return False
    _log_batch(client, run_id, metrics=[Metric(key, value, timestamp_ms, step) for key, value in items])
    return True


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

    One child run of the training run (``checkpoint.mlflow_run_id`` in results.json, or
    ``training_run_id``), identified by checkpoint fingerprint x task-config digest x score
    settings. A FINISHED run with that identity means nothing is written; a RUNNING/FAILED one
    left by an interrupted publish is completed. Metrics go in at the checkpoint's step, also on
    the checkpoint's LoggedModel with each task as dataset.

    A live evaluation spooled by ``LMEvalCallback`` (``"live"`` in results.json) goes back into its
    training run at its step instead.

    ``experiment`` None means: the training run's experiment, else ``MLFLOW_EXPERIMENT_NAME``,
    else ``mlflow_lmeval``. Raises TrackingUnavailable (exit 3) when the server is unreachable or
    refuses access, TrackingError (exit 4) when it rejects the data, UserError on a bad results dir.
    """
    results_dir = Path(results_dir)
    results = read_results(results_dir)
    uri = resolve_tracking_uri(tracking_uri)
    live = results.get("live") or {}
    with http_limits(max_retries, timeout), _translated(uri, f"publishing {results_dir}"):
        if live.get("run_id"):
            created = log_live_metrics(live["run_id"], int(live.get("step") or 0), flatten_metrics(results),
                                       evaluation_timestamp_ms(results), uri)
            return PublishOutcome(live["run_id"], created, None, str(results_dir))
        client = _client(uri)
        with _locked(uri):
            return _publish_evaluation(client, uri, results_dir, results, experiment, training_run_id)


def find_results_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Results dirs named or lying anywhere under the given paths (sorted, each once)."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if (path / RESULTS_FILE).is_file():
            found[path] = None
        elif path.is_dir():
            found.update(dict.fromkeys(sorted(p.parent for p in path.rglob(RESULTS_FILE))))
        else:
            raise UserError(f"not a results directory: {path}")
    return list(found)


def sync(results_dirs: Iterable[str | os.PathLike], **kwargs) -> list[PublishOutcome]:
    """Publish every results dir (or tree of them) that MLflow lacks; a second run writes nothing.

    ``kwargs`` go to ``publish_results``. Stops at the first TrackingUnavailable (no point hammering
    a dead server); other bad dirs are reported together after the rest are published.
    """
    outcomes, failures = [], []
    for directory in find_results_dirs(results_dirs):
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


# ----------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------


class TrainingRun:
    """The training run in MLflow: params, loss/throughput at steps, checkpoints as LoggedModels.

    Tracking must never stop training: the first failure to reach MLflow is warned about once,
    and from then on every call is a no-op. The run is made *active*, so ``LMEvalCallback`` logs
    into it. If a run is already active, it is adopted (and not ended here).

        with TrainingRun(experiment="xlstm", params=settings) as run:
            train(..., mlflow_run_id=run.run_id, on_log=run.log_metrics,
                  on_checkpoint=lambda step, path, _: run.log_checkpoint(step, path))
    """

    def __init__(self, *, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                 params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
                 max_retries: int | None = None, timeout: float | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment, self.run_name = _experiment_name(experiment), run_name
        self._params, self._tags = dict(params or {}), dict(tags or {})
        self._limits = (max_retries, timeout)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.unavailable = False  # set on the first failure to reach MLflow
        self._owned = False
        self._explicit_uri = tracking_uri is not None

    def _guarded(self, doing: str, action: Callable[[], Any]) -> Any:
        if self.unavailable:
            return None
        try:
            with http_limits(*self._limits):
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

            active = mlflow.active_run()
            if active is not None:
                self.run_id, self.experiment_id = active.info.run_id, active.info.experiment_id
                if not self._explicit_uri:  # the adopted run lives in the global store
                    self.tracking_uri = resolve_tracking_uri(mlflow.get_tracking_uri())
            else:
                mlflow.set_tracking_uri(self.tracking_uri)
                self.experiment_id = _ensure_experiment(_client(self.tracking_uri), self.experiment, self.tracking_uri)
                tags = {t.key: t.value for t in _tag_list({"lmeval.kind": "training", **self._tags})}
                run = mlflow.start_run(experiment_id=self.experiment_id, run_name=self.run_name, tags=tags)
                self.run_id, self._owned = run.info.run_id, True
            if self._params:
                self._log_params(self._params)

        self._guarded("starting the training run", begin)
        return self

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        _log_batch(_client(self.tracking_uri), self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params, flattened and with secrets redacted."""
        if self.run_id:
            self._guarded("logging params", lambda: self._log_params(params))

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log numeric metrics (JAX/numpy scalars welcome) at ``step``; e.g. loss, tokens_per_s."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entities = [Metric(_fit_key("/".join(_key_part(part) for part in str(k).split("/"))), v, now, int(step))
                    for k, v in ((k, as_float(v)) for k, v in metrics.items()) if v is not None]
        if self.run_id and entities:
            self._guarded("logging metrics",
                          lambda: _log_batch(_client(self.tracking_uri), self.run_id, metrics=entities))

    def log_checkpoint(self, step: int, path: str | os.PathLike) -> str | None:
        """Register the checkpoint at ``path`` as an external LoggedModel output at ``step``."""
        if not self.run_id:
            return None

        def register():
            info = {**checkpoint_info(path), "step": int(step)}
            client = _client(self.tracking_uri)
            with _locked(self.tracking_uri):
                return _ensure_model(client, self.experiment_id, info, self.run_id)

        return self._guarded(f"registering checkpoint {path}", register)

    def end(self, status: str = "FINISHED") -> None:
        """End the run if this object started it (FINISHED, FAILED or KILLED)."""
        if not self._owned:
            return
        import mlflow

        self._owned = False
        if self.unavailable:
            # Pop the fluent run stack without another slow round of retries against a dead server.
            with contextlib.suppress(Exception), http_limits(max_retries=0, timeout=2):
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
