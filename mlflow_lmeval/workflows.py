"""The two jobs the CLI and the DVC stages share: a tracked training run, and evaluate-then-publish."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Callable

from .callback import LMEvalCallback
from .config import EvalConfig
from .errors import UserError
from .evaluation import evaluate, evaluate_model
from .tracking import TrackingError, TrainingRun, flatten_metrics, publish_results

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
                     live: LiveEvaluation = LiveEvaluation(), on_log: Callable[[int, dict], None] | None = None) -> list[Path]:
    """Train with the reference loop inside an MLflow training run (if tracking is enabled).

    The run holds the settings as params, loss and tokens/s at their steps, and every checkpoint
    as a LoggedModel; checkpoints record the run id in their metadata. Tracking failures warn and
    never stop training.
    """
    from .models import mlstm
    from .training import train

    run_context = contextlib.nullcontext(None)
    if tracking.enabled:
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
                return evaluate_model(model, tokenizer, live.config, show_progress=False)

            if tracking.enabled:
                on_step = LMEvalCallback(evaluate_live, every_n_steps=live.every, tracking_uri=tracking.tracking_uri).callback
            else:
                def on_step(step, params):  # no MLflow: show the scores, spool nothing
                    if step % live.every == 0:
                        scores = flatten_metrics(evaluate_live(params))
                        print(f"step {step} lm-eval: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(scores.items())), flush=True)
        return train(tokens, tokenizer, model_config, settings, output_dir,
                     mlflow_run_id=getattr(run, "reference", None), on_log=log, on_checkpoint=checkpointed, on_step=on_step)


def evaluate_and_publish(checkpoint_dir, config: EvalConfig, tracking: Tracking = Tracking(), *,
                         training_run_id: str | None = None, step: int | None = None, strict: bool = True,
                         show_progress: bool = True):
    """Evaluate, write results.json (always first), then publish it to MLflow.

    With ``strict`` a tracking failure raises (after results.json is safe on disk); otherwise it
    warns, leaving ``mlflow-lmeval sync`` to catch up. Returns (results, PublishOutcome or None).
    """
    if not config.output_path:
        raise UserError("an output path is needed: results.json is written before anything is published")
    results = evaluate(checkpoint_dir, config, step=step, show_progress=show_progress)
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
