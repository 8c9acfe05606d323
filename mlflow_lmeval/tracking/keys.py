"""lm-eval's results as MLflow keys and values: metric keys, flat params, the results table (pure).

MLflow accepts only ``[/\\w.\\- :]`` in keys, at most 250 characters. lm-eval's ``acc,none`` of
task ``arc`` becomes ``lmeval/arc/acc``; a filter other than ``none`` is appended as ``/<filter>``.
Evaluations of training params (the live callback) use the prefix ``lmeval_live`` instead, so on the
training run they and checkpoint evaluations of the same step stay two separate curves.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from .redact import env_secrets, is_secret_key, redact

# Entries of a task's results that are no metric.
NOT_METRICS = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})
MAX_KEY = 250  # MLflow's limit on metric/param/tag keys
MAX_PARAM_VALUE = 6000
CHECKPOINT_PREFIX = "lmeval"  # evaluations of saved checkpoints
LIVE_PREFIX = "lmeval_live"  # evaluations of live training params (LMEvalCallback)


def key_part(text: Any) -> str:
    """One path component of an MLflow key: MLflow accepts only ``[/\\w.\\- :]``."""
    text = str(text).replace("@", "_at_").replace("/", "_")
    text = re.sub(r"[^\w.\- :]", "_", text)
    # MLflow also rejects keys that a path normalisation would change ("a/./b", "a/../b").
    return "_" if text in ("", ".", "..") else text


def fit_key(key: str) -> str:
    """Keep a key within MLflow's length limit, staying unique by a short hash of the original."""
    if len(key) <= MAX_KEY:
        return key
    return key[: MAX_KEY - 9] + "-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def mlflow_key(*parts: Any) -> str:
    """``a/b/c`` from path components, each in MLflow's alphabet, the whole within its length limit."""
    return fit_key("/".join(key_part(part) for part in parts))


def metric_key(task: str, lm_eval_key: str, prefix: str = CHECKPOINT_PREFIX) -> str | None:
    """lm-eval's ``"<metric>,<filter>"`` key as an MLflow metric key, or None if it is no metric.

    ``("arc", "acc,none")`` -> ``"lmeval/arc/acc"``; ``("gsm8k", "exact_match,strict-match")`` ->
    ``"lmeval/gsm8k/exact_match/strict-match"``; ``"alias"``, ``"name"``, ``"sample_len"`` -> None.
    Characters MLflow rejects become ``_`` (``@`` becomes ``_at_``). ``prefix`` replaces ``lmeval``
    (``LIVE_PREFIX`` for live evaluations).
    """
    metric, _, filter_name = str(lm_eval_key).partition(",")
    if not metric or metric in NOT_METRICS:
        return None
    return mlflow_key(prefix, task, metric, *([filter_name] if filter_name and filter_name != "none" else []))


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


def task_sections(results: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(task or group name, its metrics) for every task and group, each once."""
    sections = results.get("results") if isinstance(results.get("results"), Mapping) else results
    seen = set()
    for source in (sections, results.get("groups") or {}):
        for name, values in source.items():
            if isinstance(values, Mapping) and name not in seen:
                seen.add(name)
                yield name, values


def task_metrics(results: Mapping[str, Any], prefix: str = CHECKPOINT_PREFIX) -> Iterator[tuple[str, str, float]]:
    """(task, MLflow key, value) of every numeric metric and stderr of every task and group.

    "N/A" and other non-numeric values are left out.
    """
    for task, values in task_sections(results):
        for raw_key, value in values.items():
            key, number = metric_key(task, raw_key, prefix), as_float(value)
            if key is not None and number is not None:
                yield task, key, number


def flatten_metrics(results: Mapping[str, Any], prefix: str = CHECKPOINT_PREFIX) -> dict[str, float]:
    """Every numeric metric and stderr of every task and group, keyed by ``metric_key`` (with ``prefix``).

    Takes lm-eval's whole output (with ``"results"``) or just its ``results`` mapping.
    """
    return {key: number for _, key, number in task_metrics(results, prefix)}


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as flat MLflow params (``a.b`` keys, JSON lists), secrets redacted."""
    secrets = env_secrets()
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key_part(key)}"
        if isinstance(value, Mapping) and value and not is_secret_key(str(key)):
            flat.update(flatten_params(value, prefix=name + "."))
            continue
        value = redact(value, str(key), secrets)
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[fit_key(name)] = text[:MAX_PARAM_VALUE]
    return flat


def _table_value(value: Any) -> Any:
    number = as_float(value)
    return number if number is not None else (None if value is None else str(value))


def results_table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric, filter): Task, Version, Filter, n-shot, Metric, Value, Stderr.

    Also the raw ``lm-eval key`` and the ``MLflow key`` it maps to, so the mapping stays visible.
    """
    versions, n_shot = results.get("versions") or {}, results.get("n-shot") or {}
    rows = []
    for task, values in task_sections(results):
        for raw_key, value in values.items():
            metric, _, filter_name = str(raw_key).partition(",")
            if metric in NOT_METRICS or metric.endswith("_stderr") or metric_key(task, raw_key) is None:
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
