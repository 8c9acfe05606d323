"""The model contract the evaluator relies on, and adapters that bring Flax modules to it.

A model is a pure step function plus its parameters::

    init_state(batch_size) -> state                      # pytree, or None for a stateless model
    apply(params, tokens[B, T] int32, state, mask[B, T] bool) -> (logits[B, T, V], state)

For a recurrent model, evaluating a sequence in chunks of any size gives the same logits as one
full pass, and a position whose mask is False leaves the state unchanged. A stateless model
(``init_state`` returns None) is evaluated with fixed-context windows instead. A packable model's
apply also takes ``starts`` and ``branches`` (see ``LanguageModel.packable``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Everything the evaluator may know about a model."""

    apply: Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
    init_state: Callable[[int], Any]
    params: Any
    vocab_size: int
    has_state: bool  # False: init_state returns None, and the evaluator uses fixed-context windows
    context_length: int | None = None
    # True: apply also takes ``starts`` and ``branches`` (bool [B, T]). At a start a new sequence
    # begins from the fresh state of init_state; at a branch one begins from the end of the
    # latest sequence not begun by a branch (its context), which ended in this call or just
    # before it. A sequence sees only its own positions and its context's. The evaluator then
    # packs requests end to end in rows instead of padding each to its own row, and runs the
    # continuations of a shared context right after it.
    packable: bool = False


def cast_floating(params, dtype):
    """``params`` with every floating-point leaf in ``dtype`` (integer leaves as they are)."""
    dtype = jnp.dtype(dtype)

    def cast(leaf):
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype else leaf

    return jax.tree.map(cast, params)


def floating_dtypes(params) -> str:
    """The floating-point dtypes of ``params``' leaves, e.g. "float32" or "bfloat16+float32"."""
    names = {str(leaf.dtype) for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)}
    return "+".join(sorted(names))


def full_pass(model: LanguageModel) -> Callable[[Any, jax.Array], jax.Array]:
    """jit-compiled ``(params, tokens[B, T]) -> logits[B, T, V]``: one pass from a fresh state."""

    @jax.jit
    def run(params, tokens):
        batch, length = tokens.shape
        logits, _ = model.apply(params, tokens, model.init_state(batch), jnp.ones((batch, length), bool))
        return logits

    return run


def padded_logits(run: Callable[[Any, jax.Array], jax.Array], params, tokens) -> np.ndarray:
    """tokens int32 [B, T] -> float32 [B, T, V] through ``run`` (a ``full_pass``).

    The length is padded on the right to a multiple of 64, which a causal model cannot see,
    so that calls of many different lengths share a few compilations.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise UserError(f"tokens must have shape [batch, length], got {tokens.shape}")
    length = tokens.shape[1]
    padded = np.pad(tokens, [(0, 0), (0, -length % 64)])
    return np.asarray(run(params, padded), np.float32)[:, :length]


def from_linen_cache(module, params, *, vocab_size: int, context_length: int | None = None) -> LanguageModel:
    """Adapt a Linen module called as ``module(tokens, mask=mask)`` that keeps its recurrent state
    in the mutable ``cache`` collection (the convention of JAX xLSTM trainers).

    The initial state is the module's own cache initialisers, read by an ``init`` call whose every
    position is masked: by the contract such a call leaves the freshly created cache untouched.
    A module without a ``cache`` collection is treated as stateless.
    """
    initial_caches: dict[int, Any] = {}

    def init_state(batch_size: int):
        if batch_size not in initial_caches:
            tokens = jnp.zeros((batch_size, 1), jnp.int32)
            mask = jnp.zeros((batch_size, 1), bool)
            variables = module.init(jax.random.key(0), tokens, mask=mask)
            initial_caches[batch_size] = variables.get("cache")
        return initial_caches[batch_size]

    def apply(params, tokens, state, mask):
        if state is None:
            return module.apply({"params": params}, tokens, mask=mask), None
        logits, updated = module.apply(
            {"params": params, "cache": state}, tokens, mask=mask, mutable=["cache"]
        )
        return logits, updated["cache"]

    return LanguageModel(apply, init_state, params, vocab_size, init_state(1) is not None, context_length)


def from_nnx(module, *, vocab_size: int, context_length: int | None = None) -> LanguageModel:
    """Adapt a Flax NNX module with ``module.init_state(batch_size)`` and
    ``module(tokens, state, mask) -> (logits, state)``.

    The module is split once into a static graph and its variables; ``apply`` merges them back
    inside the traced function, so the result is a pure function that jit can compile.
    """
    from flax import nnx  # imported lazily: 0.65 s measured on this machine, on top of flax.linen

    graphdef, variables = nnx.split(module)

    def apply(variables, tokens, state, mask):
        return nnx.merge(graphdef, variables)(tokens, state, mask)

    return LanguageModel(apply, module.init_state, variables, vocab_size, module.init_state(1) is not None, context_length)
