"""Paired significance tests on per-document results of two evaluations of the same documents.

A bootstrap replicate draws ``n`` document indices with replacement and applies them to A *and*
B, so the replicate's delta keeps the per-document correlation between the two models (which is
what makes a paired test far more sensitive than comparing two stderrs). Each replicate
re-aggregates with the given ``mlflow_lmeval.stats`` aggregate.

Sampling schemes (both seeded; results do not depend on the chunk size):

* few distinct joint per-document rows (0/1 metrics: at most 4 ``(a, b)`` pairs): the
  resample's row counts are ``Multinomial(n, freq / n)``, one cheap draw per replicate;
* otherwise documents ``floor(n * U)`` from ``Generator.random``, which consumes one word
  per draw, so a chunk of ``[rows, n]`` draws equals ``rows`` successive ``random(n)`` calls
  and a plain Python loop with the same seed reproduces the replicates exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np

DEFAULT_ITERATIONS = 100_000
CONFIDENCE = 0.95
# McNemar: exact binomial below this many discordant pairs, chi-square (continuity-corrected) from it.
EXACT_BELOW = 25

# Bound on the entries (draws, counts, gathered values) one chunk holds.
_CHUNK_ENTRIES = 1 << 20
# Up to this many distinct joint rows, multinomial counts are cheaper than drawing documents.
_FEW_ROWS = 64


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


def point(aggregate: Callable, items: np.ndarray) -> float:
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
