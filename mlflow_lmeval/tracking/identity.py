"""What makes two evaluations the same one, and when one ran (pure).

An evaluation is identified by checkpoint fingerprint x task configs x score settings. Publishing
searches MLflow for that identity, so publishing again finds the run instead of making a twin.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import config as config_module
from ..results_file import checkpoint_section, live_section
from .keys import as_float, task_sections

# Tags that identify an evaluation; the identity tag is what idempotent publishing searches for.
TAG_IDENTITY = "lmeval.identity"
TAG_FINGERPRINT = "lmeval.fingerprint"  # also on the checkpoint's LoggedModel
TAG_TASK_DIGEST = "lmeval.task_config_digest"
TAG_SETTINGS_DIGEST = "lmeval.settings_digest"

# Entries of lm-eval's own ``config`` section that cannot change a score (our settings say so in
# EvalConfig's metadata). Everything else, including entries added later, counts towards the
# identity, which errs on the safe side.
_LM_EVAL_NON_SCORE = frozenset({
    "batch_size", "batch_sizes", "device", "use_cache", "model", "show_progress", "cache_requests", "write_out",
    "log_samples",
})


def _sha256(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(canonical).hexdigest()


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
    names = sorted(set(results.get("configs") or {}) | {name for name, _ in task_sections(results)})
    return "sha256:" + _sha256({name: task_digest(results, name) for name in names})


def _score_settings(results: Mapping[str, Any]) -> dict[str, dict]:
    """The evaluation settings that can change a score: ours and lm-eval's own."""
    def section(name: str) -> dict:
        value = results.get(name)
        return dict(value) if isinstance(value, Mapping) else {}

    settings = {
        "eval_config": config_module.score_settings(section("eval_config")),
        "lm_eval": {k: v for k, v in section("config").items() if k not in _LM_EVAL_NON_SCORE},
    }
    # The chat template's text as used (``apply_chat_template: true`` names none); absent without
    # one, so evaluations without a template keep the identity they had.
    chat = section("chat_template")
    if chat:
        settings["chat_template"] = {"sha256": chat.get("sha256"), "special_tokens": chat.get("special_tokens")}
    return settings


def settings_digest(results: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over the evaluation settings that can change a score."""
    return "sha256:" + _sha256(_score_settings(results))


def dataset_digest(results: Mapping[str, Any], task: str) -> str:
    """32 hex chars: MLflow's dataset digest of one task's metrics (and of the run's dataset input).

    What the task put to the model in this evaluation, so that one key of a LoggedModel under one
    dataset holds only values of like evaluations: the task (``task_digest``: config, all its
    documents, version, shots), the documents scored (lm-eval's effective count: the limit as it
    applied, so ``--limit 20`` of 40 and ``--limit 0.5`` are one dataset, and a limit beyond the
    task's size is none), every other setting that can change a score, and a group's subtasks'.
    The other tasks evaluated alongside are left out: a task scores the same with or without them.
    """
    settings = _score_settings(results)
    settings["eval_config"].pop("evaluation_tasks", None)
    lm_eval_limit = settings["lm_eval"].pop("limit", None)  # the count scored stands in for the limit
    limit = settings["eval_config"].pop("limit_requests", lm_eval_limit)
    scored = ((results.get("n-samples") or {}).get(task) or {}).get("effective")
    if scored is None:  # a group (its subtasks say), or results written without n-samples
        scored = {"limit": limit}
    subtasks = (results.get("group_subtasks") or {}).get(task, ())
    return _sha256({
        "task": task_digest(results, task), "scored": scored, "settings": settings,
        "subtasks": [dataset_digest(results, sub) for sub in subtasks if sub != task],
    })[:32]


def evaluation_identity(results: Mapping[str, Any]) -> dict[str, str]:
    """The tags that identify an evaluation: checkpoint fingerprint x task configs x settings.

    Without a checkpoint fingerprint (a live evaluation of training params) the scores, step and
    spool record stand in for it, so a given results.json still maps to exactly one run.
    """
    checkpoint = checkpoint_section(results)
    unfingerprinted = {"results": results.get("results"), "step": checkpoint.get("step"), "live": live_section(results)}
    fingerprint = checkpoint.get("fingerprint") or "results:" + _sha256(unfingerprinted)
    parts = {
        TAG_FINGERPRINT: str(fingerprint),
        TAG_TASK_DIGEST: task_config_digest(results),
        TAG_SETTINGS_DIGEST: settings_digest(results),
    }
    return {TAG_IDENTITY: _sha256(parts), **parts}


def evaluation_timestamp_ms(results: Mapping[str, Any], results_file: Path | None = None, *,
                            run_start_ms: int | None = None) -> int:
    """When the evaluation ran, in ms: the live evaluation's time, else lm-eval's ``date``, else
    ``run_start_ms`` (the start of the evaluation's MLflow run), else the mtime of ``results_file``,
    else now.

    Metrics are logged with this fixed timestamp, so logging them again is a no-op in MLflow's
    store (same key, step, timestamp and value) instead of a duplicate point. A results.json
    written inside a DVC stage has no ``date`` (see results_file.py), and its mtime changes with
    every ``dvc checkout``: publishing times it by its run, which stays the same.
    """
    live = live_section(results) or {}
    if as_float(live.get("timestamp_ms")) is not None:
        return int(live["timestamp_ms"])
    date = as_float(results.get("date"))
    if date is not None and date > 0:
        return int(date * 1000)
    if run_start_ms is not None:
        return int(run_start_ms)
    if results_file is not None and results_file.exists():
        return int(results_file.stat().st_mtime * 1000)
    return int(time.time() * 1000)
