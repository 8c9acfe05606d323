"""Fast, seeded bootstrap standard errors matching lm-eval's aggregations.

lm-eval (``lm_eval.api.metrics.bootstrap_stderr``) draws ``n`` documents with
replacement ``iters`` times in pure Python, re-aggregates each resample and
reports the sample standard deviation (ddof=1) of the replicates.  This module
computes the same estimator with numpy.

Shapes: ``n`` documents.  Per-document samples are ``[n]`` (one float each) or
``[n, 2]`` (``(loglik, weight)`` or ``(gold, pred)`` pairs).  Aggregates take
a batch of resamples ``[k, n]`` / ``[k, n, 2]`` and return ``[k]``.

The bootstrap picks one of three exact sampling schemes from the aggregate:

* order statistics (``median``): the ``m``-th smallest of ``n`` uniform draws
  from ``{0..n-1}`` is ``floor(n * U)`` with ``U ~ Beta(m + 1, n - m)``, so a
  replicate costs one Beta draw instead of a resample;
* sum-form aggregates (``finish(sum of per-document features)``: means,
  perplexities, ratio estimators, f1, mcc) whose features take few distinct
  values: the resample's category counts are ``Multinomial(n, freq / n)``;
* anything else: document indices cut from raw PCG64 output.  Replicate ``r``
  owns a fixed slice of the stream, so results do not depend on
  ``chunk_size`` or on the number of threads.  Sum-form aggregates look
  feature values up straight from the random lanes.

lm-eval runs ``iters // 1000 * 1000`` replicates when ``iters >= 1000``; we
run exactly ``iters``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

__all__ = [
    "bootstrap_replicates",
    "bootstrap_stderr",
    "mean_stderr",
    "stderr_for",
    "token_perplexity",
    "mean",
    "nanmean",
    "median",
    "perplexity",
    "weighted_mean",
    "weighted_perplexity",
    "word_perplexity",
    "byte_perplexity",
    "bits_per_byte",
    "f1",
    "mcc",
]

# Bound on the entries (random lanes, gathered values) one chunk holds.
_CHUNK_ENTRIES = 1 << 20
# Up to this many distinct feature rows, multinomial counts are cheaper than
# drawing documents (cost ~ one binomial per distinct row per replicate).
_FEW_ROWS = 64
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


# Which order statistic: lets the bootstrap draw it directly (see module doc).
median.rank = lambda n: n // 2


def mean_stderr(x) -> float:
    """lm-eval's closed form: sample stddev (ddof=1) / sqrt(n). x: [n]."""
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        return math.nan
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


def _tail_lanes(n: int, reject: float) -> int:
    """Spare lanes per replicate to replace rejected ones (shortfall is rare)."""
    if reject == 0.0:
        return 0
    mu = n * reject
    return math.ceil(1.5 * (mu + 8.0 * math.sqrt(mu) + 8.0) / (1.0 - reject))


class _Lanes:
    """Uniform document indices from raw PCG64 output.

    Replicate ``r`` reads stream words ``[r * words, (r + 1) * words)`` as
    ``width`` lanes of 16 (or, for n > 2**15, 32) bits.  Its first ``n`` lanes
    are its draws, ``lane % n``; lanes ``>= accept`` are rejected (that keeps
    the draws exactly uniform) and replaced by the next accepted lanes of its
    tail, or, if the tail runs short, by a per-replicate fallback stream.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.bits = 16 if n <= 1 << 15 else 32
        self.dtype = np.uint16 if self.bits == 16 else np.uint32
        span = 1 << self.bits
        self.accept = span // n * n
        self.rejects = self.accept < span
        per_word = 64 // self.bits
        tail = _tail_lanes(n, 1.0 - self.accept / span)
        self.width = -(-(n + tail) // per_word) * per_word
        self.words = self.width // per_word

    def draw(self, row0: int, rows: int) -> np.ndarray:
        """Raw lanes of replicates ``row0 .. row0 + rows - 1``: [rows, width]."""
        bitgen = np.random.PCG64(self.seed)
        bitgen.advance(row0 * self.words)
        raw = bitgen.random_raw(rows * self.words)
        return raw.view(self.dtype).reshape(rows, self.width)

    def repairs(self, lanes: np.ndarray, row0: int):
        """How rejected draws are replaced.

        Returns ``rejected`` [rows, n] bool, ``use`` [rows, width - n] bool
        (tail lanes taken as replacements) and the fallback draws as
        ``(rows_idx [m], docs [m])``.
        """
        n = self.n
        rejected = lanes[:, :n] >= self.accept
        # uint8 view + narrow accumulator: ~3x faster than count_nonzero(axis=1).
        need = rejected.view(np.uint8).sum(axis=1, dtype=np.uint16 if n < 1 << 16 else np.int64)
        ok = lanes[:, n:] < self.accept
        use = ok & (np.cumsum(ok, axis=1) <= need[:, None])
        short = need - np.count_nonzero(use, axis=1)
        fb_rows = np.repeat(np.arange(len(lanes)), short)
        fb_docs = [
            np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(row0 + r,)))
            .integers(0, n, size=short[r])
            for r in np.flatnonzero(short)
        ]
        fb_docs = np.concatenate(fb_docs) if fb_docs else np.zeros(0, np.intp)
        return rejected, use, fb_rows, fb_docs

    def indices(self, lanes: np.ndarray, row0: int) -> np.ndarray:
        """Document indices of the replicates: [rows, n] intp."""
        n = self.n
        idx = (lanes[:, :n] % n).astype(np.intp)
        if self.rejects:
            rejected, use, fb_rows, fb_docs = self.repairs(lanes, row0)
            tail_rows, tail_cols = np.nonzero(use)
            rows_idx = np.concatenate([tail_rows, fb_rows])
            docs = np.concatenate([lanes[:, n:][tail_rows, tail_cols] % n, fb_docs])
            # Boolean assignment fills row-major; both sides hold `need` per row.
            idx[rejected] = docs[np.argsort(rows_idx, kind="stable")]
        return idx


def _scratch(store: dict, key: str, shape: tuple) -> np.ndarray:
    # Reused per worker: fresh multi-MB arrays per chunk cost page faults.
    buf = store.get(key)
    if buf is None or buf.shape[1:] != shape[1:] or len(buf) < shape[0]:
        buf = store[key] = np.empty(shape)
    return buf[: shape[0]]


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _run_chunks(kernel: Callable, iters: int, chunk: int, workers: int, out: np.ndarray):
    """Fill ``out[s:s+rows] = kernel(s, rows, scratch)`` over all chunks."""
    starts = list(range(0, iters, chunk))

    def work(mine):
        scratch: dict = {}
        for s in mine:
            rows = min(chunk, iters - s)
            out[s : s + rows] = kernel(s, rows, scratch)

    workers = max(1, min(workers, len(starts)))
    if workers == 1:
        work(starts)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, [starts[w::workers] for w in range(workers)]))
    return out


def _lane_sums(feats, iters, seed, chunk_size, workers):
    """Bootstrap sums of per-document features: [n, d] -> [iters, d]."""
    n, d = feats.shape
    lanes = _Lanes(n, seed)
    width = lanes.width
    chunk = chunk_size or max(1, _CHUNK_ENTRIES // (width * d))
    if lanes.bits == 16:
        # Rejected lane values look up zeros, so they drop out of the sums.
        table = np.zeros((1 << 16, d))
        table[: lanes.accept] = feats[np.arange(lanes.accept) % n]
    else:
        table = None

    ones = np.ones(width)

    def kernel(row0, rows, scratch):
        raw = lanes.draw(row0, rows)
        vals = _scratch(scratch, "vals", (rows, width, d))
        flat = vals[..., 0] if d == 1 else vals
        if table is not None:
            # Lanes are always in range; "wrap" is numpy's cheapest mode here.
            np.take(table[:, 0] if d == 1 else table, raw, axis=0, mode="wrap", out=flat)
        else:
            np.take(feats, raw % n, axis=0, out=vals)
            vals[raw >= lanes.accept] = 0.0
        # Rejected lanes already hold zeros; keep only the tail lanes that
        # stand in for them.
        fb_rows = fb_docs = None
        if lanes.rejects:
            _, use, fb_rows, fb_docs = lanes.repairs(raw, row0)
            flat[:, n:] *= use if d == 1 else use[..., None]
        else:
            flat[:, n:] = 0.0
        sums = flat.sum(axis=1)[:, None] if d == 1 else np.matmul(ones, vals)
        if fb_rows is not None and len(fb_rows):
            np.add.at(sums, fb_rows, feats[fb_docs])
        return sums

    return _run_chunks(kernel, iters, chunk, workers, np.empty((iters, d)))


def _multinomial_sums(rows, counts, iters, seed, chunk_size):
    """Bootstrap sums when documents fall into few feature rows: [u, d] -> [iters, d]."""
    n = int(counts.sum())
    rng = np.random.default_rng(seed)
    pvals = counts / n
    chunk = chunk_size or max(1, _CHUNK_ENTRIES // len(rows))
    out = np.empty((iters, rows.shape[1]))
    # One sequential generator: the draws do not depend on the chunking.
    for s in range(0, iters, chunk):
        k = min(chunk, iters - s)
        out[s : s + k] = rng.multinomial(n, pvals, size=k).astype(np.float64) @ rows
    return out


def _seed_int(seed) -> int:
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    seed = int(seed)
    if seed < 0:
        raise ValueError("seed must be a non-negative integer")
    return seed


def bootstrap_replicates(
    aggregate: Callable,
    samples,
    iters: int,
    seed: int | None = 1234,
    chunk_size: int | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """The ``iters`` bootstrap replicates of ``aggregate``: [iters].

    ``samples``: [n] or [n, ...] per-document values (rows are resampled
    whole).  ``aggregate``: vectorised, ``[k, n, ...] -> [k]``; the aggregates
    of this module also carry the hints for the fast schemes.  ``chunk_size``
    caps replicates per batch (default: ~1M entries per batch); it does not
    change the result.  ``workers``: threads (default: up to 4 CPUs); it does
    not change the result either.
    """
    samples = np.asarray(samples)
    n, iters = len(samples), int(iters)
    if n == 0 or iters <= 0:
        return np.zeros(0)
    seed = _seed_int(seed)
    workers = workers or _default_workers()

    rank = getattr(aggregate, "rank", None)
    if rank is not None and samples.ndim == 1:
        m = rank(n)
        ordered = np.sort(samples)
        u = np.random.default_rng(seed).beta(m + 1, n - m, size=iters)
        return ordered[np.minimum((u * n).astype(np.intp), n - 1)]

    if hasattr(aggregate, "features"):
        feats = np.ascontiguousarray(aggregate.features(samples), dtype=np.float64)
        rows, counts = np.unique(feats, axis=0, return_counts=True)
        if len(rows) <= _FEW_ROWS:
            sums = _multinomial_sums(rows, counts, iters, seed, chunk_size)
        else:
            sums = _lane_sums(feats, iters, seed, chunk_size, workers)
        return np.asarray(aggregate.finish(sums, n), dtype=np.float64)

    lanes = _Lanes(n, seed)
    row_size = max(1, samples[0].size)
    chunk = chunk_size or max(1, _CHUNK_ENTRIES // (lanes.width * row_size))

    def kernel(row0, rows, scratch):
        return aggregate(samples[lanes.indices(lanes.draw(row0, rows), row0)])

    return _run_chunks(kernel, iters, chunk, workers, np.empty(iters))


def bootstrap_stderr(
    aggregate: Callable,
    samples,
    iters: int,
    seed: int | None = 1234,
    chunk_size: int | None = None,
    workers: int | None = None,
) -> float:
    """Bootstrap standard error: sample stddev (ddof=1) of the replicates.

    Same estimator as ``lm_eval.api.metrics.bootstrap_stderr``; arguments as
    in :func:`bootstrap_replicates`.  NaN when fewer than 2 replicates.
    """
    reps = bootstrap_replicates(aggregate, samples, iters, seed, chunk_size, workers)
    if len(reps) < 2:
        return math.nan
    return float(np.std(reps, ddof=1))


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
