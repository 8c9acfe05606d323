"""Seeded, vectorised bootstrap replicates of an aggregate over per-document samples.

lm-eval (``lm_eval.api.metrics.bootstrap_stderr``) draws ``n`` documents with
replacement ``iters`` times in pure Python, re-aggregates each resample and
reports the sample standard deviation (ddof=1) of the replicates.  This module
computes the same estimator with numpy; the aggregates themselves (and the
hints that select a fast scheme) live in ``stats``.

The bootstrap picks one of three exact sampling schemes from the aggregate:

* order statistics (an aggregate with ``rank``, e.g. ``median``): the ``m``-th
  smallest of ``n`` uniform draws from ``{0..n-1}`` is ``floor(n * U)`` with
  ``U ~ Beta(m + 1, n - m)``, so a replicate costs one Beta draw instead of a
  resample;
* sum-form aggregates (with ``features`` and ``finish``: ``finish(sum of
  per-document features)``, e.g. means, perplexities, ratio estimators, f1,
  mcc) whose features take few distinct values: the resample's category counts
  are ``Multinomial(n, freq / n)``;
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Bound on the entries (random lanes, gathered values) one chunk holds.
_CHUNK_ENTRIES = 1 << 20
# Up to this many distinct feature rows, multinomial counts are cheaper than
# drawing documents (cost ~ one binomial per distinct row per replicate).
_FEW_ROWS = 64


def _tail_lanes(n: int, reject: float) -> int:
    """Spare lanes per replicate to replace rejected ones (shortfall is rare)."""
    if reject == 0.0:
        return 0
    mu = n * reject
    return math.ceil(1.5 * (mu + 8.0 * math.sqrt(mu) + 8.0) / (1.0 - reject))


class Lanes:
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


def default_workers() -> int:
    """Threads a bootstrap uses unless told: the CPUs this process may run on, at most 4."""
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
    lanes = Lanes(n, seed)
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
    of ``stats`` also carry the hints for the fast schemes.  ``chunk_size``
    caps replicates per batch (default: ~1M entries per batch); it does not
    change the result.  ``workers``: threads (default: up to 4 CPUs); it does
    not change the result either.
    """
    samples = np.asarray(samples)
    n, iters = len(samples), int(iters)
    if n == 0 or iters <= 0:
        return np.zeros(0)
    seed = _seed_int(seed)
    workers = workers or default_workers()

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

    lanes = Lanes(n, seed)
    row_size = max(1, samples[0].size)
    chunk = chunk_size or max(1, _CHUNK_ENTRIES // (lanes.width * row_size))

    def kernel(row0, rows, scratch):
        return aggregate(samples[lanes.indices(lanes.draw(row0, rows), row0)])

    return _run_chunks(kernel, iters, chunk, workers, np.empty(iters))


def bootstrap_stderr(aggregate: Callable, samples, iters: int, seed: int | None = 1234, **options) -> float:
    """Bootstrap standard error: sample stddev (ddof=1) of the replicates.

    Same estimator as ``lm_eval.api.metrics.bootstrap_stderr``; arguments (and ``options``:
    ``chunk_size``, ``workers``) as in :func:`bootstrap_replicates`.  NaN when fewer than 2 replicates.
    """
    reps = bootstrap_replicates(aggregate, samples, iters, seed, **options)
    if len(reps) < 2:
        return math.nan
    return float(np.std(reps, ddof=1))
