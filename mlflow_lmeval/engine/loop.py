"""The host loop: fixed-shape batches through the jitted step, state carried over chunks.

One step (``step.score_chunk``) takes a chunk ``[B, C]`` of a batch and adds to per-row totals
kept on the device; the host reads the totals once per batch. A packable model's rows instead hold
several requests end to end (``plan_streams``), and a shared context with its continuations
(``plan_groups``); its step (``step.score_packed``) returns each position's score, which the host
sums per request. The batch axis is sharded over a ``data`` mesh axis spanning every device.

With several JAX processes (``distributed.py``) the mesh spans every process's devices; process 0
broadcasts each ``score``/``generate`` call before making it, and the others make the same call
through ``run_command`` (see ``follower.serve``). One process takes none of those detours.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import UserError
from ..models.protocol import LanguageModel, cast_floating, floating_dtypes
from . import distributed, step
from .batching import (
    batch_stream,
    plan_batches,
    plan_groups,
    plan_streams,
    round_up,
    row_bucket,
)
from .chunks import capped_chunk, padded_length
from .fuse import DocumentResults, PieceResults, fuse_document_results, sum_positions
from .generation import Generation
from .requests import Piece, make_pieces, piece_counts, share_contexts
from .state_table import StateTable
from .step import Chunk, Totals

logger = logging.getLogger(__name__)
MODES = ("recurrent", "windowed")
# A batch longer than this (positions) runs only as many rows as it needs (a power-of-two bucket,
# see ``row_bucket``): fewer real rows from the start, and fewer again once its shorter rows have
# ended while its longest has more than this many positions left. Each bucket below the batch size
# is one more step compilation (at most log2 of the batch size of them); a short batch, or a
# batch's short remainder, would save less time than that compilation costs. Fewer rows run
# wider chunks, rows x width staying batch size x chunk size (so the same memory): on this CPU one
# row at 512 positions runs 1.5-1.7x the cells/s of one row at 64 (benchmarks/README.md), and on
# an accelerator a narrow step leaves most of the chip idle. The number of step shapes is the same.
ROW_BUCKET_MIN_LENGTH = 256
# A packable model's fresh pieces run end to end in rows (``plan_streams``) of about this many
# positions per batch: the padding is about one chunk per row per batch, so longer rows pad less,
# but a batch's results (and the response cache's writes) come only when the whole batch ends.
PACKED_ROW_LENGTH = 2048


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    batch_size: int = 8
    chunk_size: int = 64
    # "recurrent": each request whole, state carried over chunks (a model without state falls
    # back to windows); "windowed": fixed-context windows of ``context_length``.
    mode: str = "recurrent"
    context_length: int | None = None  # window length in windowed mode (default: the model's)
    worker_count: int = 0
    worker_buffer_size: int = 1
    scale_logits: bool = False  # shrink logits so a random model's log-probabilities are finite
    dtype: str | None = None  # the floating-point params' dtype while evaluating; None: as the model has them
    generation_block: int = 16  # tokens decoded per host check of the stop conditions
    share_prefixes: bool = True  # recurrent mode: run a context shared by several requests once
    prefix_block: int = 64  # shared contexts whose states are held at once (bounds memory; a packable model holds none)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


class NonFiniteLogits(UserError):
    def __init__(self, document_idx: int, among: list[int] | None = None):
        super().__init__(f"the model produced NaN or inf log-probabilities for request {document_idx}")
        self.document_idx = document_idx
        # In a packed batch a NaN reaches every request of its chunk (a masked weight of 0 times
        # NaN is NaN), so the batch's requests are kept to find the one that made it.
        self.among = among


class Engine(Generation):
    """Scores requests and generates (``Generation``) from a model that follows the model contract."""

    def __init__(self, model: LanguageModel, settings: EngineSettings, progress: Callable[[int, int], None] | None = None):
        self.model = model
        self.settings = settings
        self.progress = progress
        self.mode = settings.mode if model.has_state else "windowed"
        if self.mode == "windowed":
            length = settings.context_length or model.context_length
            if not length:
                raise UserError("fixed-context evaluation needs a context_length (the model declares none)")
            self.max_length = int(length)
        else:
            self.max_length = None
        devices = jax.devices()  # every process's devices when several processes run
        self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.batch_size = round_up(settings.batch_size, len(devices))
        self.devices = len(devices)
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.multiprocess = jax.process_count() > 1
        params = model.params if settings.dtype is None else cast_floating(model.params, settings.dtype)
        self.dtype = floating_dtypes(params)  # what the response cache keys on: the dtype really used
        # Only process 0 broadcasts; the others are driven by follower.serve.
        self._leads = self.multiprocess and distributed.is_leader()
        if self.multiprocess:
            self._put = distributed.put_global
            # A row-sharded result spans other processes' devices and cannot be fetched;
            # replicated, every process holds all of it.
            self._host = jax.jit(lambda tree: tree, out_shardings=self._replicated)
            self.params = distributed.put_global(params, self._replicated)
        else:
            self._put = jax.device_put
            self._host = None
            self.params = jax.device_put(params, self._replicated)
        self.traces = 0  # times jit traced the step or the decode (each new shape is one)
        # The chunk the current call runs: the setting, capped by ``_cap_chunk`` at the call's longest row.
        self.chunk_size = settings.chunk_size
        self._said_capped = False
        self.model_tokens = 0  # real (unpadded) tokens the model has processed
        self.computed_tokens = 0  # positions the step has run, padding included
        # The loss by position needs each target's position in its request, which only recurrent
        # mode keeps: a window's position says how much context the window had, not the request.
        self.by_position = self.mode == "recurrent"
        score = functools.partial(step.score_chunk, model.apply, settings.scale_logits, self.by_position)
        self._step = jax.jit(self._counted(score), donate_argnums=(1, 2))
        # Requests that start from a fresh state run packed when the model can start a sequence
        # mid-row (``LanguageModel.packable``): one step shape, and no row padded to its own length.
        self.packs = self.mode == "recurrent" and model.packable
        packed = functools.partial(step.score_packed, model.apply, settings.scale_logits)
        self._packed_step = jax.jit(self._counted(packed), donate_argnums=(1,))
        self._decode = jax.jit(self._counted(functools.partial(step.decode, model.apply)), static_argnums=(3,))
        # One dispatch for a batch's fresh state: op by op, its arrays (three per layer) took 0.12 s
        # of a 1.1 s B1 tiny evaluation on this CPU (cProfile, 4 batches).
        self._fresh_state = jax.jit(model.init_state, static_argnums=(0,))
        # The first rows of a row-sharded pytree, sharded again over every device.
        self._first_rows = jax.jit(lambda tree, rows: jax.tree.map(lambda leaf: leaf[:rows], tree),
                                   static_argnums=(1,), out_shardings=self._rows)
        if self._leads:
            distributed.send("engine", settings)

    def _counted(self, function: Callable) -> Callable:
        """``function``, counting its traces: jit runs the Python function only while tracing."""
        def traced(*args):
            self.traces += 1
            return function(*args)

        return traced

    def _fetch(self, tree):
        """Device results as numpy on this process."""
        if self._host is None:
            return jax.device_get(tree)
        return jax.device_get(self._host(tree))

    def _agree(self, values: list[bool]) -> list[bool]:
        """Process 0's decision on every process, where only it can decide (stop strings need its
        tokenizer); the list is padded to the batch size so its broadcast compiles once."""
        if not self.multiprocess:
            return values
        padded = np.zeros(self.batch_size, bool)
        padded[: len(values)] = values
        return [bool(v) for v in distributed.from_leader(padded)[: len(values)]]

    def run_command(self, name: str, args: tuple):
        """A call that process 0 broadcast (see follower.serve)."""
        if name == "score":
            return self._score_slots(*args)
        if name == "generate":
            return self._generate_all(*args, finished=None, on_done=None)
        raise ValueError(f"unknown engine command {name!r}")

    # ---- batches ------------------------------------------------------------------------------
    def _bucket(self, length: int) -> int:
        """The padded length of a batch whose longest row has ``length`` tokens (``padded_length``)."""
        return padded_length(length, self.chunk_size, self.model.has_state, self.max_length)

    def _cap_chunk(self, longest: int) -> None:
        """Set ``chunk_size`` for a call whose pieces have at most ``longest`` positions (``capped_chunk``)."""
        self.chunk_size = capped_chunk(self.settings.chunk_size, longest, self.max_length)
        if self.chunk_size < self.settings.chunk_size and not self._said_capped:
            self._said_capped = True  # once per engine: each call caps at its own longest piece
            logger.warning("chunk_size %d is longer than the pieces to score: chunks are capped at the longest, "
                           "rounded up to its bucket (%d positions here)", self.settings.chunk_size, self.chunk_size)

    def _rows_for(self, real_rows: int, length: int) -> int | None:
        """The rows of a batch of ``real_rows`` pieces padded to ``length`` (None: the batch size)."""
        if not self.model.has_state or length <= ROW_BUCKET_MIN_LENGTH:
            return None
        return row_bucket(real_rows, self.batch_size, self.devices)

    def _run_batch(self, batch: dict[str, np.ndarray], states: StateTable | None = None, shrink: bool = False):
        """Dispatch every chunk of one batch; returns device arrays (state, parts) without waiting:
        ``merge_totals`` makes one Totals of the parts, or for a packed batch (``plan_streams``)
        ``merge_positions`` makes per-position arrays of them.

        Each row starts from ``states.take(batch["state_idx"])`` when a table is given, else from
        a fresh state. With ``shrink`` a long batch drops the rows that have ended (its rows are
        longest first) to a smaller row bucket; the returned state then holds only the last rows run.
        """
        rows, length = batch["inputs"].shape
        packed = "starts" in batch
        self.model_tokens += int(batch["valid"].sum())
        # One transfer per batch and one per chunk: on CPU each call costs about as much as a
        # small step, so the arrays of a step travel together.
        fresh = self._fresh_state(rows) if states is None and self.model.has_state else None
        if packed:
            state, parts = self._put(fresh, self._rows), []
        else:
            totals, last, first, state = self._put((Totals.zeros(rows), batch["last"], batch["first_position"], fresh),
                                                   self._rows)
            ended = []
        if states is not None:
            state = jax.device_put(states.take(batch["state_idx"]), self._rows)
        chunk_size = self.chunk_size
        bucketed = self.model.has_state and length > ROW_BUCKET_MIN_LENGTH
        # A branch must begin in the chunk where its context ends (plan_groups): such a batch
        # keeps all its rows at the chunk width, so the chunks stay where the plan put them.
        shrink = shrink and bucketed and "branches" not in batch
        running = rows
        if shrink:
            # One past each row's last real position, read once per batch (scanning the rest of
            # the batch at every chunk was quadratic in a long document's length).
            valid = batch["valid"]
            ends = np.where(valid.any(1), length - np.argmax(valid[:, ::-1], axis=1), 0)
            longest = int(ends.max())
        width = min(chunk_size, length) if self.model.has_state else length
        fields = [name for name in Chunk._fields if name in batch]
        start = 0
        while start < length:
            # Fewer rows only while the longest row has more than ROW_BUCKET_MIN_LENGTH positions
            # left, as for a whole batch: the ragged end of a packed batch, or of a batch of
            # similar lengths, would add step shapes to save a few chunks.
            if shrink and longest - start > ROW_BUCKET_MIN_LENGTH:
                needed = row_bucket(int(np.nonzero(ends > start)[0].max()) + 1, rows, self.devices)
                if needed < running:
                    if packed:
                        state = self._first_rows(state, needed)
                    else:
                        ended.append(totals)
                        state, totals, last, first = self._first_rows((state, totals, last, first), needed)
                    running = needed
            if bucketed:  # fewer rows, wider chunks (see ROW_BUCKET_MIN_LENGTH)
                width = chunk_size * max(1, self.batch_size // running)
            arrays = [batch[name][:running, start : start + width] for name in fields]
            if running < self.batch_size and arrays[0].shape[1] < width:
                # Fewer rows run only full chunks, so row buckets add no tail shapes.
                arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays]
            chunk = self._put(Chunk(**dict(zip(fields, arrays))), self._rows)
            self.computed_tokens += arrays[0].size
            if packed:
                state, scores = self._packed_step(self.params, state, chunk)
                parts.append(scores)
            else:
                state, totals = self._step(self.params, state, totals, chunk, np.int32(start), last, first)
            start += width
        return state, (parts if packed else [*ended, totals])

    def merge_positions(self, parts: list[tuple], rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Host arrays [rows, length] of a packed batch's target log-probabilities and greedy flags
        from ``_run_batch``'s parts, one per chunk (rows dropped once ended read as zeros)."""
        log_probs, greedy = np.zeros((rows, length), np.float32), np.zeros((rows, length), bool)
        # One transfer of all the parts; with several processes one part at a time, so that
        # _host (which jit traces per structure) compiles once.
        fetched = jax.device_get(parts) if self._host is None else [self._fetch(part) for part in parts]
        start = 0
        for chunk_log_probs, chunk_greedy in fetched:
            running, width = chunk_log_probs.shape
            end = min(start + width, length)
            log_probs[:running, start:end] = chunk_log_probs[:, : end - start]
            greedy[:running, start:end] = chunk_greedy[:, : end - start]
            start = end
        return log_probs, greedy

    def merge_totals(self, parts: list[Totals]) -> Totals:
        """One host Totals from ``_run_batch``'s list: each later part holds the first rows of the one before."""
        parts = self._fetch(parts)
        merged = Totals(*(np.array(column) for column in parts[0]))
        for part in parts[1:]:
            for whole, first in zip(merged, part):
                whole[: len(first)] = first
        return merged

    def _run(self, pieces: list[Piece], on_batch: Callable[[dict, object, object], None], states=None,
             keep_state: bool = False, plans=None) -> None:
        """Run all pieces (by ``plans`` when given); ``on_batch(batch, host results, device
        state)`` gets each batch's results, a Totals or for a packed batch ``merge_positions``'
        arrays (and the state of every row only with ``keep_state``).

        The next batch is dispatched before the previous one's totals are read, so the device
        never waits for the host between batches.
        """
        if not pieces:
            return
        if plans is None:
            lengths = np.array([p.length for p in pieces])
            if self.packs and states is None and not keep_state:  # a packed row's end state is its last piece's alone
                plans = plan_streams(lengths, range(len(pieces)), self.batch_size, self.chunk_size,
                                     PACKED_ROW_LENGTH, self._rows_for)
            else:
                plans = plan_batches(lengths, self.batch_size, self._bucket, self._rows_for)
        stream = batch_stream(
            pieces, plans, self.batch_size,
            worker_count=self.settings.worker_count, worker_buffer_size=self.settings.worker_buffer_size,
        )
        done, total = 0, sum(pieces[i].length for plan in plans for i in plan.members())  # a split group's context runs twice

        def finish(batch, parts, state):
            nonlocal done
            if "starts" in batch:
                on_batch(batch, self.merge_positions(parts, *batch["inputs"].shape), state)
            else:
                on_batch(batch, self.merge_totals(parts), state)
            done += int(batch["valid"].sum())
            if self.progress:
                self.progress(done, total)

        pending = None
        for batch in stream:
            state, totals = self._run_batch(batch, states, shrink=not keep_state)
            if pending is not None:
                finish(*pending)
            pending = (batch, totals, state)
        if pending is not None:
            finish(*pending)

    # ---- scoring --------------------------------------------------------------------------------
    def score(self, requests: list[tuple[list[int], list[int]]]) -> DocumentResults:
        """(context, continuation) token lists -> per-request log-likelihood, token count, greedy
        and (recurrent mode; zeros in windowed mode) the loss by position."""
        parts = self.score_slots(requests)
        return fuse_document_results(PieceResults.concatenate(parts), piece_counts(requests, self.max_length))

    def score_slots(self, requests, slots: list[tuple[int, int]] | None = None,
                    on_batch: Callable[[PieceResults], None] | None = None) -> list[PieceResults]:
        """The pieces of ``requests`` whose (document_idx, sequence_idx) are in ``slots`` (None:
        every piece; see ``piece_counts``). ``on_batch`` gets each finished batch's results,
        padding rows (document 0) included, before the next one is read."""
        if self._leads:
            distributed.send("score", requests, slots)
        return self._score_slots(requests, slots, on_batch)

    def _score_slots(self, requests, slots, on_batch=None) -> list[PieceResults]:
        """The device work of ``score_slots``, which every process makes."""
        try:
            return self._compute_slots(requests, slots, on_batch)
        except NonFiniteLogits as error:
            if error.among is None:
                raise
            raise NonFiniteLogits(self._first_nonfinite(requests, error.among)) from None

    def _first_nonfinite(self, requests, documents: list[int]) -> int:
        """The first of ``documents`` (1-based) whose request alone scores NaN or inf (the first of
        them if none does alone)."""
        for document in documents:
            try:
                self._compute_slots([requests[document - 1]], None)
            except NonFiniteLogits:
                return document
        return documents[0]

    def _compute_slots(self, requests, slots, on_batch=None) -> list[PieceResults]:
        # A piece's inputs are its request's tokens but the last (a window's: at most max_length).
        self._cap_chunk(max((len(context) + len(continuation) - 1 for context, continuation in requests), default=1))
        if self.mode == "recurrent" and self.settings.share_prefixes:
            pending = set(range(1, len(requests) + 1)) if slots is None else {d for d, _ in slots}
            return self._score_shared(requests, pending, on_batch)
        pieces = make_pieces(requests, self.max_length)
        if slots is not None:
            wanted = set(slots)
            pieces = [p for p in pieces if (p.document_idx, p.sequence_idx) in wanted]
        return [self._score_pieces(pieces, on_batch=on_batch)]

    def _score_pieces(self, pieces: list[Piece], states: StateTable | None = None, on_batch=None, plans=None) -> PieceResults:
        parts = []

        def collect(batch, results, _state):
            if "starts" in batch:
                part, nonfinite = sum_positions(batch, *results)
            else:
                part = PieceResults(batch["document_idx"], batch["sequence_idx"], results.loglik, results.num_tokens,
                                    results.greedy, results.position_nll, results.position_tokens)
                nonfinite = results.nonfinite
            bad = nonfinite & (part.document_idx > 0)
            if bad.any():
                among = sorted({int(d) for d in part.document_idx if d > 0}) if "starts" in batch else None
                raise NonFiniteLogits(int(part.document_idx[np.argmax(bad)]), among)
            parts.append(part)
            if on_batch is not None:
                on_batch(part)

        self._run(pieces, collect, states, plans=plans)
        return PieceResults.concatenate(parts)

    def _score_shared(self, requests, pending: set[int], on_batch) -> list[PieceResults]:
        """Score the ``pending`` documents (1-based), running each shared context once."""
        order = sorted(pending)
        prefixes, pieces = share_contexts([requests[d - 1] for d in order])
        pieces = [dataclasses.replace(p, document_idx=order[p.document_idx - 1]) for p in pieces]
        if self.packs:
            return [self._score_packed_groups(pieces, prefixes, on_batch)]
        parts = [self._score_pieces([p for p in pieces if p.state_idx == 0], on_batch=on_batch)]
        block = self.settings.prefix_block
        for first in range(0, len(prefixes), block):
            # Holding every prefix state at once could exhaust memory; a block at a time is bounded.
            states = self._prefix_states(prefixes[first : first + block])
            members = [
                dataclasses.replace(p, state_idx=p.state_idx - first)
                for p in pieces if first < p.state_idx <= first + block
            ]
            parts.append(self._score_pieces(members, states, on_batch=on_batch))
        return parts

    def _score_packed_groups(self, pieces: list[Piece], prefixes: list[np.ndarray], on_batch) -> PieceResults:
        """``_score_shared`` for a packable model: no states stored (``prefix_block`` does not
        apply). Each shared context's prefix runs in a packed row just before its continuations,
        which branch from its end."""
        prefix_pieces = [Piece(0, 0, prefix, np.zeros_like(prefix), 0) for prefix in prefixes]
        everything = pieces + prefix_pieces  # prefix k (1-based) is piece len(pieces) + k - 1
        members: dict[int, list[int]] = {}
        for index, piece in enumerate(pieces):
            members.setdefault(piece.state_idx, []).append(index)
        lengths = np.array([p.length for p in everything])
        chunk = self.chunk_size
        plans = plan_streams(lengths, members.pop(0, []), self.batch_size, chunk, PACKED_ROW_LENGTH, self._rows_for)
        groups = [(len(pieces) + k - 1, continuations) for k, continuations in sorted(members.items())]
        plans += plan_groups(lengths, groups, self.batch_size, chunk, PACKED_ROW_LENGTH)
        return self._score_pieces(everything, on_batch=on_batch, plans=plans)

    def _prefix_states(self, prefixes: list[np.ndarray]) -> StateTable:
        """The state after each of at most ``prefix_block`` prefixes (a masked tail leaves each
        row's state as it ended): row k of the table holds ``prefixes[k - 1]``'s."""
        pieces = [Piece(k, 0, prefix, np.zeros_like(prefix), 0) for k, prefix in enumerate(prefixes, start=1)]
        place = functools.partial(self._put, sharding=self._replicated) if self.multiprocess else (lambda tree: tree)
        table = StateTable(self.model, self.settings.prefix_block, place)
        self._run(pieces, lambda batch, _totals, state: table.put(batch["document_idx"], state), keep_state=True)
        return table
