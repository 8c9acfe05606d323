"""Checkpoints as MLflow LoggedModels: one external model per checkpoint fingerprint, an output of
the training run at the checkpoint's step.

MLflow imported lazily (see store.py), and a Hugging Face checkpoint's reader too: importing
``models.hf`` pulls in JAX, 2.7 s measured on this machine.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models.loading import HUGGING_FACE, checkpoint_format
from . import store
from .identity import TAG_FINGERPRINT
from .keys import flatten_params
from .redact import env_secrets, scrub_text
from .uri import resolve_tracking_uri

FINGERPRINT = re.compile(r"^[\w:.\-]+$")  # what a LoggedModel tag and a search filter can hold


def checkpoint_info(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """``{path, step, fingerprint, mlflow_run_id}`` (and ``hf_config`` for a Hugging Face checkpoint)
    from a checkpoint dir's metadata.json, a Hugging Face dir's files, or a dict."""
    if isinstance(source, Mapping):
        info = dict(source)
    else:
        directory = Path(source)
        if checkpoint_format(directory) == HUGGING_FACE:
            from ..models import hf

            info = hf.checkpoint_info(directory)
        else:
            try:
                metadata = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise UserError(f"not a checkpoint (no readable metadata.json): {directory}") from error
            info = {**metadata, "path": str(directory.resolve())}
    fingerprint = info.get("fingerprint")
    if not isinstance(fingerprint, str) or not FINGERPRINT.match(fingerprint):
        raise UserError(f"checkpoint {info.get('path')!r} has no valid fingerprint: {fingerprint!r}")
    result = {"path": info.get("path"), "step": int(info.get("step") or 0), "fingerprint": fingerprint,
              "mlflow_run_id": info.get("mlflow_run_id")}
    if isinstance(info.get("hf_config"), Mapping):
        result["hf_config"] = dict(info["hf_config"])
    return result


def _find_checkpoint_model(client, experiment_id: str, fingerprint: str, *, trained: bool = False):
    """The checkpoint's model: the oldest with its fingerprint (twins sort by id after time); with
    ``trained``, the oldest of those that name a training run (``source_run_id``)."""
    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": True}],
    ).to_list()
    models = [m for m in models if m.source_run_id] if trained else models
    return min(models, key=lambda m: (m.creation_timestamp, m.model_id)) if models else None


def training_run_by_fingerprint(client, experiment_id: str, fingerprint: str) -> str | None:
    """The id of the run that trained the checkpoint of ``fingerprint``: the ``source_run_id`` of its
    oldest model in the experiment that has one; None if no training run logged it there.

    The link for checkpoints that hold content only (the pipeline's: DVC hashes them, so no run id
    goes into their metadata), as the training run logs a model for each checkpoint it writes."""
    if not FINGERPRINT.match(fingerprint):
        return None
    model = _find_checkpoint_model(client, experiment_id, fingerprint, trained=True)
    return model.source_run_id if model is not None else None


def ensure_model(client, experiment_id: str, info: Mapping[str, Any], training_run_id: str | None) -> str:
    """The checkpoint's one external LoggedModel: found by fingerprint, else created; then linked
    as an output of the training run at its step (once). Call it holding the store's lock."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    model = _find_checkpoint_model(client, experiment_id, info["fingerprint"])
    if model is None:
        secrets = env_secrets()
        # A model evaluated from memory (``mlflow_lmeval.evaluate_model``) has no path to record.
        path = scrub_text(str(info["path"]), secrets) if info.get("path") else None
        model = client.create_logged_model(
            experiment_id=experiment_id,
            name=f"checkpoint-step-{info['step']}",
            source_run_id=training_run_id,
            tags={"mlflow.modelIsExternal": "true", TAG_FINGERPRINT: info["fingerprint"],
                  **({"lmeval.checkpoint_path": path} if path else {}), "lmeval.checkpoint_step": str(info["step"])},
            params={"step": str(info["step"]), **({"path": path} if path else {}), "fingerprint": info["fingerprint"],
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


def ensure_checkpoint_model(
    checkpoint_dir_or_info: str | os.PathLike | Mapping[str, Any],
    training_run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> str:
    """The id of the checkpoint's external LoggedModel, created once per fingerprint.

    ``training_run_id`` defaults to the checkpoint's ``mlflow_run_id``; when known, the model's
    ``source_run_id`` is that run and the model is logged as its output at the checkpoint's step.
    """
    info = checkpoint_info(checkpoint_dir_or_info)
    training_run_id = training_run_id or info.get("mlflow_run_id")
    uri = resolve_tracking_uri(tracking_uri)
    with store.connected(uri, f"registering checkpoint {info['path']}") as client, \
            store.locked(uri):
        parent = store.get_run_or_none(client, training_run_id) if training_run_id else None
        experiment_id = store.resolve_experiment_id(client, uri, experiment, parent)
        return ensure_model(client, experiment_id, info, parent.info.run_id if parent else None)
