"""Pieces become fixed-shape, padded batches, produced by a grain pipeline.

The plan sorts pieces by length (longest first, so memory trouble shows at once) and pads each
batch to a bucketed length. The number of distinct shapes therefore depends on the bucketing,
never on the number of requests.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
from absl import flags

from .requests import Piece

SHORTEST_BUCKET = 16  # a padded length; shorter rows share it, so tiny requests add no shapes


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    piece_indices: tuple[int, ...]
    length: int  # padded length of every row
    rows: int | None = None  # rows of the batch (None: the batch size); padding rows fill it up


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """Packed rows: row r holds the pieces ``streams[r]`` end to end, each from a fresh state, or
    with ``branches`` each from the state its row starts from (``plan_branches``)."""

    streams: tuple[tuple[int, ...], ...]  # longest row first
    length: int  # padded length of every row
    rows: int | None = None  # as BatchPlan's
    branches: bool = False


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def power_of_two_bucket(length: int, maximum: int | None = None) -> int:
    bucket = max(SHORTEST_BUCKET, 1 << max(0, length - 1).bit_length())
    return min(bucket, maximum) if maximum is not None and maximum >= length else bucket


def row_bucket(rows: int, batch_size: int, multiple: int = 1) -> int:
    """The fewest rows, of ``multiple`` times 1, 2, 4, ..., that hold ``rows``; at most ``batch_size``.

    ``multiple`` is the device count, so that a bucket always shards evenly over the data axis.
    """
    groups = max(1, -(-rows // multiple))
    return min(batch_size, multiple << (groups - 1).bit_length())


def plan_batches(lengths: np.ndarray, batch_size: int, bucket: Callable[[int], int],
                 rows: Callable[[int, int], int | None] | None = None) -> list[BatchPlan]:
    """Pieces sorted longest first, ``batch_size`` at a time (so each batch's rows are longest
    first too); ``rows(real rows, padded length)`` may give a batch fewer rows (None: all)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    plans = []
    for start in range(0, len(order), batch_size):
        indices = tuple(int(i) for i in order[start : start + batch_size])
        length = bucket(int(lengths[indices[0]]))
        plans.append(BatchPlan(indices, length, rows(len(indices), length) if rows else None))
    return plans


def plan_streams(lengths: np.ndarray, batch_size: int, chunk_size: int, stream_length: int,
                 rows: Callable[[int, int], int | None] | None = None) -> list[StreamPlan]:
    """Pieces packed end to end into ``batch_size`` rows of at most ``stream_length`` positions
    (or the batch's longest piece's length, if longer): the longest pieces first, each into the
    row holding the fewest positions so far, then the shortest into the gaps left. Rows then end
    within about one short piece of each other, so the padding is about a chunk per row per
    batch, whatever the pieces' lengths. ``rows`` is as in ``plan_batches``, given the rows that
    hold pieces."""
    lengths = np.asarray(lengths)
    pending = collections.deque(int(i) for i in np.argsort(-lengths, kind="stable"))
    plans = []
    while pending:
        capacity = max(stream_length, int(lengths[pending[0]]))
        loads = np.zeros(batch_size, np.int64)
        streams: list[list[int]] = [[] for _ in range(batch_size)]
        for longest in (True, False):
            while pending:
                row, index = int(np.argmin(loads)), pending[0] if longest else pending[-1]
                if loads[row] + lengths[index] > capacity:
                    break
                streams[row].append(pending.popleft() if longest else pending.pop())
                loads[row] += lengths[index]
        used = [r for r in np.argsort(-loads, kind="stable") if streams[r]]
        length = round_up(int(loads.max()), chunk_size)
        plans.append(StreamPlan(tuple(tuple(streams[r]) for r in used), length, rows(len(used), length) if rows else None))
    return plans


def plan_branches(lengths: np.ndarray, state_idx: np.ndarray, batch_size: int, width: int,
                  bucket: Callable[[int], int], rows: Callable[[int, int], int | None] | None = None) -> list[StreamPlan]:
    """Pieces that start from stored states (``state_idx``) in rows of one state each: the pieces
    of a state end to end while they fit in ``width`` positions (a longer piece has a row of its
    own), so that each begins within the row's first chunk, where a branch starts from the state
    the row began with. Rows with the most positions first, ``batch_size`` at a time, each batch
    ``bucket(its longest row)`` long; ``rows`` as in ``plan_batches``."""
    lengths = np.asarray(lengths)
    by_state: dict[int, list[int]] = {}
    for index in np.argsort(-lengths, kind="stable"):
        by_state.setdefault(int(state_idx[index]), []).append(int(index))
    filled = []  # [positions, pieces] per row
    for members in by_state.values():
        state_rows: list[list] = []
        for index in members:  # first fit, longest first
            row = next((r for r in state_rows if r[0] + lengths[index] <= width), None)
            if row is None:
                state_rows.append([int(lengths[index]), [index]])
            else:
                row[0] += int(lengths[index])
                row[1].append(index)
        filled.extend(state_rows)
    filled.sort(key=lambda row: -row[0])
    plans = []
    for first in range(0, len(filled), batch_size):
        chosen = filled[first : first + batch_size]
        length = bucket(chosen[0][0])
        plans.append(StreamPlan(tuple(tuple(pieces) for _, pieces in chosen), length,
                                rows(len(chosen), length) if rows else None, branches=True))
    return plans


class MaterializeBatch:
    """BatchPlan -> dict of numpy arrays with ``plan.rows`` (default ``batch_size``) rows (padding
    rows have document 0).

    inputs, targets: int32 [B, L]; valid: real positions; scored: positions whose target counts;
    last: index of each row's last real position; document_idx, sequence_idx, state_idx,
    first_position: int32 [B].
    A plain class, so grain can pickle it into worker processes.
    """

    def __init__(self, pieces: list[Piece], batch_size: int):
        self.pieces = pieces
        self.batch_size = batch_size

    def __call__(self, plan: BatchPlan | StreamPlan) -> dict[str, np.ndarray]:
        if isinstance(plan, StreamPlan):
            return self.packed(plan)
        rows, length = plan.rows or self.batch_size, plan.length
        batch = {
            "inputs": np.zeros((rows, length), np.int32),
            "targets": np.zeros((rows, length), np.int32),
            "valid": np.zeros((rows, length), bool),
            "scored": np.zeros((rows, length), bool),
            "last": np.zeros((rows,), np.int32),
            "document_idx": np.zeros((rows,), np.int32),
            "sequence_idx": np.zeros((rows,), np.int32),
            "state_idx": np.zeros((rows,), np.int32),
            "first_position": np.zeros((rows,), np.int32),
        }
        for row, index in enumerate(plan.piece_indices):
            piece = self.pieces[index]
            n = piece.length
            batch["inputs"][row, :n] = piece.inputs
            batch["targets"][row, :n] = piece.targets
            batch["valid"][row, :n] = True
            batch["scored"][row, n - piece.num_scored : n] = True
            batch["last"][row] = n - 1
            batch["document_idx"][row] = piece.document_idx
            batch["sequence_idx"][row] = piece.sequence_idx
            batch["state_idx"][row] = piece.state_idx
            batch["first_position"][row] = piece.first_position
        return batch

    def packed(self, plan: StreamPlan) -> dict[str, np.ndarray]:
        """A StreamPlan's rows: inputs, targets, valid, scored, state_idx as in a BatchPlan's
        batch, and starts (or with ``plan.branches``, branches): bool [B, L], each piece's first
        position; piece: int32 [B, L], the index in the batch of each position's piece (-1:
        padding); position: int32 [B, L], each target's index in its request; document_idx,
        sequence_idx: int32 [P], the batch's P pieces in order."""
        rows, length = plan.rows or self.batch_size, plan.length
        batch = {name: np.zeros((rows, length), bool) for name in ("valid", "scored", "starts", "branches")}
        marks = batch["branches" if plan.branches else "starts"]
        batch["state_idx"] = np.zeros((rows,), np.int32)
        for name in ("inputs", "targets", "position"):
            batch[name] = np.zeros((rows, length), np.int32)
        batch["piece"] = np.full((rows, length), -1, np.int32)
        members = [index for stream in plan.streams for index in stream]
        batch["document_idx"] = np.array([self.pieces[i].document_idx for i in members], np.int32)
        batch["sequence_idx"] = np.array([self.pieces[i].sequence_idx for i in members], np.int32)
        slot = 0
        for row, stream in enumerate(plan.streams):
            start = 0
            for index in stream:
                piece = self.pieces[index]
                end = start + piece.length
                batch["inputs"][row, start:end] = piece.inputs
                batch["targets"][row, start:end] = piece.targets
                batch["valid"][row, start:end] = True
                batch["scored"][row, end - piece.num_scored : end] = True
                marks[row, start] = True
                batch["state_idx"][row] = piece.state_idx
                batch["piece"][row, start:end] = slot
                batch["position"][row, start:end] = piece.first_position + np.arange(piece.length)
                start, slot = end, slot + 1
        return batch


def batch_stream(
    pieces: list[Piece],
    plans: list[BatchPlan] | list[StreamPlan],
    batch_size: int,
    *,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Materialized batches in plan order, prepared ahead of the device by grain.

    With ``worker_count == 0`` a background thread prefetches ``worker_buffer_size`` batches;
    otherwise ``worker_count`` processes each keep ``worker_buffer_size`` batches ready.
    """
    import grain  # imported lazily: 0.4-0.6 s measured on this machine after JAX; generation needs none of it

    dataset = grain.MapDataset.source(plans).map(MaterializeBatch(pieces, batch_size))
    stream = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, worker_buffer_size))
    )
    if worker_count > 0:
        _mark_absl_flags_parsed()
        stream = stream.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=max(1, worker_buffer_size))
        )
    return iter(stream)


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags, which are unparsed outside an absl app.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
