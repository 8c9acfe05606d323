"""lm-eval's aggregations, vectorised, and their standard errors; corpus token perplexity.

Shapes: ``n`` documents.  Per-document samples are ``[n]`` (one float each) or
``[n, 2]`` (``(loglik, weight)`` or ``(gold, pred)`` pairs).  Aggregates take
a batch of resamples ``[k, n]`` / ``[k, n, 2]`` and return ``[k]``.  Each
aggregate also carries the hint that lets ``bootstrap`` pick an exact fast
sampling scheme: ``rank`` (an order statistic) or ``features`` and ``finish``
(a function of per-document feature sums).  Means use lm-eval's closed-form
stderr; every other aggregation is bootstrapped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .bootstrap import bootstrap_replicates, bootstrap_stderr

__all__ = [
    "bits_per_byte",
    "byte_perplexity",
    "f1",
    "mcc",
    "mean",
    "mean_stderr",
    "median",
    "nanmean",
    "perplexity",
    "stderr_for",
    "token_perplexity",
    "weighted_mean",
    "weighted_perplexity",
    "word_perplexity",
]

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------
# Aggregates (vectorised; lm-eval definitions)
# --------------------------------------------------------------------------


def _sum_form(name: str, features: Callable, finish: Callable, doc: str) -> Callable:
    """Aggregate ``agg(x) = finish(features(x).sum(docs), n)``.

    ``features``: ``[..., n, *row] -> [..., n, d]``; ``finish``: feature sums
    ``[..., d]`` and ``n`` -> ``[...]``.  The bootstrap uses the attributes to
    draw feature sums without materialising resamples.
    """

    def agg(x):
        f = features(np.asarray(x))
        return finish(f.sum(axis=-2), f.shape[-2])

    agg.__name__ = agg.__qualname__ = name
    agg.__doc__ = doc
    agg.features = features
    agg.finish = finish
    return agg


def _scalars(x):
    return np.asarray(x, dtype=np.float64)[..., None]


def _pairs(x):
    return np.asarray(x, dtype=np.float64)[..., :2]


def _ratio(s, n=None):
    with np.errstate(invalid="ignore", divide="ignore"):
        return s[..., 0] / s[..., 1]


def _nan_features(x):
    x = np.asarray(x, dtype=np.float64)
    present = ~np.isnan(x)
    return np.stack([np.where(present, x, 0.0), present], axis=-1).astype(np.float64)


def _f1_features(x):
    x = np.asarray(x)
    gold, pred = x[..., 0] == 1, x[..., 1] == 1
    return np.stack([gold & pred, gold, pred], axis=-1).astype(np.float64)


def _f1_finish(s, n):
    # sklearn's binary F1 (pos_label=1): 2*tp / (#gold==1 + #pred==1), and 0.0
    # when both are zero (its zero_division="warn" default).
    denom = s[..., 1] + s[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * s[..., 0] / denom, 0.0)


def _mcc_features(x):
    x = np.asarray(x)[..., :2]
    labels, codes = np.unique(x, return_inverse=True)
    codes = codes.reshape(x.shape)
    k = len(labels)
    return (codes[..., :1] * k + codes[..., 1:] == np.arange(k * k)).astype(np.float64)


def _mcc_finish(s, n):
    # sklearn's multiclass MCC from the confusion matrix; empty classes do not
    # change it, so resamples may miss labels of the full sample.
    k = math.isqrt(s.shape[-1])
    c = s.reshape(s.shape[:-1] + (k, k))
    t_sum, p_sum = c.sum(axis=-1), c.sum(axis=-2)
    correct = np.trace(c, axis1=-2, axis2=-1)
    total = p_sum.sum(axis=-1)
    cov_tp = correct * total - (t_sum * p_sum).sum(axis=-1)
    cov_pp = total**2 - (p_sum * p_sum).sum(axis=-1)
    cov_tt = total**2 - (t_sum * t_sum).sum(axis=-1)
    denom = cov_pp * cov_tt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom == 0, 0.0, cov_tp / np.sqrt(denom))


mean = _sum_form("mean", _scalars, lambda s, n: s[..., 0] / n, "Mean. x: [k, n] -> [k].")
perplexity = _sum_form(
    "perplexity",
    _scalars,
    lambda s, n: np.exp(-s[..., 0] / n),
    "exp(-mean(loglik)). x: [k, n] -> [k].",
)
nanmean = _sum_form(
    "nanmean", _nan_features, _ratio, "Mean over non-NaN entries (NaN if none). x: [k, n] -> [k]."
)
weighted_mean = _sum_form(
    "weighted_mean", _pairs, _ratio, "sum(loglik) / sum(weight). x: [k, n, 2] -> [k]."
)
weighted_perplexity = _sum_form(
    "weighted_perplexity",
    _pairs,
    lambda s, n: np.exp(-_ratio(s)),
    "exp(-sum(loglik) / sum(weight)). x: [k, n, 2] -> [k].",
)
# lm-eval aggregates both with weighted_perplexity (weights: words / bytes).
word_perplexity = weighted_perplexity
byte_perplexity = weighted_perplexity
bits_per_byte = _sum_form(
    "bits_per_byte",
    _pairs,
    lambda s, n: -_ratio(s) / _LN2,
    "-sum(loglik) / sum(bytes) / ln 2. x: [k, n, 2] -> [k].",
)
f1 = _sum_form(
    "f1",
    _f1_features,
    _f1_finish,
    "Binary F1 of (gold, pred) pairs, positive label 1 (sklearn f1_score; other "
    "labels count as negative where sklearn would raise). x: [k, n, 2] -> [k].",
)
mcc = _sum_form(
    "mcc",
    _mcc_features,
    _mcc_finish,
    "Matthews correlation of (gold, pred) pairs, any number of classes "
    "(sklearn matthews_corrcoef). x: [k, n, 2] -> [k].",
)


def median(x):
    """lm-eval's median ``sorted(x)[n // 2]`` (upper median). x: [k, n] -> [k]."""
    x = np.asarray(x)
    m = x.shape[-1] // 2
    return np.partition(x, m, axis=-1)[..., m]


# Which order statistic: lets the bootstrap draw it directly (see ``bootstrap``).
median.rank = lambda n: n // 2


def mean_stderr(x) -> float:
    """lm-eval's closed form: sample stddev (ddof=1) / sqrt(n). x: [n]."""
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        return math.nan
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


# --------------------------------------------------------------------------
# Dispatch by lm-eval name
# --------------------------------------------------------------------------

# Aggregation names, and metric names that imply one (lm-eval's registry).
_MEAN_NAMES = {
    "mean", "acc", "acc_norm", "acc_mutual_info", "acc_bytes", "exact_match", "likelihood",
}
_BOOTSTRAPPED = {
    "median": median,
    "perplexity": perplexity,
    "nanmean": nanmean,
    "weighted_perplexity": weighted_perplexity,
    "word_perplexity": weighted_perplexity,
    "byte_perplexity": weighted_perplexity,
    "bits_per_byte": bits_per_byte,
    "f1": f1,
    "matthews_corrcoef": mcc,
    "mcc": mcc,
}


def stderr_for(metric_name: str, items, iters: int = 100_000, seed: int | None = 1234):
    """Standard error of an lm-eval metric over its per-document ``items``.

    ``metric_name``: an lm-eval aggregation name (``mean``, ``median``,
    ``perplexity``, ``weighted_perplexity``, ``bits_per_byte``, ``f1``,
    ``matthews_corrcoef``, ``nanmean``) or a metric name that implies one
    (``acc``, ``word_perplexity``, ``mcc``, ...).  Means use lm-eval's closed
    form; the rest are bootstrapped with ``iters`` replicates.  ``items``: [n]
    values or [n, 2] pairs.  Returns None when there is no sensible stderr:
    ``iters <= 0`` (as lm-eval), unknown names (bleu, chrf, ter, acc_all, ...),
    fewer than 2 documents, non-numeric items or a non-finite result.
    """
    if iters <= 0:
        return None
    try:
        if metric_name in _MEAN_NAMES:
            value = mean_stderr(np.asarray(items, dtype=np.float64))
        elif metric_name in _BOOTSTRAPPED:
            arr = np.asarray(items)
            if len(arr) < 2:
                return None
            value = bootstrap_stderr(_BOOTSTRAPPED[metric_name], arr, iters, seed)
        else:
            return None
    except (TypeError, ValueError):
        return None
    return float(value) if math.isfinite(value) else None


def token_perplexity(
    logliks,
    token_counts,
    iters: int = 100_000,
    seed: int | None = 1234,
    chunk_size: int | None = None,
    workers: int | None = None,
) -> dict:
    """Corpus token perplexity with bootstrap stderrs over documents.

    ``logliks``: [n] summed log-likelihood per document; ``token_counts``: [n]
    tokens scored per document.  ``mean_token_loglik = sum(loglik) /
    sum(tokens)`` and ``token_perplexity = exp(-mean_token_loglik)``; both
    stderrs come from one ratio-estimator bootstrap (documents resampled with
    their token counts).  Stderrs are None with fewer than 2 documents or
    replicates.
    """
    ll = np.asarray(logliks, dtype=np.float64).ravel()
    tok = np.asarray(token_counts, dtype=np.float64).ravel()
    if ll.shape != tok.shape:
        raise ValueError(f"logliks {ll.shape} and token_counts {tok.shape} differ in shape")
    mean_ll = float(ll.sum() / tok.sum())
    out = {
        "token_perplexity": math.exp(-mean_ll),
        "mean_token_loglik": mean_ll,
        "token_perplexity_stderr": None,
        "mean_token_loglik_stderr": None,
    }
    if len(ll) >= 2 and iters >= 2:
        reps = bootstrap_replicates(
            weighted_mean, np.stack([ll, tok], axis=1), iters, seed, chunk_size, workers
        )
        out["mean_token_loglik_stderr"] = float(np.std(reps, ddof=1))
        out["token_perplexity_stderr"] = float(np.std(np.exp(-reps), ddof=1))
    return out
