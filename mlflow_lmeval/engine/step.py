"""The device functions of the engine: pure, fixed-shape bodies for ``jax.jit``.

Nothing here touches the host: the engine (``loop.py``) binds the model's ``apply`` and the
settings, counts traces and jits them. Shapes use ``B`` for the batch's rows, ``C`` for one
chunk's positions, ``V`` for the vocabulary and ``N`` for the rows of a state table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .positions import FIRST_END_BITS, NUM_BUCKETS

# The seed's "debug" setting: a random model's logits shrunk so every log-probability is finite.
LOGIT_SCALE = 1e-3

# The model contract's apply: (params, tokens[B, T] int32, state, mask[B, T] bool) -> (logits[B, T, V], state);
# a packable model's also takes starts= and branches= [B, T] bool (see LanguageModel.packable).
Apply = Callable[..., tuple[jax.Array, Any]]


class Chunk(NamedTuple):
    """Positions ``[offset, offset + C)`` of every row of a batch."""

    inputs: jax.Array  # int32 [B, C]: the tokens fed to the model
    targets: jax.Array  # int32 [B, C]: the next token at each position
    valid: jax.Array  # bool [B, C]: a real position (False: padding, which leaves the state as it is)
    scored: jax.Array  # bool [B, C]: a position whose target counts towards the totals
    # Packed rows only (bool [B, C]): a request begins here from a fresh state, or (a branch) from
    # the end of its shared context, the latest request before it not begun by a branch.
    starts: jax.Array | None = None
    branches: jax.Array | None = None


class Totals(NamedTuple):
    """Per-row running totals over a batch's chunks; the host reads them once per batch."""

    loglik: jax.Array  # float32 [B]: sum of the scored targets' log-probabilities
    num_tokens: jax.Array  # int32 [B]: scored targets
    greedy: jax.Array  # bool [B]: every scored target had the top logit
    nonfinite: jax.Array  # bool [B]: some scored log-probability was NaN or inf
    next_token: jax.Array  # int32 [B]: argmax after the row's last real position (the first generated token)
    position_nll: jax.Array  # float32 [B, K]: sum of the scored targets' NLL per position bucket (positions.py)
    position_tokens: jax.Array  # int32 [B, K]: scored targets per position bucket

    @staticmethod
    def zeros(rows: int) -> Totals:
        """Host arrays, so that they reach the device in the same transfer as the batch."""
        return Totals(np.zeros((rows,), np.float32), np.zeros((rows,), np.int32), np.ones((rows,), bool),
                      np.zeros((rows,), bool), np.zeros((rows,), np.int32),
                      np.zeros((rows, NUM_BUCKETS), np.float32), np.zeros((rows, NUM_BUCKETS), np.int32))


def position_bucket(position: jax.Array) -> jax.Array:
    """``positions.bucket_of`` on the device: 0 below 64, then one bucket per power of two."""
    bit_length = 32 - jax.lax.clz(position.astype(jnp.int32))
    return jnp.clip(bit_length - FIRST_END_BITS, 0, NUM_BUCKETS - 1)


def position_sums(nll: jax.Array, scored: jax.Array, position: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row sums per position bucket of ``nll`` (float32 [B, C]) where ``scored`` (bool [B, C]);
    ``position`` (int32 [B, C]) is each target's index in its request. Returns ([B, K], [B, K])."""
    # A one-hot [B, C, K] mask: K is small, so this costs a fraction of the [B, C, V] logits.
    in_bucket = (position_bucket(position)[..., None] == jnp.arange(NUM_BUCKETS)) & scored[..., None]
    return (jnp.where(in_bucket, nll[..., None], 0.0).sum(1),
            in_bucket.sum(1, dtype=jnp.int32))


def target_scores(logits: jax.Array, targets: jax.Array, scale_logits: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's logits [B, C, V] as float32 (scaled when asked), each target's log-probability
    float32 [B, C], and whether each target had the top logit bool [B, C]."""
    logits = logits.astype(jnp.float32)
    if scale_logits:
        logits = logits * LOGIT_SCALE
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # Greedy means the target has the top logit; comparing with the max is much cheaper on CPU
    # than an argmax over the vocabulary at every position.
    return logits, target_logits - jax.nn.logsumexp(logits, axis=-1), target_logits >= logits.max(axis=-1)


def score_packed(apply: Apply, scale_logits: bool, params, state, chunk: Chunk) -> tuple[Any, tuple[jax.Array, jax.Array]]:
    """One chunk of packed rows, several requests end to end in each (``chunk.starts`` and
    ``chunk.branches`` mark where each begins): the state after the chunk, and every position's
    target log-probability float32 [B, C] and greedy flag bool [B, C]. The host sums them per
    request (``fuse.sum_positions``): a row holds a varying number of requests, which fixed-shape
    totals could not."""
    logits, state = apply(params, chunk.inputs, state, chunk.valid, starts=chunk.starts, branches=chunk.branches)
    _, target_log_probs, is_greedy = target_scores(logits, chunk.targets, scale_logits)
    return state, (target_log_probs, is_greedy)


def score_chunk(apply: Apply, scale_logits: bool, by_position: bool, params, state, totals: Totals, chunk: Chunk,
                offset: jax.Array, last: jax.Array, first_position: jax.Array) -> tuple[Any, Totals]:
    """One chunk through the model, added to ``totals``; returns (state after the chunk, totals).

    ``offset`` (int32 scalar) is the chunk's first position in the batch; ``last`` (int32 [B]) is
    each row's last real position, where the next token is read; ``first_position`` (int32 [B]) is
    the index in its request of each row's first target. ``state`` is the model's pytree (None for
    a stateless model). ``by_position`` (static) adds the loss by position; without it those totals
    stay as they are.
    """
    logits, state = apply(params, chunk.inputs, state, chunk.valid)
    logits, target_log_probs, is_greedy = target_scores(logits, chunk.targets, scale_logits)
    # The only argmax needed is at each row's last real position: the next token to generate.
    width = chunk.inputs.shape[1]
    in_chunk = jnp.clip(last - offset, 0, width - 1)
    ends_here = (last >= offset) & (last < offset + width)
    last_logits = jnp.take_along_axis(logits, in_chunk[:, None, None], axis=1)[:, 0]
    scored = chunk.scored
    position_nll, position_tokens = totals.position_nll, totals.position_tokens
    if by_position:
        position = first_position[:, None] + offset + jnp.arange(width, dtype=jnp.int32)
        nll, count = position_sums(-target_log_probs, scored, position)
        position_nll, position_tokens = position_nll + nll, position_tokens + count
    return state, Totals(
        loglik=totals.loglik + jnp.where(scored, target_log_probs, 0.0).sum(-1),
        num_tokens=totals.num_tokens + scored.sum(-1, dtype=jnp.int32),
        greedy=totals.greedy & jnp.all(~scored | is_greedy, axis=-1),
        nonfinite=totals.nonfinite | jnp.any(scored & ~jnp.isfinite(target_log_probs), axis=-1),
        next_token=jnp.where(ends_here, jnp.argmax(last_logits, axis=-1).astype(jnp.int32), totals.next_token),
        position_nll=position_nll,
        position_tokens=position_tokens,
    )


def decode(apply: Apply, params, state, token: jax.Array, steps: int) -> tuple[Any, jax.Array, jax.Array]:
    """``steps`` greedy tokens after ``token`` (int32 [B], already decided, not yet fed).

    Returns (the state after ``token`` and every generated token but the last, that last token
    int32 [B], the generated tokens int32 [B, steps]). ``steps`` is static: one trace per value.
    """
    def one(carry, _):
        state, token = carry
        logits, state = apply(params, token[:, None], state, jnp.ones((token.shape[0], 1), bool))
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (state, token), token

    (state, token), generated = jax.lax.scan(one, (state, token), None, length=steps)
    return state, token, generated.T


def take_rows(table, rows: jax.Array):
    """Rows ``rows`` (int32 [B]) of a state table (a state pytree of N rows): a state of B rows."""
    return jax.tree.map(lambda leaf: leaf[rows], table)


def put_rows(table, rows: jax.Array, state):
    """``table`` with rows ``rows`` (int32 [B]) set to ``state`` (B rows); a repeated row keeps one of them."""
    return jax.tree.map(lambda leaf, new: leaf.at[rows].set(new), table, state)
