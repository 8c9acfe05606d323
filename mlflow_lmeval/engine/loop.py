"""The device loop: fixed-shape jitted steps, state carried over chunks, results fetched per batch.

One step takes a chunk ``[B, C]`` of a batch and, per row, adds to running totals kept on the
device: the sum of scored target log-probabilities, the number of scored targets, whether every
scored target was the argmax, whether anything was non-finite, and the argmax after the row's
last real position (the first token a generation would produce). The host reads the totals once
per batch. The batch axis is sharded over a ``data`` mesh axis spanning every device.

With several JAX processes (``distributed.py``) the mesh spans every process's devices; process 0
broadcasts each ``score``/``generate`` call before making it, and the others make the same call
from ``distributed.serve``. One process takes none of those detours.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import UserError
from ..models.protocol import LanguageModel
from . import distributed
from .batching import BatchPlan, MaterializeBatch, batch_stream, plan_batches, power_of_two_bucket, round_up
from .fuse import DocumentResults, PieceResults, fuse_document_results
from .requests import Piece, make_pieces, share_contexts

# lm-eval's "debug" mode: a random model's logits shrunk so every log-probability is finite.
DEBUG_LOGIT_SCALE = 1e-3


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    batch_size: int = 8
    chunk_size: int = 64
    mode: str = "recurrent"  # "recurrent" (for models with state) or "windowed"
    context_length: int | None = None  # window length in fixed-context mode
    worker_count: int = 0
    worker_buffer_size: int = 1
    scale_logits: bool = False
    generation_block: int = 16  # tokens decoded per host check of the stop conditions
    share_prefixes: bool = True  # recurrent mode: run a context shared by several requests once
    prefix_block: int = 64  # shared contexts whose states are held at once (bounds memory)


class NonFiniteLogits(UserError):
    def __init__(self, document_idx: int):
        super().__init__(f"the model produced NaN or inf log-probabilities for request {document_idx}")
        self.document_idx = document_idx


def _zeros_totals(batch: int):
    """Host arrays, so they reach the device in the same transfer as the batch."""
    return {
        "loglik": np.zeros((batch,), np.float32),
        "num_tokens": np.zeros((batch,), np.int32),
        "greedy": np.ones((batch,), bool),
        "nonfinite": np.zeros((batch,), bool),
        "next_token": np.zeros((batch,), np.int32),
    }


class Engine:
    """Scores requests and generates from a model that follows the model contract."""

    def __init__(self, model: LanguageModel, settings: EngineSettings, progress: Callable[[int, int], None] | None = None,
                 cache=None, fingerprint: str | None = None):
        """``cache`` (a ResponseCache) with the checkpoint's ``fingerprint`` makes scoring
        resumable: every finished batch is stored, and stored pieces are not computed again.
        Without a fingerprint nothing is cached (live params have no identity)."""
        self.model = model
        self.settings = settings
        self.progress = progress
        self.recurrent = model.recurrent and settings.mode == "recurrent"
        if not self.recurrent:
            length = settings.context_length or model.context_length
            if not length:
                raise UserError("fixed-context evaluation needs a context_length (the model declares none)")
            self.max_length = int(length)
        else:
            self.max_length = None
        self.cache, self.cache_namespace = None, None
        if cache is not None and fingerprint:
            from ..response_cache import namespace

            mode = "recurrent" if self.recurrent else f"fixed:{self.max_length}"
            self.cache, self.cache_namespace = cache, namespace(fingerprint, mode, settings.scale_logits)
        devices = jax.devices()  # every process's devices when several processes run
        self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.batch_size = round_up(settings.batch_size, len(devices))
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.multiprocess = jax.process_count() > 1
        # Only process 0 broadcasts; the others are driven by distributed.serve.
        self._leads = self.multiprocess and distributed.is_leader()
        if self.multiprocess:
            self._put = distributed.put_global
            # A row-sharded result spans other processes' devices and cannot be fetched;
            # replicated, every process holds all of it.
            self._host = jax.jit(lambda tree: tree, out_shardings=replicated)
            self.params = distributed.put_global(model.params, replicated)
        else:
            self._put = jax.device_put
            self._host = None
            self.params = jax.device_put(model.params, replicated)
        self.compilations = 0
        self.model_tokens = 0  # real (unpadded) tokens the model has processed
        self._step = jax.jit(self._step_body, donate_argnums=(1, 2))
        self._decode = jax.jit(self._decode_body, static_argnums=(3,))
        # Fixed-shape reads and writes of the prefix-state table, so they compile once.
        self._take_states = jax.jit(lambda table, rows: jax.tree.map(lambda leaf: leaf[rows], table))
        self._put_states = jax.jit(
            lambda table, rows, state: jax.tree.map(lambda leaf, new: leaf.at[rows].set(new), table, state),
            donate_argnums=(0,),
        )
        if self._leads:
            distributed.send("engine", settings)

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
        """A call that process 0 broadcast (see distributed.serve)."""
        if name == "score":
            return self._score_missing(*args)
        if name == "generate":
            return self._generate_all(*args, finished=None, on_done=None)
        raise ValueError(f"unknown engine command {name!r}")

    # ---- device functions -------------------------------------------------------------
    def _step_body(self, params, state, totals, offset, inputs, targets, valid, scored, last):
        self.compilations += 1  # runs only while tracing
        logits, state = self.model.apply(params, inputs, state, valid)
        logits = logits.astype(jnp.float32)
        if self.settings.scale_logits:
            logits = logits * DEBUG_LOGIT_SCALE
        target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        max_logits = logits.max(axis=-1)
        target_log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)
        # Greedy means the target has the top logit; comparing with the max is much cheaper on
        # CPU than an argmax over the vocabulary at every position.
        is_greedy = target_logits >= max_logits
        # The only argmax needed is at each row's last real position: the next token to generate.
        in_chunk = jnp.clip(last - offset, 0, inputs.shape[1] - 1)
        ends_here = (last >= offset) & (last < offset + inputs.shape[1])
        last_logits = jnp.take_along_axis(logits, in_chunk[:, None, None], axis=1)[:, 0]
        totals = {
            "loglik": totals["loglik"] + jnp.where(scored, target_log_probs, 0.0).sum(-1),
            "num_tokens": totals["num_tokens"] + scored.sum(-1, dtype=jnp.int32),
            "greedy": totals["greedy"] & jnp.all(~scored | is_greedy, axis=-1),
            "nonfinite": totals["nonfinite"] | jnp.any(scored & ~jnp.isfinite(target_log_probs), axis=-1),
            "next_token": jnp.where(ends_here, jnp.argmax(last_logits, axis=-1).astype(jnp.int32), totals["next_token"]),
        }
        return state, totals

    def _decode_body(self, params, state, token, steps):
        self.compilations += 1

        def one(carry, _):
            state, token = carry
            logits, state = self.model.apply(params, token[:, None], state, jnp.ones((token.shape[0], 1), bool))
            token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (state, token), token

        (state, token), generated = jax.lax.scan(one, (state, token), None, length=steps)
        return state, token, generated.T

    # ---- host loop ----------------------------------------------------------------------
    def _bucket(self, length: int) -> int:
        """The padded length of a batch whose longest row has ``length`` tokens."""
        chunk = self.settings.chunk_size
        if not self.model.recurrent:
            return power_of_two_bucket(length, maximum=self.max_length)
        if length < chunk and chunk > 16:
            # Short rows (multiple-choice branches, short requests) get a short chunk instead of
            # being padded to a full one: at most two more step shapes (16 and 32, ...).
            bucket = power_of_two_bucket(length)
            if bucket < chunk:
                return bucket
        return round_up(length, chunk)

    def _run_batch(self, batch: dict[str, np.ndarray], states=None):
        """Dispatch every chunk of one batch; returns device arrays (state, totals) without waiting.

        Each row starts from ``states[batch["state_idx"][row]]`` when a state table is given
        (row 0 of the table is the fresh state), else from a fresh state.
        """
        rows, length = batch["inputs"].shape
        self.model_tokens += int(batch["valid"].sum())
        # One transfer per batch and one per chunk: on CPU each call costs about as much as a
        # small step, so the arrays of a step travel together.
        fresh = self.model.init_state(rows) if states is None and self.model.recurrent else None
        totals, last, state = self._put((_zeros_totals(rows), batch["last"], fresh), self._rows)
        if states is not None:
            state = jax.device_put(self._take_states(states, batch["state_idx"]), self._rows)
        chunk = min(self.settings.chunk_size, length) if self.model.recurrent else length
        for start in range(0, length, chunk):
            part = self._put(tuple(batch[name][:, start : start + chunk] for name in ("inputs", "targets", "valid", "scored")), self._rows)
            state, totals = self._step(self.params, state, totals, np.int32(start), *part, last)
        return state, totals

    def _run(self, pieces: list[Piece], on_batch: Callable[[dict, dict, object], None], states=None) -> None:
        """Run all pieces; ``on_batch(batch, host_totals, device_state)`` gets each batch's results.

        The next batch is dispatched before the previous one's totals are read, so the device
        never waits for the host between batches.
        """
        if not pieces:
            return
        plans = plan_batches(np.array([p.length for p in pieces]), self.batch_size, self._bucket)
        stream = batch_stream(
            pieces, plans, self.batch_size,
            worker_count=self.settings.worker_count, worker_buffer_size=self.settings.worker_buffer_size,
        )
        done, total = 0, sum(p.length for p in pieces)

        def finish(batch, totals, state):
            nonlocal done
            on_batch(batch, self._fetch(totals), state)
            done += int(batch["valid"].sum())
            if self.progress:
                self.progress(done, total)

        pending = None
        for batch in stream:
            state, totals = self._run_batch(batch, states)
            if pending is not None:
                finish(*pending)
            pending = (batch, totals, state)
        if pending is not None:
            finish(*pending)

    def score_pieces(self, pieces: list[Piece], states=None, keys: list[bytes] | None = None) -> PieceResults:
        """Score pieces; with ``keys`` (per document, 0-based) each batch is stored in the cache."""
        parts = []

        def collect(batch, totals, _state):
            bad = totals["nonfinite"] & (batch["document_idx"] > 0)
            if bad.any():
                raise NonFiniteLogits(int(batch["document_idx"][np.argmax(bad)]))
            part = PieceResults(batch["document_idx"], batch["sequence_idx"], totals["loglik"], totals["num_tokens"], totals["greedy"])
            parts.append(part)
            if keys is not None:
                real = np.flatnonzero(part.document_idx > 0)
                self.cache.put_pieces(self.cache_namespace, [
                    (keys[part.document_idx[i] - 1], part.sequence_idx[i], part.loglik[i], part.num_tokens[i], part.greedy[i])
                    for i in real
                ])

        self._run(pieces, collect, states)
        return PieceResults.concatenate(parts)

    def prefix_states(self, prefixes: list[np.ndarray]):
        """The state after each prefix, as a table whose row 0 is the fresh state and row k the
        state after ``prefixes[k - 1]`` (a masked tail leaves each row's state as it ended).

        The table always has ``prefix_block + 2`` rows (the last one takes padding rows), so its
        reads and writes compile once.
        """
        if len(prefixes) > self.settings.prefix_block:
            raise ValueError(f"at most {self.settings.prefix_block} prefixes at a time, got {len(prefixes)}")
        pieces = [Piece(k, 0, prefix, np.zeros_like(prefix), 0) for k, prefix in enumerate(prefixes, start=1)]
        scratch = self.settings.prefix_block + 1
        table = self.model.init_state(scratch + 1)
        if self.multiprocess:
            table = self._put(table, NamedSharding(self.mesh, PartitionSpec()))

        def keep(batch, _totals, state):
            nonlocal table
            rows = np.where(batch["document_idx"] > 0, batch["document_idx"], scratch).astype(np.int32)
            table = self._put_states(table, rows, state)

        self._run(pieces, keep)
        return table

    def score(self, requests: list[tuple[list[int], list[int]]]) -> DocumentResults:
        """(context, continuation) token lists -> per-request log-likelihood, token count, greedy."""
        from ..response_cache import request_key

        shared = self.recurrent and self.settings.share_prefixes
        # With shared contexts every request is exactly one piece, built later for what is left.
        pieces = None if shared else make_pieces(requests, self.max_length)
        slots = [(d, 0) for d in range(1, len(requests) + 1)] if shared else [(p.document_idx, p.sequence_idx) for p in pieces]
        counts = np.bincount([d - 1 for d, _ in slots], minlength=len(requests))
        keys, parts, done = None, [], set()
        if self.cache is not None:
            keys = [request_key(self.cache_namespace, context, continuation) for context, continuation in requests]
            stored = self.cache.get_pieces((keys[d - 1], q) for d, q in slots)
            found = [(d, q, *stored[keys[d - 1], q]) for d, q in slots if (keys[d - 1], q) in stored]
            if found:
                parts.append(PieceResults(*(np.array(column) for column in zip(*found))))
            done = {(d, q) for d, q, *_ in found}
        missing = [(d, q) for d, q in slots if (d, q) not in done] if done else None
        if self._leads:
            distributed.send("score", requests, missing)
        parts.extend(self._score_missing(requests, missing, keys, pieces))
        return fuse_document_results(PieceResults.concatenate(parts), counts)

    def _score_missing(self, requests, missing: list[tuple[int, int]] | None, keys=None, pieces=None) -> list[PieceResults]:
        """The device work of ``score``: the (document, piece) slots in ``missing`` (None: all)."""
        if self.recurrent and self.settings.share_prefixes:
            pending = set(range(1, len(requests) + 1)) if missing is None else {d for d, _ in missing}
            return self._score_shared(requests, pending, keys)
        if pieces is None:
            pieces = make_pieces(requests, self.max_length)
        if missing is not None:
            wanted = set(missing)
            pieces = [p for p in pieces if (p.document_idx, p.sequence_idx) in wanted]
        return [self.score_pieces(pieces, keys=keys)]

    def _score_shared(self, requests, pending: set[int], keys) -> list[PieceResults]:
        """Score the ``pending`` documents (1-based), running each shared context once."""
        order = sorted(pending)
        prefixes, pieces = share_contexts([requests[d - 1] for d in order])
        pieces = [dataclasses.replace(p, document_idx=order[p.document_idx - 1]) for p in pieces]
        parts = [self.score_pieces([p for p in pieces if p.state_idx == 0], keys=keys)]
        block = self.settings.prefix_block
        for first in range(0, len(prefixes), block):
            # Holding every prefix state at once could exhaust memory; a block at a time is bounded.
            states = self.prefix_states(prefixes[first : first + block])
            members = [
                dataclasses.replace(p, state_idx=p.state_idx - first)
                for p in pieces if first < p.state_idx <= first + block
            ]
            parts.append(self.score_pieces(members, states, keys=keys))
        return parts

    # ---- generation -----------------------------------------------------------------------
    def generate(self, contexts: list[list[int]], max_new_tokens: int, finished: Callable[[list[int]], bool],
                 on_done: Callable[[list[tuple[int, list[int]]]], None] | None = None) -> list[list[int]]:
        """Greedy continuation of each context until ``finished(tokens)`` or ``max_new_tokens``.

        ``on_done([(index, tokens), ...])`` gets each batch of contexts as it finishes."""
        if max_new_tokens < 1 or not contexts:
            return [[] for _ in contexts]
        if self._leads:
            distributed.send("generate", contexts, max_new_tokens)
        return self._generate_all(contexts, max_new_tokens, finished, on_done)

    def _generate_all(self, contexts, max_new_tokens, finished, on_done):
        """``finished`` is None on the processes that follow process 0: they take its decisions."""
        generate = self._generate_recurrent if self.recurrent else self._generate_windowed
        results: list[list[int]] = [None] * len(contexts)  # type: ignore[list-item]
        order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
        for start in range(0, len(order), self.batch_size):
            group = order[start : start + self.batch_size]
            done = list(zip(group, generate([contexts[i] for i in group], max_new_tokens, finished)))
            for index, tokens in done:
                results[index] = tokens
            if on_done:
                on_done(done)
        return results

    def _prefill_pieces(self, contexts: list[list[int]]) -> list[Piece]:
        return [
            Piece(i + 1, 0, np.asarray(c, np.int32), np.zeros(len(c), np.int32), 0) for i, c in enumerate(contexts)
        ]

    def _generate_recurrent(self, contexts, max_new_tokens, finished):
        pieces = self._prefill_pieces(contexts)
        batch = single_batch(pieces, self.batch_size, self._bucket)
        state, totals = self._run_batch(batch)
        token = totals["next_token"]
        outputs = [[int(t)] for t in self._fetch(token)[: len(contexts)]]
        done = self._agree([max_new_tokens <= 1 or (finished is not None and finished(o)) for o in outputs])
        produced = 1
        while not all(done) and produced < max_new_tokens:
            steps = self.settings.generation_block
            state, token, block = self._decode(self.params, state, token, steps)
            block = self._fetch(block)
            for row, output in enumerate(outputs):
                for value in block[row][: max_new_tokens - produced]:
                    if done[row]:
                        break
                    output.append(int(value))
                    if finished is not None:
                        done[row] = finished(output)
            done = self._agree(done)
            produced += steps
        return [o[:max_new_tokens] for o in outputs]

    def _generate_windowed(self, contexts, max_new_tokens, finished):
        """Stateless models: one full pass over the last ``max_length`` tokens per new token."""
        sequences = [list(c) for c in contexts]
        outputs = [[] for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(max_new_tokens):
            active = [i for i in range(len(contexts)) if not done[i]]
            if not active:
                break
            windows = [sequences[i][-self.max_length :] for i in active]
            batch = single_batch(self._prefill_pieces(windows), self.batch_size, self._bucket)
            _, totals = self._run_batch(batch)
            for i, value in zip(active, self._fetch(totals["next_token"])):
                sequences[i].append(int(value))
                outputs[i].append(int(value))
                done[i] = finished is not None and finished(outputs[i])
            done = self._agree(done)
        return outputs


def single_batch(pieces: list[Piece], batch_size: int, bucket: Callable[[int], int]) -> dict[str, np.ndarray]:
    """One batch holding all ``pieces`` (at most ``batch_size``), built without a pipeline."""
    plan = BatchPlan(tuple(range(len(pieces))), bucket(max(p.length for p in pieces)))
    return MaterializeBatch(pieces, batch_size)(plan)
