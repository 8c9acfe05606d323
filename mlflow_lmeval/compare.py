"""``compare A B``: paired significance of the score differences between two evaluations.

A and B are results directories (``results.json`` plus the ``samples_<task>.jsonl`` that
``--log_samples`` writes).  For every task and metric both hold, this module reports A, B,
B - A, a 95% paired-bootstrap confidence interval of B - A and a two-sided p-value; for 0/1
per-document metrics (acc, acc_norm, exact_match, ...) also McNemar's test.

Pairing: both evaluations must have scored the same documents.  A bootstrap replicate draws
``n`` document indices with replacement and applies them to A *and* B, so the replicate's
delta keeps the per-document correlation between the two models (which is what makes a paired
test far more sensitive than comparing two stderrs).

Each replicate re-aggregates as lm-eval does (``mlflow_lmeval.stats`` aggregates): means for
acc-like metrics, ``exp(-mean)`` for ``perplexity``, ``exp(-sum(loglik) / sum(weight))`` for
word/byte perplexity, ``-sum(loglik) / sum(bytes) / ln 2`` for bits_per_byte, median, f1, mcc.
The tests themselves are in ``paired_stats``; the files a comparison becomes in ``compare_report``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import stats
from .errors import UserError
from .paired_stats import (
    DEFAULT_ITERATIONS,
    bootstrap_p,
    mcnemar_p,
    paired_bootstrap_deltas,
    percentile_ci,
    point,
)
from .results_file import (
    RESULTS_FILE,
    checkpoint_section,
    holds_results,
    read_results,
    samples_file_name,
    samples_files,
)
from .tracking import (
    TAG_IDENTITY,
    connected,
    evaluation_identity,
    evaluation_run,
    evaluation_timestamp_ms,
    log_batch,
    mlflow_key,
    redact_uri,
    resolve_tracking_uri,
)
from .tracking.keys import NOT_METRICS

# Record fields that are no metric (lm-eval's evaluator writes these next to the metrics).
_RECORD_FIELDS = frozenset({
    "doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
    "doc_hash", "prompt_hash", "target_hash",
})

# lm-eval aggregation names, and metric names that imply one.
_AGGREGATIONS: dict[str, Callable] = {
    "mean": stats.mean,
    "median": stats.median,
    "perplexity": stats.perplexity,
    "weighted_perplexity": stats.weighted_perplexity,
    "bits_per_byte": stats.bits_per_byte,
    "f1": stats.f1,
    "matthews_corrcoef": stats.mcc,
    "nanmean": stats.nanmean,
}
_BY_METRIC: dict[str, Callable] = {
    **{name: stats.mean for name in (
        "acc", "acc_norm", "acc_mutual_info", "acc_bytes", "exact_match", "likelihood", "brier_score")},
    "perplexity": stats.perplexity,
    "word_perplexity": stats.word_perplexity,
    "byte_perplexity": stats.byte_perplexity,
    "bits_per_byte": stats.bits_per_byte,
    "f1": stats.f1,
    "mcc": stats.mcc,
    "matthews_corrcoef": stats.mcc,
    "median": stats.median,
}


# --------------------------------------------------------------------------
# Results directories
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricComparison:
    """One (task, metric, filter) row of a comparison; ``mcnemar_p`` only for 0/1 metrics."""

    task: str
    metric: str
    filter: str
    n: int
    a: float
    b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    mcnemar_p: float | None = None

    def to_json(self) -> dict[str, Any]:
        row = {
            "task": self.task, "metric": self.metric, "filter": self.filter, "n": self.n,
            "a": self.a, "b": self.b, "delta": self.delta, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "p_value": self.p_value,
        }
        if self.mcnemar_p is not None:
            row["mcnemar_p"] = self.mcnemar_p
        # JSON has no NaN/inf: those become null.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


@dataclass
class Comparison:
    """All rows of ``compare(a_dir, b_dir)``, plus the metrics that could not be compared."""

    a_dir: Path
    b_dir: Path
    iterations: int
    seed: int
    rows: list[MetricComparison] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "task/metric: why"
    only_a: list[str] = field(default_factory=list)  # tasks not compared: in A's results only
    only_b: list[str] = field(default_factory=list)  # ... in B's only
    results_a: dict = field(default_factory=dict, repr=False)
    results_b: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> list[dict[str, Any]]:
        return [row.to_json() for row in self.rows]


def _read_results(directory: Path) -> dict:
    if not holds_results(directory):
        raise UserError(f"no {RESULTS_FILE} in {directory}; compare takes two evaluation results directories")
    return read_results(directory)


def _leaf_tasks(results: Mapping[str, Any]) -> list[str]:
    """Tasks with per-document samples: results entries that are no group of other tasks."""
    groups = {name for name, subtasks in (results.get("group_subtasks") or {}).items() if subtasks}
    return [task for task, values in results["results"].items() if isinstance(values, Mapping) and task not in groups]




@dataclass
class _TaskSamples:
    """One task's per-document metric values: ``values[(metric, filter)][doc_id]``."""

    doc_ids: set = field(default_factory=set)
    doc_hashes: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)


def _read_samples(directory: Path, results: Mapping[str, Any], task: str) -> _TaskSamples:
    """The task's samples file that ``results`` lists (a stale one from an earlier run is not read)."""
    path = samples_files(directory, results).get(task)
    if path is None:
        raise UserError(f"no per-document samples for task {task} in {directory} ({samples_file_name(task)} missing "
                        f"or not written with its {RESULTS_FILE}); compare needs evaluations run with --log_samples")
    samples, number = _TaskSamples(), 0
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                doc_id = record["doc_id"]
                samples.doc_ids.add(doc_id)
                if record.get("doc_hash") is not None:
                    samples.doc_hashes[doc_id] = record["doc_hash"]
                names = record.get("metrics") or [k for k in record if k not in _RECORD_FIELDS]
                by_filter = record.get("filter", "none")
                for name in names:
                    if name in record:
                        samples.values.setdefault((name, by_filter), {})[doc_id] = record[name]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read {path} (line {number}): {type(error).__name__}: {error}") from None
    return samples


def _check_same_documents(task: str, a: _TaskSamples, b: _TaskSamples) -> None:
    if a.doc_ids != b.doc_ids:
        shared = len(a.doc_ids & b.doc_ids)
        raise UserError(f"task {task}: A and B scored different documents (A {len(a.doc_ids)}, B {len(b.doc_ids)}, "
                        f"{shared} shared); compare evaluations with the same task config and --limit")
    differing = [d for d, h in a.doc_hashes.items() if d in b.doc_hashes and b.doc_hashes[d] != h]
    if differing:
        raise UserError(f"task {task}: A and B scored different documents ({len(differing)} doc_id(s) hold different "
                        f"text, e.g. doc_id {min(differing, key=str)}); the datasets differ")


def _metric_keys(values: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(lm-eval key, metric, filter) of each numeric metric of a results entry."""
    keys = []
    for raw_key, value in values.items():
        metric, _, filter_name = str(raw_key).partition(",")
        if metric in NOT_METRICS or metric.endswith("_stderr") or isinstance(value, (str, bool)) or value is None:
            continue
        keys.append((str(raw_key), metric, filter_name or "none"))
    return keys


def _aggregate_for(results: Mapping[str, Any], task: str, metric: str) -> Callable | None:
    """The aggregation lm-eval applied: the task config's, else the one the metric name implies."""
    for entry in ((results.get("configs") or {}).get(task) or {}).get("metric_list") or []:
        if isinstance(entry, Mapping) and entry.get("metric") == metric:
            named = entry.get("aggregation")
            if isinstance(named, str) and named in _AGGREGATIONS:
                return _AGGREGATIONS[named]
    return _BY_METRIC.get(metric)


def _is_binary(*arrays: np.ndarray) -> bool:
    return all(x.ndim == 1 and np.isin(x, (0.0, 1.0)).all() for x in arrays)


def compare_metric(task: str, metric: str, filter_name: str, aggregate: Callable, a, b,
                   iterations: int = DEFAULT_ITERATIONS, seed: int = 0) -> MetricComparison:
    """Compare one metric over paired items ``a``, ``b`` ([n] or [n, 2], same document order)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    deltas = paired_bootstrap_deltas(aggregate, a, b, iterations, seed)
    low, high = percentile_ci(deltas)
    value_a, value_b = point(aggregate, a), point(aggregate, b)
    binary = aggregate is stats.mean and _is_binary(a, b)
    return MetricComparison(
        task=task, metric=metric, filter=filter_name, n=len(a), a=value_a, b=value_b, delta=value_b - value_a,
        ci_low=low, ci_high=high, p_value=bootstrap_p(deltas), mcnemar_p=mcnemar_p(a, b) if binary else None,
    )


def compare(a_dir: str | os.PathLike, b_dir: str | os.PathLike, iterations: int = DEFAULT_ITERATIONS,
            seed: int = 0) -> Comparison:
    """Compare every task and metric of two results directories (B - A).

    Raises a one-line UserError when a directory is no results directory, the two share no
    task, a shared task has no samples file (evaluate with ``--log_samples``) or the two scored
    different documents of a task.  Metrics whose per-document values are missing or cannot be
    re-aggregated as lm-eval did (bleu, acc_all, ...) are listed in ``skipped``; tasks only one
    side holds, in ``only_a`` and ``only_b``.
    """
    if iterations < 1:
        raise UserError(f"--iterations must be at least 1, got {iterations}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    results_a, results_b = _read_results(a_dir), _read_results(b_dir)
    tasks_a, tasks_b = set(_leaf_tasks(results_a)), set(_leaf_tasks(results_b))
    tasks = tasks_a & tasks_b
    if not tasks:
        raise UserError(f"{a_dir} and {b_dir} share no task (A: {', '.join(sorted(tasks_a)) or 'none'}; "
                        f"B: {', '.join(sorted(tasks_b)) or 'none'})")
    comparison = Comparison(a_dir, b_dir, iterations, seed, results_a=results_a, results_b=results_b,
                            only_a=sorted(tasks_a - tasks_b), only_b=sorted(tasks_b - tasks_a))
    for task in sorted(tasks):
        samples_a, samples_b = _read_samples(a_dir, results_a, task), _read_samples(b_dir, results_b, task)
        _check_same_documents(task, samples_a, samples_b)
        values_a, values_b = results_a["results"][task], results_b["results"][task]
        keys_b = {key for key, _, _ in _metric_keys(values_b)}
        for raw_key, metric, filter_name in _metric_keys(values_a):
            if raw_key not in keys_b:
                continue
            row, why = _compare_key(results_a, task, raw_key, metric, filter_name, samples_a, samples_b,
                                    (values_a[raw_key], values_b[raw_key]), iterations, seed)
            if row is not None:
                comparison.rows.append(row)
            else:
                comparison.skipped.append(f"{task}/{raw_key}: {why}")
    return comparison


def _compare_key(results_a, task, raw_key, metric, filter_name, samples_a, samples_b, reported, iterations, seed):
    """(row, None), or (None, why it cannot be compared)."""
    per_doc_a = samples_a.values.get((metric, filter_name))
    per_doc_b = samples_b.values.get((metric, filter_name))
    if per_doc_a is None or per_doc_b is None:
        return None, "no per-document values in the samples"
    if per_doc_a.keys() != per_doc_b.keys():
        return None, "A and B hold per-document values for different documents"
    aggregate = _aggregate_for(results_a, task, metric)
    if aggregate is None:
        return None, "aggregation not supported"
    order = sorted(per_doc_a, key=lambda d: (str(type(d)), d))
    try:
        a = np.asarray([per_doc_a[d] for d in order], dtype=np.float64)
        b = np.asarray([per_doc_b[d] for d in order], dtype=np.float64)
    except (TypeError, ValueError):
        return None, "per-document values are not numeric"
    if a.ndim not in (1, 2) or a.shape != b.shape:
        return None, "per-document values have an unexpected shape"
    # Only compare what we can reproduce: our aggregate of the samples must give results.json's number.
    for items, value, side in ((a, reported[0], "A"), (b, reported[1], "B")):
        ours = point(aggregate, items)
        try:
            theirs = float(value)
        except (TypeError, ValueError):
            return None, f"{side}'s value is not numeric"
        if not (math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(ours) and math.isnan(theirs))):
            return None, f"re-aggregating {side}'s samples gives {ours:.6g}, results.json says {theirs:.6g}"
    return compare_metric(task, metric, filter_name, aggregate, a, b, iterations, seed), None


# --------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------


def publish_key(row: MetricComparison, figure: str) -> str:
    """``compare/<task>/<metric>[/<filter>]/<figure>``, in MLflow's key alphabet."""
    by_filter = [row.filter] if row.filter and row.filter != "none" else []
    return mlflow_key("compare", row.task, row.metric, *by_filter, figure)


def publish(comparison: Comparison, tracking_uri: str | None = None) -> str:
    """Log the deltas, CIs and p-values onto B's evaluation run; returns its run id.

    The run is found by B's evaluation identity tag in any experiment of the resolved tracking
    URI.  Metrics are logged at A's checkpoint step (so comparisons of B against several
    baselines stay apart) with A's evaluation time, so publishing again is a no-op.
    """
    # MLflow imported lazily: 2.0-3.4 s measured on this machine; the CLI imports this module.
    from mlflow.entities import Metric

    identity = evaluation_identity(comparison.results_b)[TAG_IDENTITY]
    uri = resolve_tracking_uri(tracking_uri)
    with connected(uri, "publishing the comparison") as client:
        run = evaluation_run(client, identity)
        if run is None:
            raise UserError(f"B's evaluation ({comparison.b_dir}) is not in MLflow at {redact_uri(uri)}; "
                            f"run `mlflow-lmeval sync {comparison.b_dir}` first")
        step = checkpoint_section(comparison.results_a).get("step")
        step = int(step) if isinstance(step, int) else 0
        timestamp = evaluation_timestamp_ms(comparison.results_a, comparison.a_dir / RESULTS_FILE)
        metrics = [
            Metric(publish_key(row, figure), float(value), timestamp, step)
            for row in comparison.rows
            for figure, value in (("delta", row.delta), ("ci_low", row.ci_low), ("ci_high", row.ci_high),
                                  ("p_value", row.p_value))
            if value is not None and math.isfinite(value)
        ]
        log_batch(client, run.info.run_id, metrics=metrics)
    return run.info.run_id
