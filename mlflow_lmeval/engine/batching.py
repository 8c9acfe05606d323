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

    def members(self) -> list[int]:
        return list(self.piece_indices)


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """Packed rows: ``streams[r]`` places pieces in row r as (piece index, offset, branch). A piece
    starts from a fresh state, or with ``branch`` from the end of the latest piece before it that
    is not a branch (``plan_groups``)."""

    streams: tuple[tuple[tuple[int, int, bool], ...], ...]  # longest row first
    length: int  # padded length of every row, a multiple of the chunk size
    rows: int | None = None  # as BatchPlan's

    def members(self) -> list[int]:
        """The pieces in row order (a split group's prefix once per part)."""
        return [index for stream in self.streams for index, _, _ in stream]


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


def _pack_rows(items: list, place: Callable[[object, int], tuple[list, int]], batch_size: int, chunk_size: int,
               row_length: int, rows: Callable[[int, int], int | None] | None) -> list[StreamPlan]:
    """Items end to end in ``batch_size`` rows of at most ``row_length`` positions (or the batch's
    largest item, if larger): the largest first, each into the row that ends soonest, then the
    smallest into the gaps left. ``place(item, position)`` gives the item's placements starting
    at ``position`` and the position after it. Rows then end within about one small item of each
    other, so the padding is about a chunk per row per batch, whatever the items' sizes."""
    sizes = [place(item, 0)[1] for item in items]
    pending = collections.deque(sorted(range(len(items)), key=lambda i: -sizes[i]))
    plans = []
    while pending:
        capacity = max(row_length, sizes[pending[0]])
        ends = np.zeros(batch_size, np.int64)
        placed: list[list] = [[] for _ in range(batch_size)]
        for largest in (True, False):
            while pending:
                row = int(np.argmin(ends))
                placements, end = place(items[pending[0] if largest else pending[-1]], int(ends[row]))
                if end > capacity:
                    break
                pending.popleft() if largest else pending.pop()
                placed[row].extend(placements)
                ends[row] = end
        used = [r for r in np.argsort(-ends, kind="stable") if placed[r]]
        length = round_up(int(ends.max()), chunk_size)
        plans.append(StreamPlan(tuple(tuple(placed[r]) for r in used), length, rows(len(used), length) if rows else None))
    return plans


def plan_streams(lengths: np.ndarray, indices: list[int], batch_size: int, chunk_size: int, row_length: int,
                 rows: Callable[[int, int], int | None] | None = None) -> list[StreamPlan]:
    """The pieces ``indices`` end to end in rows, each from a fresh state (``_pack_rows``);
    ``rows`` as in ``plan_batches``, given the rows that hold pieces."""

    def place(index, position):
        return [(index, position, False)], position + int(lengths[index])

    return _pack_rows(list(indices), place, batch_size, chunk_size, row_length, rows)


def plan_groups(lengths: np.ndarray, groups: list[tuple[int, list[int]]], batch_size: int, chunk_size: int,
                row_length: int) -> list[StreamPlan]:
    """Shared contexts with their continuations, packed in rows (``groups``: (prefix index,
    continuation indices)): each group's prefix (a piece, from a fresh state), then its
    continuations, each a branch from the prefix's end. The model sees a prefix's positions only
    in the chunk holding its last one (later chunks get its end state), so every continuation
    must begin there, or in the next chunk when the prefix ends at a chunk's end: a prefix moves
    on to end at a chunk's end when its continuations would not fit, and a group whose
    continuations do not fit in one chunk is split, its prefix run once per part. Rows run at the
    chunk size throughout."""
    items = []
    for prefix, continuations in groups:
        part, used = [], 0
        for index in sorted(continuations, key=lambda i: int(lengths[i])):  # the longest last: it may run on
            if part and used >= chunk_size:
                items.append((prefix, part))
                part, used = [], 0
            part.append(index)
            used += int(lengths[index])
        items.append((prefix, part))

    def place(item, position):
        prefix, continuations = item
        end = position + int(lengths[prefix])
        last_start = end + sum(int(lengths[i]) for i in continuations[:-1])
        if last_start >= (end // chunk_size + 1) * chunk_size:
            end = round_up(end, chunk_size)
        placements = [(prefix, end - int(lengths[prefix]), False)]
        for index in continuations:
            placements.append((index, end, True))
            end += int(lengths[index])
        return placements, end

    return _pack_rows(items, place, batch_size, chunk_size, row_length, None)


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
            **self._token_arrays(rows, length),
            "last": np.zeros((rows,), np.int32),
            "document_idx": np.zeros((rows,), np.int32),
            "sequence_idx": np.zeros((rows,), np.int32),
            "state_idx": np.zeros((rows,), np.int32),
            "first_position": np.zeros((rows,), np.int32),
        }
        for row, index in enumerate(plan.piece_indices):
            piece = self.pieces[index]
            self._place(batch, row, 0, piece)
            batch["last"][row] = piece.length - 1
            batch["document_idx"][row] = piece.document_idx
            batch["sequence_idx"][row] = piece.sequence_idx
            batch["state_idx"][row] = piece.state_idx
            batch["first_position"][row] = piece.first_position
        return batch

    @staticmethod
    def _token_arrays(rows: int, length: int) -> dict[str, np.ndarray]:
        return {"inputs": np.zeros((rows, length), np.int32), "targets": np.zeros((rows, length), np.int32),
                "valid": np.zeros((rows, length), bool), "scored": np.zeros((rows, length), bool)}

    @staticmethod
    def _place(batch: dict[str, np.ndarray], row: int, start: int, piece: Piece) -> int:
        """``piece``'s tokens into ``batch`` at ``row`` from ``start``; returns where it ends."""
        end = start + piece.length
        batch["inputs"][row, start:end] = piece.inputs
        batch["targets"][row, start:end] = piece.targets
        batch["valid"][row, start:end] = True
        batch["scored"][row, end - piece.num_scored : end] = True
        return end

    def packed(self, plan: StreamPlan) -> dict[str, np.ndarray]:
        """A StreamPlan's rows: inputs, targets, valid, scored as in a BatchPlan's batch, and
        starts, branches (only if some piece branches): bool [B, L], the first position of each
        piece placed fresh or as a branch; piece: int32 [B, L], the index in the batch of each
        position's piece (-1: padding); position: int32 [B, L], each target's index in its
        request; document_idx, sequence_idx: int32 [P], the batch's P pieces in order (a shared
        context's prefix: 0)."""
        rows, length = plan.rows or self.batch_size, plan.length
        # ``branches`` only where some piece branches: without it the model skips the branch paths
        # (on this CPU they cost a tiny model's [8, 64] step 14-21 %, in two measurements).
        marks = ("starts", "branches") if any(branch for stream in plan.streams for *_, branch in stream) else ("starts",)
        batch = {**self._token_arrays(rows, length), "position": np.zeros((rows, length), np.int32),
                 "piece": np.full((rows, length), -1, np.int32)}
        batch.update({name: np.zeros((rows, length), bool) for name in marks})
        members = plan.members()
        batch["document_idx"] = np.array([self.pieces[i].document_idx for i in members], np.int32)
        batch["sequence_idx"] = np.array([self.pieces[i].sequence_idx for i in members], np.int32)
        slot = 0
        for row, stream in enumerate(plan.streams):
            for index, start, branch in stream:
                piece = self.pieces[index]
                end = self._place(batch, row, start, piece)
                batch["branches" if branch else "starts"][row, start] = True
                batch["piece"][row, start:end] = slot
                batch["position"][row, start:end] = piece.first_position + np.arange(piece.length)
                slot += 1
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
