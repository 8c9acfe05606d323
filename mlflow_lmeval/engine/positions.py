"""Loss by context position: the position buckets, and their sums as a table (numpy only).

A scored target's position is its index in its request's token sequence (context + continuation;
a rolling request's prefix token + document). Bucket 0 holds positions ``[0, 64)``, bucket k > 0
``[2**(k+5), 2**(k+6))``: ``[64, 128)``, ``[128, 256)``, ... A fixed number of buckets keeps the
device's shapes static; the last one, ``[2**30, 2**31)``, holds every int32 position.
"""

from __future__ import annotations

import json

import numpy as np

FIRST_END_BITS = 6  # bucket 0 ends at 2**6 = 64
NUM_BUCKETS = 26


def bucket_bounds(bucket: int) -> tuple[int, int]:
    """[start, end) of a bucket."""
    if bucket == 0:
        return 0, 1 << FIRST_END_BITS
    return 1 << (bucket + FIRST_END_BITS - 1), 1 << (bucket + FIRST_END_BITS)


def bucket_of(positions: np.ndarray) -> np.ndarray:
    """The bucket of each position (int [...], non-negative): what the device step computes."""
    starts = np.array([bucket_bounds(k)[0] for k in range(NUM_BUCKETS)], np.int64)
    return np.searchsorted(starts, np.asarray(positions, np.int64), side="right") - 1


def table(nll: np.ndarray, tokens: np.ndarray) -> list[dict]:
    """Per-bucket sums (float [K] of target NLL, int [K] of scored targets) as results.json's rows:
    ``{start, end, tokens, mean_nll}`` for every non-empty bucket, in position order."""
    rows = []
    for bucket in np.flatnonzero(np.asarray(tokens) > 0):
        start, end = bucket_bounds(int(bucket))
        rows.append({"start": start, "end": end, "tokens": int(tokens[bucket]),
                     "mean_nll": float(nll[bucket]) / int(tokens[bucket])})
    return rows


def encode(nll: np.ndarray, tokens: np.ndarray) -> str:
    """One piece's per-bucket sums as compact text for the response cache: its non-empty buckets."""
    return json.dumps([[int(k), float(nll[k]), int(tokens[k])] for k in np.flatnonzero(np.asarray(tokens) > 0)])


def decode(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``encode``'s text back to (nll float64 [K], tokens int64 [K])."""
    nll, tokens = np.zeros(NUM_BUCKETS, np.float64), np.zeros(NUM_BUCKETS, np.int64)
    for bucket, total, count in json.loads(text):
        nll[bucket], tokens[bucket] = total, count
    return nll, tokens
