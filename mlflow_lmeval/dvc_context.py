"""Tag MLflow runs started inside a DVC stage with that stage's context.

Registered as an ``mlflow.run_context_provider`` entry point, so *any* run started with
``mlflow.start_run`` inside ``dvc repro`` / ``dvc exp run`` gets the tags, not only ours.

This module must not import mlflow: MLflow loads its entry points while it is being imported, so
if this module were imported first and imported mlflow, MLflow would find it half-initialised and
silently drop the provider. The provider therefore implements RunContextProvider's interface
(``in_context``, ``tags``) without subclassing it; MLflow only calls those two methods.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

# DVC sets DVC_ROOT and DVC_STAGE for every stage command, and DVC_EXP_NAME in `dvc exp run`.
_ENV_TO_TAG = {"DVC_STAGE": "dvc.stage", "DVC_EXP_NAME": "dvc.exp_name", "DVC_ROOT": "dvc.root"}


def in_dvc_stage(environ: Mapping[str, str] | None = None) -> bool:
    """True when the process runs as (or under) a DVC stage or experiment."""
    env = os.environ if environ is None else environ
    return bool(env.get("DVC_STAGE") or env.get("DVC_EXP_NAME"))


def lock_digest(root: str | os.PathLike) -> str | None:
    """``sha256:<hex>`` of ``<root>/dvc.lock``, or None when there is no readable lock file."""
    try:
        return "sha256:" + hashlib.sha256((Path(root) / "dvc.lock").read_bytes()).hexdigest()
    except OSError:
        return None


def dvc_context_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags ``dvc.stage``, ``dvc.exp_name``, ``dvc.root``, ``dvc.lock_digest`` (those known).

    Empty outside a DVC stage, so runs started by hand are not tagged with a stale DVC_ROOT.
    """
    env = os.environ if environ is None else environ
    if not in_dvc_stage(env):
        return {}
    tags = {tag: env[name] for name, tag in _ENV_TO_TAG.items() if env.get(name)}
    digest = lock_digest(env["DVC_ROOT"]) if env.get("DVC_ROOT") else None
    if digest:
        tags["dvc.lock_digest"] = digest
    return tags


class DvcRunContextProvider:
    """MLflow run context provider (``mlflow.tracking.context.abstract_context.RunContextProvider``
    interface): DVC stage context as run tags."""

    def in_context(self) -> bool:
        return in_dvc_stage()

    def tags(self) -> dict[str, str]:
        return dvc_context_tags()
