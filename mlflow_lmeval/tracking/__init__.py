"""MLflow tracking: evaluation runs linked to training runs, checkpoints as LoggedModels, idempotent sync.

One job per module:
  errors         TrackingError / TrackingUnavailable / TrackingWarning, MLflow failures as one line
  redact         secrets out of everything sent
  keys           lm-eval's results as MLflow metric keys, params and a results table
  identity       what makes two evaluations the same one, and when one ran
  uri            where the store is
  store_lock     one publisher at a time per store on this machine
  store          talking to the store: client, retries, experiments, batches
  logged_models  checkpoints as LoggedModels
  run_contents   what an evaluation run holds: params, metrics, inputs, tags, artifacts
  publish        results dirs into MLflow exactly once (``publish_results``, ``sync``, live metrics)
  training_spool a training run MLflow could not take, on disk until ``sync`` publishes it
  training_run   the training run (``TrainingRun``)

Importing this package imports no MLflow; its modules import it when they first talk to a store.
"""

from ..results_file import read_results
from .errors import TrackingError, TrackingUnavailable, TrackingWarning, tracking_error
from .identity import TAG_FINGERPRINT, TAG_IDENTITY, evaluation_identity, evaluation_timestamp_ms, settings_digest
from .keys import (
    CHECKPOINT_PREFIX,
    LIVE_PREFIX,
    as_float,
    flatten_metrics,
    flatten_params,
    metric_key,
    mlflow_key,
    results_table,
)
from .logged_models import checkpoint_info, ensure_checkpoint_model
from .publish import PublishOutcome, evaluation_run, log_live_metrics, publish_results, sync
from .redact import REDACTED, redact_uri
from .store import SPOOLED_PREFIX, connected, http_limits, log_batch, set_experiment
from .training_run import TrainingRun, spooled_training_reference, start_training_run
from .training_spool import SPOOL_DIR_NAME, find_training_spools, publish_training_spool
from .uri import project_root, resolve_tracking_uri

# The names the rest of the project and its tests use; the modules hold the rest.
__all__ = [
    "CHECKPOINT_PREFIX",
    "LIVE_PREFIX",
    "REDACTED",
    "SPOOLED_PREFIX",
    "SPOOL_DIR_NAME",
    "TAG_FINGERPRINT",
    "TAG_IDENTITY",
    "PublishOutcome",
    "TrackingError",
    "TrackingUnavailable",
    "TrackingWarning",
    "TrainingRun",
    "as_float",
    "checkpoint_info",
    "connected",
    "ensure_checkpoint_model",
    "evaluation_identity",
    "evaluation_run",
    "evaluation_timestamp_ms",
    "find_training_spools",
    "flatten_metrics",
    "flatten_params",
    "http_limits",
    "log_batch",
    "log_live_metrics",
    "metric_key",
    "mlflow_key",
    "project_root",
    "publish_results",
    "publish_training_spool",
    "read_results",
    "redact_uri",
    "resolve_tracking_uri",
    "results_table",
    "set_experiment",
    "settings_digest",
    "spooled_training_reference",
    "start_training_run",
    "sync",
    "tracking_error",
]
