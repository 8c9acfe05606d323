"""The jobs the CLI, the DVC stages and the Python API share: a tracked training run, and
evaluate-then-publish (of a checkpoint directory, or of a model in memory: ``evaluate_model``)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .callback import LMEvalCallback
from .config import EvalConfig, checked_step
from .errors import UserError
from .evaluation import evaluate, run_evaluation
from .results_file import check_results_dir
from .tokenizer import check_tokenizer
from .tracking import TrackingError, TrainingRun, flatten_metrics, publish_results, resolve_tracking_uri, store
from .tracking.logged_models import FINGERPRINT

# The reference model and training loop imported inside ``tracked_training``: they import JAX,
# 3.2 s measured on this machine, which evaluate-then-publish and the CLI's other commands skip.


@dataclasses.dataclass(frozen=True)
class Tracking:
    enabled: bool = True
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db
    experiment: str | None = None


@dataclasses.dataclass(frozen=True)
class LiveEvaluation:
    """lm-eval on the live params every ``every`` steps of training (0: never)."""

    every: int = 0
    config: EvalConfig | None = None


def tracked_training(tokens, tokenizer, model_config, settings, output_dir, *, tracking: Tracking = Tracking(),
                     live: LiveEvaluation = LiveEvaluation(), on_log: Callable[[int, dict], None] | None = None,
                     link_checkpoints: bool = True) -> list[Path]:
    """Train with the reference loop inside an MLflow training run (if tracking is enabled).

    The run holds the settings as params, loss and tokens/s at their steps, and every checkpoint
    as a LoggedModel; with ``link_checkpoints`` checkpoints also record the run id in their
    metadata (without, they hold content only, and the run is found by their fingerprint: its
    LoggedModel's source run). Tracking failures warn and never stop training; a tracking URI no
    store can be made of (``store.check_uri``) is refused first.
    """
    from .models import mlstm
    from .training import train

    run_context = contextlib.nullcontext(None)
    if tracking.enabled:
        # A URI no store can be made of is a mistake to name now, not a failure to survive.
        store.check_uri(resolve_tracking_uri(tracking.tracking_uri))
        params = {**dataclasses.asdict(model_config), **dataclasses.asdict(settings), "num_tokens": len(tokens)}
        params["save_steps"] = ",".join(map(str, settings.save_steps))
        run_context = TrainingRun(tracking_uri=tracking.tracking_uri, experiment=tracking.experiment, params=params,
                                  run_name=f"train-mlstm-{model_config.embed_dim}d{model_config.num_layers}l")

    with run_context as run:
        def log(step, metrics):
            if on_log:
                on_log(step, metrics)
            if run is not None:
                run.log_metrics(step, metrics)

        def checkpointed(step, path, _params):
            if run is not None:
                run.log_checkpoint(step, path)

        on_step = None
        if live.every and live.config is not None:
            def evaluate_live(params):
                model = mlstm.as_language_model(model_config, params)
                return run_evaluation(model, tokenizer, live.config, show_progress=False)

            if tracking.enabled:
                on_step = LMEvalCallback(evaluate_live, every_n_steps=live.every, tracking_uri=tracking.tracking_uri).callback
            else:
                def on_step(step, params):  # no MLflow: show the scores, spool nothing
                    if step % live.every == 0:
                        scores = flatten_metrics(evaluate_live(params))
                        print(f"step {step} lm-eval: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(scores.items())), flush=True)
        run_reference = getattr(run, "reference", None) if link_checkpoints else None
        return train(tokens, tokenizer, model_config, settings, output_dir,
                     mlflow_run_id=run_reference, on_log=log, on_checkpoint=checkpointed, on_step=on_step)


def check_destinations(config: EvalConfig, tracking: Tracking) -> None:
    """Before any work: the results' directory can be written, and the tracking URI names a store
    MLflow can open. Whether a server answers is found when publishing; results.json waits for
    ``sync`` meanwhile. Cheap (a directory probe; MLflow's import the first time), so each entry
    point checks for itself."""
    if tracking.enabled and not config.output_path:
        raise UserError("an output path is needed: results.json is written before anything is published")
    if config.output_path:
        check_results_dir(config.output_path)
    if tracking.enabled:
        store.check_uri(resolve_tracking_uri(tracking.tracking_uri))


def _evaluate_then_publish(run: Callable[[], dict], config: EvalConfig, tracking: Tracking, *,
                           training_run_id: str | None, strict: bool):
    """``run()`` writes results.json into ``config.output_path``; then it is published (if tracking)."""
    results = run()
    if not tracking.enabled:
        return results, None
    try:
        outcome = publish_results(config.output_path, tracking_uri=tracking.tracking_uri, experiment=tracking.experiment,
                                  training_run_id=training_run_id)
    except TrackingError as error:
        message = f"{error}; results.json is safe, publish it later: mlflow-lmeval sync {config.output_path}"
        if strict:
            raise type(error)(message) from None
        warnings.warn(message)
        return results, None
    return results, outcome


def evaluate_and_publish(checkpoint_dir, config: EvalConfig, tracking: Tracking = Tracking(), *,
                         training_run_id: str | None = None, step: int | None = None, strict: bool = True,
                         show_progress: bool = True):
    """Evaluate, write results.json (always first), then publish it to MLflow.

    With ``strict`` a tracking failure raises (after results.json is safe on disk); otherwise it
    warns, leaving ``mlflow-lmeval sync`` to catch up. Returns (results, PublishOutcome or None).
    """
    check_destinations(config, tracking)
    return _evaluate_then_publish(lambda: evaluate(checkpoint_dir, config, step=step, show_progress=show_progress),
                                  config, tracking, training_run_id=training_run_id, strict=strict)


def _active_run() -> tuple[str | None, str | None]:
    """(id of this process's active MLflow run, the tracking URI the user set); None for either
    that is not there. Only a process that imported mlflow can have set one, so nothing is
    imported here for a caller who never touched MLflow."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None, None
    active = mlflow.active_run()
    uri = mlflow.get_tracking_uri() if active is not None or mlflow.tracking.is_tracking_uri_set() else None
    return (active.info.run_id if active is not None else None), uri


def evaluate_model(model, tokenizer, config: EvalConfig | dict[str, Any], *, step: int,
                   training_run_id: str | None = None, fingerprint: str | None = None,
                   publish: bool = True) -> dict:
    """Evaluate a model in memory on lm-eval tasks, write results.json, publish it; returns
    lm-eval's results dict (JSON-safe: ``results[task]["acc,none"]``...).

    ``model`` is a ``LanguageModel`` (``from_nnx``, ``from_linen_cache``, or built by hand);
    ``tokenizer`` meets ``TokenizerProtocol`` (``vocab_size``, ``bos_id``, ``eos_id``,
    ``encode(str) -> list[int]``, ``decode(list[int]) -> str``); ``config`` is an ``EvalConfig``
    or a dict of its fields. ``step`` is the training step the params are from.

    With ``publish``, ``config.output_path`` must be set: results.json is written there first, then
    one evaluation run is published to MLflow, its metrics at ``step``, as a child of
    ``training_run_id``, else of the active MLflow run if there is one. It goes to the tracking
    URI the active run lives in (or ``mlflow.set_tracking_uri``'s), else ``MLFLOW_TRACKING_URI``,
    else ``sqlite:///<project root>/mlflow.db``. A tracking failure raises ``TrackingUnavailable``
    or ``TrackingError`` after results.json is safe (``mlflow-lmeval sync`` publishes it later).

    ``fingerprint`` names the params (e.g. a digest of them, or ``"<run id>:<step>"``; letters,
    digits and ``_:.-``) and must change whenever they do. With one, the evaluation is resumable
    (the response cache keys on it, unless ``config.response_cache`` is off) and the checkpoint
    gets its LoggedModel (keyed on it). Without one there is no LoggedModel and no response cache.
    """
    config = config if isinstance(config, EvalConfig) else EvalConfig.from_dict(config)
    step = checked_step(step)
    check_tokenizer(tokenizer)
    if fingerprint is not None and not (isinstance(fingerprint, str) and FINGERPRINT.match(fingerprint)):
        raise UserError(f"fingerprint {fingerprint!r} is not valid: use letters, digits and _:.- only")
    active_run_id, tracking_uri = _active_run()
    training_run_id = training_run_id or active_run_id  # recorded in results.json, for a later sync too
    tracking = Tracking(enabled=publish, tracking_uri=tracking_uri)
    check_destinations(config, tracking)
    checkpoint = {"path": None, "step": step, "fingerprint": fingerprint, "mlflow_run_id": training_run_id}
    results, _ = _evaluate_then_publish(lambda: run_evaluation(model, tokenizer, config, checkpoint),
                                        config, tracking, training_run_id=training_run_id, strict=True)
    return results
