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

Sampling schemes (both seeded; results do not depend on the chunk size):

* few distinct joint per-document rows (0/1 metrics: at most 4 ``(a, b)`` pairs): the
  resample's row counts are ``Multinomial(n, freq / n)``, one cheap draw per replicate;
* otherwise documents ``floor(n * U)`` from ``Generator.random``, which consumes one word
  per draw, so a chunk of ``[rows, n]`` draws equals ``rows`` successive ``random(n)`` calls
  and a plain Python loop with the same seed reproduces the replicates exactly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from . import stats
from .errors import UserError

RESULTS_FILE = "results.json"
DEFAULT_ITERATIONS = 100_000
CONFIDENCE = 0.95
# McNemar: exact binomial below this many discordant pairs, chi-square (continuity-corrected) from it.
EXACT_BELOW = 25

# Bound on the entries (draws, counts, gathered values) one chunk holds.
_CHUNK_ENTRIES = 1 << 20
# Up to this many distinct joint rows, multinomial counts are cheaper than drawing documents.
_FEW_ROWS = 64
# Record fields that are no metric (lm-eval's evaluator writes these next to the metrics).
_RECORD_FIELDS = frozenset({
    "doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
    "doc_hash", "prompt_hash", "target_hash",
})
_NOT_METRICS = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})

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
# Tests on paired data (pure)
# --------------------------------------------------------------------------


def mcnemar_p(a, b) -> float:
    """Two-sided McNemar p-value of paired 0/1 outcomes ``a``, ``b``: [n] each.

    Only the discordant pairs count: ``n01`` (A wrong, B right) and ``n10`` (A right, B wrong).
    Fewer than 25 of them: exact binomial, ``min(1, 2 * P(X <= min(n01, n10)))`` with
    ``X ~ Bin(n01 + n10, 1/2)``.  Otherwise the continuity-corrected chi-square
    ``max(|n01 - n10| - 1, 0)^2 / (n01 + n10)`` on 1 degree of freedom, whose survival
    function is ``erfc(sqrt(x / 2))``.  1.0 when no pair disagrees.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    n01 = int(np.count_nonzero(~a & b))
    n10 = int(np.count_nonzero(a & ~b))
    return mcnemar_from_counts(n01, n10)


def mcnemar_from_counts(n01: int, n10: int) -> float:
    """McNemar's two-sided p-value from the two discordant counts (see :func:`mcnemar_p`)."""
    discordant = n01 + n10
    if discordant == 0:
        return 1.0
    if discordant < EXACT_BELOW:
        # Exact rational arithmetic: 2^-n tail sums stay exact for the small n used here.
        tail = Fraction(sum(math.comb(discordant, i) for i in range(min(n01, n10) + 1)), 2**discordant)
        return float(min(Fraction(1), 2 * tail))
    # Clipped at 0 so that n01 == n10 gives p = 1 rather than slightly less.
    statistic = max(abs(n01 - n10) - 1, 0) ** 2 / discordant
    return math.erfc(math.sqrt(statistic / 2.0))


def _point(aggregate: Callable, items: np.ndarray) -> float:
    """The aggregate of the full sample: items [n, ...] -> float."""
    return float(np.asarray(aggregate(items[None]), dtype=np.float64)[0])


def _multinomial_counts(rows_count: int, freq: np.ndarray, iters: int, seed: int, chunk: int):
    """Replicate counts of ``rows_count`` distinct rows, chunk by chunk: yields [k, u] floats."""
    rng = np.random.default_rng(seed)
    n = int(freq.sum())
    pvals = freq / n
    for start in range(0, iters, chunk):
        yield rng.multinomial(n, pvals, size=min(chunk, iters - start)).astype(np.float64)


def _index_chunks(n: int, iters: int, seed: int, chunk: int):
    """Resampled document indices, chunk by chunk: yields [k, n] intp.

    ``floor(n * U)`` from ``Generator.random`` (one stream word per draw, no buffering), so
    the concatenated chunks equal ``iters`` successive ``rng.random(n)`` calls.  The bias of
    ``floor(n * U)`` is below 2^-53 per draw.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, iters, chunk):
        k = min(chunk, iters - start)
        idx = (rng.random((k, n)) * n).astype(np.intp)
        np.minimum(idx, n - 1, out=idx)  # guards U * n rounding up to n
        yield idx


def paired_bootstrap_deltas(aggregate: Callable, a, b, iters: int = DEFAULT_ITERATIONS, seed: int = 0,
                            chunk_size: int | None = None) -> np.ndarray:
    """Paired bootstrap replicates of ``aggregate(b) - aggregate(a)``: [iters].

    ``a``, ``b``: [n] or [n, 2] per-document items of the same documents in the same order.
    ``aggregate``: vectorised, ``[k, n, ...] -> [k]`` (a ``stats`` aggregate; those with
    ``features``/``finish`` are re-aggregated from resampled feature sums, never from
    materialised resamples).  ``chunk_size`` caps replicates per batch; it does not change the
    result.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n, iters = len(a), int(iters)
    if len(b) != n:
        raise ValueError(f"a has {n} documents, b has {len(b)}")
    if n == 0 or iters <= 0:
        return np.zeros(0)
    out = np.empty(iters)

    if hasattr(aggregate, "features"):
        fa, fb = aggregate.features(a), aggregate.features(b)  # [n, da], [n, db]
        da = fa.shape[1]
        joint = np.ascontiguousarray(np.concatenate([fa, fb], axis=1), dtype=np.float64)  # [n, da + db]
        rows, freq = np.unique(joint, axis=0, return_counts=True)  # [u, da + db], [u]
        if len(rows) <= _FEW_ROWS:
            chunk = chunk_size or max(1, _CHUNK_ENTRIES // len(rows))
            batches = (counts @ rows for counts in _multinomial_counts(len(rows), freq, iters, seed, chunk))
        else:
            chunk = chunk_size or max(1, _CHUNK_ENTRIES // n)

            def sums_of(idx):
                # Resample counts per document via one bincount over row-offset indices, then
                # feature sums by a [k, n] @ [n, d] matmul (no [k, n, d] gather).
                k = len(idx)
                flat = (idx + (np.arange(k) * n)[:, None]).ravel()
                counts = np.bincount(flat, minlength=k * n).reshape(k, n).astype(np.float64)
                return counts @ joint

            batches = (sums_of(idx) for idx in _index_chunks(n, iters, seed, chunk))
        start = 0
        for sums in batches:  # [k, da + db]
            k = len(sums)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                out[start : start + k] = aggregate.finish(sums[:, da:], n) - aggregate.finish(sums[:, :da], n)
            start += k
        return out

    # Any other aggregate (median, ...): gather the resamples themselves.
    row_size = max(1, a[0].size)
    chunk = chunk_size or max(1, _CHUNK_ENTRIES // (n * row_size))
    start = 0
    for idx in _index_chunks(n, iters, seed, chunk):
        k = len(idx)
        out[start : start + k] = np.asarray(aggregate(b[idx]), np.float64) - np.asarray(aggregate(a[idx]), np.float64)
        start += k
    return out


def percentile_ci(deltas, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates ``deltas`` [iters] (NaN replicates ignored)."""
    deltas = np.asarray(deltas, dtype=np.float64)
    if not np.isfinite(deltas).any():
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(deltas, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_p(deltas) -> float:
    """Two-sided percentile-bootstrap p-value of "no difference" from replicates [iters].

    ``2 * min(#(d <= 0) + 1, #(d >= 0) + 1) / (iters + 1)``, capped at 1: the smallest
    two-sided level whose percentile interval still holds 0, so ``p < 0.05`` exactly when the
    95% interval excludes 0 (up to replicates tied at 0, which count on both sides and keep the
    test conservative).  The +1s (Davison & Hinkley) keep p above 0 with finite replicates.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    deltas = deltas[~np.isnan(deltas)]
    if len(deltas) == 0:
        return math.nan
    below = int(np.count_nonzero(deltas <= 0))
    above = int(np.count_nonzero(deltas >= 0))
    return min(1.0, 2.0 * (min(below, above) + 1) / (len(deltas) + 1))


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
    results_a: dict = field(default_factory=dict, repr=False)
    results_b: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> list[dict[str, Any]]:
        return [row.to_json() for row in self.rows]


def _read_results(directory: Path) -> dict:
    from .tracking import read_results

    if not (directory / RESULTS_FILE).is_file():
        raise UserError(f"no {RESULTS_FILE} in {directory}; compare takes two evaluation results directories")
    return read_results(directory)


def _leaf_tasks(results: Mapping[str, Any]) -> list[str]:
    """Tasks with per-document samples: results entries that are no group of other tasks."""
    groups = {name for name, subtasks in (results.get("group_subtasks") or {}).items() if subtasks}
    return [task for task, values in results["results"].items() if isinstance(values, Mapping) and task not in groups]


def _samples_path(directory: Path, task: str) -> Path:
    from .evaluation import safe_name

    return directory / f"samples_{safe_name(task)}.jsonl"


@dataclass
class _TaskSamples:
    """One task's per-document metric values: ``values[(metric, filter)][doc_id]``."""

    doc_ids: set = field(default_factory=set)
    doc_hashes: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)


def _read_samples(directory: Path, task: str) -> _TaskSamples:
    path = _samples_path(directory, task)
    if not path.is_file():
        raise UserError(f"no per-document samples for task {task} in {directory} ({path.name} missing); "
                        "compare needs evaluations run with --log_samples")
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
        if metric in _NOT_METRICS or metric.endswith("_stderr") or isinstance(value, (str, bool)) or value is None:
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
    value_a, value_b = _point(aggregate, a), _point(aggregate, b)
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
    re-aggregated as lm-eval did (bleu, acc_all, ...) are listed in ``skipped``.
    """
    if iterations < 1:
        raise UserError(f"--iterations must be at least 1, got {iterations}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    results_a, results_b = _read_results(a_dir), _read_results(b_dir)
    tasks_b = set(_leaf_tasks(results_b))
    tasks = [task for task in _leaf_tasks(results_a) if task in tasks_b]
    if not tasks:
        raise UserError(f"{a_dir} and {b_dir} share no task (A: {', '.join(_leaf_tasks(results_a)) or 'none'}; "
                        f"B: {', '.join(sorted(tasks_b)) or 'none'})")
    comparison = Comparison(a_dir, b_dir, iterations, seed, results_a=results_a, results_b=results_b)
    for task in sorted(tasks):
        samples_a, samples_b = _read_samples(a_dir, task), _read_samples(b_dir, task)
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
        ours = _point(aggregate, items)
        try:
            theirs = float(value)
        except (TypeError, ValueError):
            return None, f"{side}'s value is not numeric"
        if not (math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(ours) and math.isnan(theirs))):
            return None, f"re-aggregating {side}'s samples gives {ours:.6g}, results.json says {theirs:.6g}"
    return compare_metric(task, metric, filter_name, aggregate, a, b, iterations, seed), None


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return "N/A"
    return f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return "N/A"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def _markdown(header: list[str], rows: Iterable[list[str]], right: set[int]) -> str:
    """A pipe table like lm-eval's ``make_table`` (numbers right-aligned)."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(cells):
        return "|" + "|".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + "|"

    rule = "|" + "|".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def render_table(comparison: Comparison) -> str:
    """Markdown: a heading naming A and B, the table, and the metrics left out."""
    def described(directory: Path, results: Mapping[str, Any]) -> str:
        step = (results.get("checkpoint") or {}).get("step")
        return f"`{directory}`" + (f" (step {step})" if step is not None else "")

    header = ["Tasks", "Filter", "Metric", "n", "A", "B", "B−A", f"{CONFIDENCE:.0%} CI", "p", "McNemar p"]
    body = [
        [r.task, r.filter, r.metric, str(r.n), _number(r.a), _number(r.b), _number(r.delta),
         f"[{_number(r.ci_low)}, {_number(r.ci_high)}]", _p(r.p_value), _p(r.mcnemar_p)]
        for r in comparison.rows
    ]
    lines = [
        f"A: {described(comparison.a_dir, comparison.results_a)}  ",
        f"B: {described(comparison.b_dir, comparison.results_b)}  ",
        f"paired bootstrap over documents: {comparison.iterations:,} iterations, seed {comparison.seed}",
        "",
        _markdown(header, body, right={3, 4, 5, 6, 8, 9}) if body else "(no metric could be compared)",
    ]
    if comparison.skipped:
        lines += ["", "Not compared:", *(f"- {why}" for why in comparison.skipped)]
    return "\n".join(lines) + "\n"


def write_json(comparison: Comparison, path: str | os.PathLike) -> Path:
    """Write the rows as a JSON list of {task, metric, filter, n, a, b, delta, ci_low, ci_high,
    p_value[, mcnemar_p]}."""
    path = Path(path)
    try:
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(comparison.to_json(), indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def write_consecutive_comparisons(results_dirs_by_step: Mapping[int, Path], out_dir: Path, *,
                                  iterations: int = DEFAULT_ITERATIONS, seed: int = 0,
                                  strict: bool = True) -> list[Path]:
    """Compare each checkpoint with the previous one: ``compare_step_<a>_vs_<b>.md`` and ``.json``.

    ``results_dirs_by_step``: {step: results dir}; pairs are consecutive in step order.  With
    ``strict=False`` a pair that cannot be compared (no samples, different documents) is skipped
    with a warning instead of raising.  Returns the files written.
    """
    import warnings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = sorted(results_dirs_by_step)
    written = []
    for step_a, step_b in itertools.pairwise(steps):
        try:
            comparison = compare(results_dirs_by_step[step_a], results_dirs_by_step[step_b], iterations, seed)
        except UserError as error:
            if strict:
                raise
            warnings.warn(f"not comparing step {step_a} with step {step_b}: {error}", stacklevel=2)
            continue
        stem = out_dir / f"compare_step_{step_a}_vs_{step_b}"
        markdown = stem.with_suffix(".md")
        markdown.write_text(render_table(comparison), encoding="utf-8")
        written += [markdown, write_json(comparison, stem.with_suffix(".json"))]
    return written


# --------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------


def publish_key(row: MetricComparison, figure: str) -> str:
    """``compare/<task>/<metric>[/<filter>]/<figure>``, in MLflow's key alphabet."""
    from .tracking import _fit_key, _key_part

    parts = ["compare", _key_part(row.task), _key_part(row.metric)]
    if row.filter and row.filter != "none":
        parts.append(_key_part(row.filter))
    return _fit_key("/".join([*parts, figure]))


def publish(comparison: Comparison, tracking_uri: str | None = None) -> str:
    """Log the deltas, CIs and p-values onto B's evaluation run; returns its run id.

    The run is found by B's evaluation identity tag in any experiment of the resolved tracking
    URI.  Metrics are logged at A's checkpoint step (so comparisons of B against several
    baselines stay apart) with A's evaluation time, so publishing again is a no-op.
    """
    from . import tracking

    identity = tracking.evaluation_identity(comparison.results_b)[tracking.TAG_IDENTITY]
    uri = tracking.resolve_tracking_uri(tracking_uri)
    with tracking.http_limits(), tracking._translated(uri, "publishing the comparison"):
        from mlflow.entities import Metric, ViewType

        client = tracking._client(uri)
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        runs = list(client.search_runs(
            experiment_ids, filter_string=f"tags.`{tracking.TAG_IDENTITY}` = '{identity}'",
            order_by=["attributes.start_time DESC"], max_results=50,
        )) if experiment_ids else []
        finished = [run for run in runs if run.info.status == "FINISHED"]
        if not (finished or runs):
            raise UserError(f"B's evaluation ({comparison.b_dir}) is not in MLflow at {tracking.redact_uri(uri)}; "
                            f"run `mlflow-lmeval sync {comparison.b_dir}` first")
        run = min(finished or runs, key=lambda r: r.info.run_id)  # the one sync keeps (smallest id)
        step = (comparison.results_a.get("checkpoint") or {}).get("step")
        step = int(step) if isinstance(step, int) else 0
        timestamp = tracking.evaluation_timestamp_ms(comparison.results_a, comparison.a_dir / RESULTS_FILE)
        metrics = [
            Metric(publish_key(row, figure), float(value), timestamp, step)
            for row in comparison.rows
            for figure, value in (("delta", row.delta), ("ci_low", row.ci_low), ("ci_high", row.ci_high),
                                  ("p_value", row.p_value))
            if value is not None and math.isfinite(value)
        ]
        tracking._log_batch(client, run.info.run_id, metrics=metrics)
    return run.info.run_id


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def run_command(args) -> None:
    """``mlflow-lmeval compare``: print the table; optionally write JSON and publish."""
    comparison = compare(args.a, args.b, iterations=args.iterations, seed=args.seed)
    print(render_table(comparison), end="")
    if args.json:
        print(f"wrote {write_json(comparison, args.json)}")
    if args.publish:
        run_id = publish(comparison, getattr(args, "tracking_uri", None))
        print(f"logged {len(comparison.rows)} comparison(s) to MLflow run {run_id}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on an ``add_subparsers()`` object; returns the new parser."""
    parser = subparsers.add_parser(
        "compare", help="paired significance of B - A per task and metric (needs --log_samples results)",
        description="Compare two results directories document by document: B - A with a 95% paired-bootstrap "
                    "CI, a p-value, and McNemar's test for 0/1 metrics.")
    parser.add_argument("a", help="baseline results directory (results.json + samples_<task>.jsonl)")
    parser.add_argument("b", help="results directory to compare against A")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    parser.add_argument("--iterations", type=_positive_int, default=DEFAULT_ITERATIONS,
                        help=f"bootstrap iterations (default: {DEFAULT_ITERATIONS})")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--publish", action="store_true",
                        help="log the deltas, CIs and p-values onto B's MLflow evaluation run")
    parser.add_argument("--tracking_uri", help="for --publish (default: MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db)")
    parser.set_defaults(func=run_command)
    return parser
