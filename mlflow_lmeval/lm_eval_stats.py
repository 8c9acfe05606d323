"""Our statistics inside lm-eval's results: fast stderrs for every metric, and token perplexity.

lm-eval picks a metric's stderr estimator through ``stderr_for_metric(aggregation, iters)``,
called from ``evaluator_utils`` with the exact per-document items. ``fast_stderrs`` swaps that one
seam for the duration of an evaluation: the vectorised bootstrap of ``stats`` replaces lm-eval's
pure-Python one (no process pool is ever forked), and the aggregations lm-eval leaves without a
stderr (``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``) get one.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import stats

# lm_eval is imported lazily, in the functions: its metrics and evaluator_utils take about 0.35 s
# to import on this machine, which importing this module (from evaluation, which the CLI loads at
# start) should not cost.


def _aggregation_names() -> dict:
    from lm_eval.api import metrics

    return {
        metrics.mean: "mean",
        metrics.median: "median",
        metrics.perplexity: "perplexity",
        metrics.weighted_perplexity: "weighted_perplexity",
        metrics.bits_per_byte: "bits_per_byte",
        metrics.f1_score: "f1",
        metrics.matthews_corrcoef: "matthews_corrcoef",
        metrics.nanmean: "nanmean",
    }


@contextlib.contextmanager
def fast_stderrs(seed: int = 1234):
    """Within the block, lm-eval computes stderrs with ``stats`` where it knows the aggregation."""
    from lm_eval import evaluator_utils

    original = evaluator_utils.stderr_for_metric
    names = _aggregation_names()

    def stderr_for_metric(metric, bootstrap_iters):
        name = names.get(metric)
        if name is None or bootstrap_iters <= 0:
            return original(metric=metric, bootstrap_iters=bootstrap_iters)  # bleu, chrf, acc_all, ...
        return lambda items: stats.stderr_for(name, items, iters=bootstrap_iters, seed=seed)

    evaluator_utils.stderr_for_metric = stderr_for_metric
    try:
        yield
    finally:
        evaluator_utils.stderr_for_metric = original


TOKEN_LEVEL_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling")


def add_token_perplexity(output: dict, document_scores: dict[str, list[tuple[float, int]]], iters: int) -> None:
    """Add ``token_perplexity`` and ``mean_token_loglik`` (with stderrs) to each task scored per
    document, from (log-likelihood, scored tokens) pairs fused per request."""
    for task, scores in document_scores.items():
        config = output.get("configs", {}).get(task, {})
        # A document without tokens (an empty rolling document scores 0.0 over 0 tokens) adds
        # nothing to either sum, and a resample of only such documents would be 0/0: leave them out.
        scores = [(loglik, count) for loglik, count in scores if count > 0]
        if config.get("output_type") not in TOKEN_LEVEL_OUTPUT_TYPES or task not in output.get("results", {}) or not scores:
            continue
        logliks, counts = np.asarray(scores, np.float64).T
        figures = stats.token_perplexity(logliks, counts, iters=iters)
        row = output["results"][task]
        for name in ("token_perplexity", "mean_token_loglik"):
            row[f"{name},none"] = figures[name]
            stderr = figures[f"{name}_stderr"]
            row[f"{name}_stderr,none"] = stderr if stderr is not None else "N/A"
        output.setdefault("higher_is_better", {}).setdefault(task, {}).update(
            {"token_perplexity": False, "mean_token_loglik": True}
        )
