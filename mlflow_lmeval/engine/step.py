"""The device functions of the engine: pure, fixed-shape bodies for ``jax.jit``.

Nothing here touches the host: the engine (``loop.py``) binds the model's ``apply`` and the
settings, counts traces and jits them. Shapes use ``B`` for the batch's rows, ``C`` for one
chunk's positions, ``V`` for the vocabulary and ``N`` for the rows of a state table.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The seed's "debug" setting: a random model's logits shrunk so every log-probability is finite.
LOGIT_SCALE = 1e-3

# The model contract's apply: (params, tokens[B, T] int32, state, mask[B, T] bool) -> (logits[B, T, V], state).
Apply = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


class Chunk(NamedTuple):
    """Positions ``[offset, offset + C)`` of every row of a batch."""

    inputs: jax.Array  # int32 [B, C]: the tokens fed to the model
    targets: jax.Array  # int32 [B, C]: the next token at each position
    valid: jax.Array  # bool [B, C]: a real position (False: padding, which leaves the state as it is)
    scored: jax.Array  # bool [B, C]: a position whose target counts towards the totals


class Totals(NamedTuple):
    """Per-row running totals over a batch's chunks; the host reads them once per batch."""

    loglik: jax.Array  # float32 [B]: sum of the scored targets' log-probabilities
    num_tokens: jax.Array  # int32 [B]: scored targets
    greedy: jax.Array  # bool [B]: every scored target had the top logit
    nonfinite: jax.Array  # bool [B]: some scored log-probability was NaN or inf
    next_token: jax.Array  # int32 [B]: argmax after the row's last real position (the first generated token)

    @staticmethod
    def zeros(rows: int) -> "Totals":
        """Host arrays, so that they reach the device in the same transfer as the batch."""
        return Totals(np.zeros((rows,), np.float32), np.zeros((rows,), np.int32), np.ones((rows,), bool),
                      np.zeros((rows,), bool), np.zeros((rows,), np.int32))


def score_chunk(apply: Apply, scale_logits: bool, params, state, totals: Totals, chunk: Chunk,
                offset: jax.Array, last: jax.Array) -> tuple[Any, Totals]:
    """One chunk through the model, added to ``totals``; returns (state after the chunk, totals).

    ``offset`` (int32 scalar) is the chunk's first position in the batch; ``last`` (int32 [B]) is
    each row's last real position, where the next token is read. ``state`` is the model's pytree
    (None for a stateless model).
    """
    logits, state = apply(params, chunk.inputs, state, chunk.valid)
    logits = logits.astype(jnp.float32)  # [B, C, V]
    if scale_logits:
        logits = logits * LOGIT_SCALE
    target_logits = jnp.take_along_axis(logits, chunk.targets[..., None], axis=-1)[..., 0]
    target_log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)
    # Greedy means the target has the top logit; comparing with the max is much cheaper on CPU
    # than an argmax over the vocabulary at every position.
    is_greedy = target_logits >= logits.max(axis=-1)
    # The only argmax needed is at each row's last real position: the next token to generate.
    width = chunk.inputs.shape[1]
    in_chunk = jnp.clip(last - offset, 0, width - 1)
    ends_here = (last >= offset) & (last < offset + width)
    last_logits = jnp.take_along_axis(logits, in_chunk[:, None, None], axis=1)[:, 0]
    scored = chunk.scored
    return state, Totals(
        loglik=totals.loglik + jnp.where(scored, target_log_probs, 0.0).sum(-1),
        num_tokens=totals.num_tokens + scored.sum(-1, dtype=jnp.int32),
        greedy=totals.greedy & jnp.all(~scored | is_greedy, axis=-1),
        nonfinite=totals.nonfinite | jnp.any(scored & ~jnp.isfinite(target_log_probs), axis=-1),
        next_token=jnp.where(ends_here, jnp.argmax(last_logits, axis=-1).astype(jnp.int32), totals.next_token),
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
