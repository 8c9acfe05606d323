"""The reference recurrent LM: xLSTM's mLSTM (matrix-memory) cell in Flax Linen.

Per head, with query q, key k, value v, input-gate pre-activation i~ and log forget gate log f:

    m_t = max(log f_t + m_{t-1}, i~_t)                      # stabiliser
    C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i~_t - m_t) v_t k_t^T
    n_t = exp(log f_t + m_{t-1} - m_t) n_{t-1} + exp(i~_t - m_t) k_t
    h_t = C_t q_t / (max(|n_t . q_t|, exp(-m_t)) + eps)

Two forms compute the same thing. ``mlstm_chunkwise`` splits a sequence into segments and
handles each segment at once with ``mlstm_parallel``, carrying the state between segments: memory
grows linearly with length, and it serves both training and chunked evaluation.
``mlstm_recurrent`` scans one token at a time. A masked position gets log f = 0 and i~ = -inf, which leaves
(C, n, m) exactly unchanged in the recurrence.

The kernels are shared with transformers' xLSTM (``xlstm.py``): any query/key scaling is the
caller's, C is laid out [value dim, key dim], and ``eps`` (0 here, ``config.eps`` there) is added
to the denominator as transformers does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import UserError
from .protocol import LanguageModel

State = tuple  # per layer: (C [B,H,D,D], n [B,H,D], m [B,H])


@dataclasses.dataclass(frozen=True)
class MLSTMConfig:
    vocab_size: int
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    proj_factor: float = 2.0
    forget_gate: Literal["sigmoid", "exp"] = "sigmoid"
    # "chunkwise" runs segments of `segment_length` tokens in parallel; "recurrent" scans token by
    # token. Both give the same results.
    form: Literal["chunkwise", "recurrent"] = "chunkwise"
    segment_length: int = 64

    @property
    def inner_dim(self) -> int:
        return int(self.proj_factor * self.embed_dim)

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.num_heads

    def validate(self) -> MLSTMConfig:
        if self.vocab_size < 2:
            raise UserError(f"model vocab_size must be at least 2, got {self.vocab_size}")
        if min(self.embed_dim, self.num_layers, self.num_heads) < 1:
            raise UserError("model embed_dim, num_layers and num_heads must be positive")
        if self.inner_dim % self.num_heads:
            raise UserError(
                f"inner dim {self.inner_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.forget_gate not in ("sigmoid", "exp"):
            raise UserError(f"forget_gate must be 'sigmoid' or 'exp', got {self.forget_gate!r}")
        if self.form not in ("chunkwise", "recurrent"):
            raise UserError(f"form must be 'chunkwise' or 'recurrent', got {self.form!r}")
        if self.segment_length < 1:
            raise UserError(f"segment_length must be positive, got {self.segment_length}")
        return self


PRESETS = {
    "tiny": {"embed_dim": 64, "num_layers": 2, "num_heads": 2},
    "small": {"embed_dim": 256, "num_layers": 6, "num_heads": 4},
}


def preset_config(name: str, vocab_size: int, **overrides) -> MLSTMConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return MLSTMConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides}).validate()


def init_state(config: MLSTMConfig, batch_size: int) -> State:
    """The zero state of a fresh sequence, one (C, n, m) triple per layer."""
    heads, dim = config.num_heads, config.head_dim
    return tuple(
        (
            jnp.zeros((batch_size, heads, dim, dim), jnp.float32),
            jnp.zeros((batch_size, heads, dim), jnp.float32),
            jnp.zeros((batch_size, heads), jnp.float32),
        )
        for _ in range(config.num_layers)
    )


def _tree(starts, branches, length):
    """Where packed sequences begin, as index arrays (each int [B, 1, T], for one position ``t``):
    ``sequence``: its sequence's number (0: the one the incoming state continues); ``first``: its
    sequence's first position; ``root``: the first position of its trunk, the latest sequence not
    begun by a branch (0 for the incoming one); ``fresh``: whether the trunk began from the fresh
    state; and, with ``branches``, ``in_branch`` (bool) and ``trunk_end``, for a position in a
    branch its trunk's last position (-1: the trunk ended before this call)."""
    positions = jnp.arange(length)
    starts = jnp.zeros_like(branches) if starts is None else starts
    begins = starts if branches is None else starts | branches
    sequence = jnp.cumsum(begins, axis=-1, dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(begins, positions, 0), axis=1)
    root = jax.lax.cummax(jnp.where(starts, positions, 0), axis=1)
    fresh = jnp.take_along_axis(starts, root, axis=1)
    in_branch = trunk_end = None
    if branches is not None:
        next_branch = jax.lax.cummin(jnp.where(branches, positions, length), axis=1, reverse=True)
        trunk_end = jnp.take_along_axis(next_branch, root, axis=1)[:, None, :] - 1
        in_branch = (jnp.take_along_axis(branches, first, axis=1) & (sequence > 0))[:, None, :]
    return sequence[:, None, :], first[:, None, :], root[:, None, :], fresh[:, None, :], in_branch, trunk_end


def mlstm_parallel(q, k, v, log_i, log_f, state, eps: float = 0.0, starts=None, branches=None):
    """One segment of the mLSTM, all positions at once, starting from ``state``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_i, log_f: [B, T, H];
    state: (C [B,H,V,K], n [B,H,K], m [B,H]).
    ``starts``, ``branches``: None or bool [B, T], for several sequences packed in a row. At a
    start a new sequence begins from the fresh state (zeros). At a branch one begins from the
    state at the end of its trunk, the latest sequence not begun by a branch: several
    continuations of one context follow it, each seeing the context and itself only. A trunk that
    ended before this call must have ended just before it (its state is ``state``).
    Returns h [B, T, H, V] and the state after the segment (that of its last position's path).
    """
    c0, n0, m0 = state
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, D]
    log_i, log_f = log_i.transpose(0, 2, 1), log_f.transpose(0, 2, 1)  # [B, H, T]
    length = q.shape[2]

    decay = jnp.cumsum(log_f, axis=-1)  # log of the product of forget gates up to t
    causal = jnp.tril(jnp.ones((length, length), bool))
    # ``path``: the log decay from the call's start to each position along the positions whose
    # inputs reach it (its path); ``entry``: the log decay where the state it started from enters,
    # and ``incoming``: whether that state is ``state`` (else the fresh one: C = n = m = 0).
    path, entry, incoming = decay, 0.0, None
    if starts is not None or branches is not None:
        sequence, first, root, fresh, in_branch, trunk_end = _tree(starts, branches, length)

        def take(values, index):  # each position's ``index`` [B, 1, T] entry of ``values`` [B, H, T]
            return jnp.take_along_axis(values, jnp.broadcast_to(index, values.shape), axis=-1)

        decay_before = decay - log_f
        incoming = ~fresh
        entry = jnp.where(incoming, 0.0, take(decay_before, root))
        causal = causal & (sequence[..., :, None] == sequence[..., None, :])
        if branches is not None:  # a branch's path runs through its trunk, up to the trunk's end
            trunk_decay = jnp.where(trunk_end >= 0, take(decay, jnp.maximum(trunk_end, 0)), 0.0)
            path = jnp.where(in_branch, trunk_decay + decay - take(decay_before, first), decay)
            on_trunk = in_branch[..., :, None] & (root[..., :, None] <= jnp.arange(length)) & (
                jnp.arange(length) <= trunk_end[..., :, None])  # the trunk ends before the branch
            causal = causal | on_trunk
    log_w = jnp.where(causal, path[..., :, None] - path[..., None, :] + log_i[..., None, :], -jnp.inf)
    # Weight of the state each position started from; the fresh state has m = 0.
    m_in = m0[..., None] if incoming is None else jnp.where(incoming, m0[..., None], 0.0)
    log_w0 = path - entry + m_in
    m = jnp.maximum(log_w.max(-1), log_w0)  # [B, H, T]; equals the recurrence's m_t
    w = jnp.exp(log_w - m[..., None])
    w0 = jnp.exp(log_w0 - m)
    if incoming is not None:
        w0 = jnp.where(incoming, w0, 0.0)  # a fresh state's C and n are zero

    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) * w
    numerator = scores @ v + w0[..., None] * jnp.einsum("bhde,bhte->bhtd", c0, q)
    denominator = scores.sum(-1) + w0 * jnp.einsum("bhe,bhte->bht", n0, q)
    h = numerator / (jnp.maximum(jnp.abs(denominator), jnp.exp(-m)) + eps)[..., None]

    # The state after the last position: its path's inputs and starting state.
    log_w_end = log_w[..., -1, :]  # weight of each input
    m_end = m[..., -1]
    w_end = jnp.exp(log_w_end - m_end[..., None])
    w0_end = w0[..., -1]
    c_end = jnp.einsum("bht,bhtd,bhte->bhde", w_end, v, k) + w0_end[..., None, None] * c0
    n_end = jnp.einsum("bht,bhte->bhe", w_end, k) + w0_end[..., None] * n0
    return h.transpose(0, 2, 1, 3), (c_end, n_end, m_end)


def mlstm_chunkwise(q, k, v, log_i, log_f, state, segment_length: int, eps: float = 0.0, starts=None, branches=None):
    """``mlstm_parallel`` over consecutive segments with the state carried; shapes as there.

    The tail is padded with masked positions (log i = -inf, log f = 0), which leave the state as
    it was, so any length works. With branches the call runs as one segment: a branch needs its
    trunk's positions, which an earlier segment would have folded into a state it no longer has
    (the packed calls that carry branches are at most a few chunks long).
    """
    batch, length = q.shape[:2]
    if length <= segment_length or branches is not None:
        return mlstm_parallel(q, k, v, log_i, log_f, state, eps, starts, branches)
    segments = -(-length // segment_length)
    pad = segments * segment_length - length

    def split(x, fill):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(batch, segments, segment_length, *x.shape[2:]), 1, 0)

    inputs = (split(q, 0.0), split(k, 0.0), split(v, 0.0), split(log_i, -jnp.inf), split(log_f, 0.0))
    marks = {} if starts is None else {"starts": split(starts, False)}

    def segment(carry, xs):
        h, carry = mlstm_parallel(*xs[0], carry, eps, **xs[1])
        return carry, h

    state, h = jax.lax.scan(segment, state, (inputs, marks))
    h = jnp.moveaxis(h, 0, 1).reshape(batch, segments * segment_length, *h.shape[3:])
    return h[:, :length], state


def mlstm_recurrent(q, k, v, log_i, log_f, state, eps: float = 0.0, starts=None, branches=None):
    """The same as ``mlstm_parallel``, one token at a time; shapes as there."""

    def restart(at, carry, to):
        """``carry`` with the rows marked in ``at`` (bool [B]) replaced by ``to``."""
        return tuple(jnp.where(at.reshape((-1,) + (1,) * (x.ndim - 1)), new, x) for x, new in zip(carry, to))

    def step(carry, inputs):
        (q_t, k_t, v_t, log_i_t, log_f_t), marks = inputs  # [B, H, D] and [B, H]; bool [B]
        # ``trunk``: the state at the end of the latest sequence not begun by a branch.
        carry, trunk, in_branch = carry
        if "starts" in marks:  # a new sequence from the fresh state
            carry = restart(marks["starts"], carry, (0.0, 0.0, 0.0))
            in_branch = in_branch & ~marks["starts"]
        if "branches" in marks:  # a new sequence from the end of the trunk
            carry = restart(marks["branches"], carry, trunk)
            in_branch = in_branch | marks["branches"]
        c, n, m = carry
        m_new = jnp.maximum(log_f_t + m, log_i_t)
        input_weight = jnp.exp(log_i_t - m_new)
        forget_weight = jnp.exp(log_f_t + m - m_new)
        c = forget_weight[..., None, None] * c + input_weight[..., None, None] * (
            v_t[..., :, None] * k_t[..., None, :]
        )
        n = forget_weight[..., None] * n + input_weight[..., None] * k_t
        numerator = jnp.einsum("bhde,bhe->bhd", c, q_t)
        denominator = jnp.einsum("bhe,bhe->bh", n, q_t)
        h_t = numerator / (jnp.maximum(jnp.abs(denominator), jnp.exp(-m_new)) + eps)[..., None]
        carry = (c, n, m_new)
        trunk = restart(~in_branch, trunk, carry)
        return (carry, trunk, in_branch), h_t

    marks = {name: x for name, x in (("starts", starts), ("branches", branches)) if x is not None}
    time_major = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), ((q, k, v, log_i, log_f), marks))
    (end, _, _), h = jax.lax.scan(step, (state, state, jnp.zeros(q.shape[0], bool)), time_major)
    return jnp.moveaxis(h, 0, 1), end


def _gate_bias_init(num_heads: int):
    """Input gates start at 0; forget gates start open (sigmoid(3..6)), as in xLSTM."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.concatenate(
            [jnp.zeros((num_heads,), dtype), jnp.linspace(3.0, 6.0, num_heads, dtype=dtype)]
        ).reshape(shape)

    return init


class MLSTMBlock(nn.Module):
    config: MLSTMConfig

    @nn.compact
    def __call__(self, x, state, mask, starts=None, branches=None):
        cfg = self.config
        batch, length, _ = x.shape
        heads, dim = cfg.num_heads, cfg.head_dim

        y = nn.LayerNorm(name="norm")(x)
        branch, gate = jnp.split(nn.Dense(2 * cfg.inner_dim, use_bias=False, name="up")(y), 2, -1)

        def heads_of(name):
            return nn.Dense(cfg.inner_dim, use_bias=False, name=name)(branch).reshape(batch, length, heads, dim)

        q, k, v = heads_of("query"), heads_of("key") / math.sqrt(dim), heads_of("value")
        gates = nn.Dense(2 * heads, bias_init=_gate_bias_init(heads), name="gates")(branch)
        log_i, f_pre = jnp.split(gates, 2, -1)
        log_f = jax.nn.log_sigmoid(f_pre) if cfg.forget_gate == "sigmoid" else f_pre
        keep = mask[..., None]
        log_i = jnp.where(keep, log_i, -jnp.inf)
        log_f = jnp.where(keep, log_f, 0.0)

        if cfg.form == "chunkwise":
            h, state = mlstm_chunkwise(q, k, v, log_i, log_f, state, cfg.segment_length, starts=starts, branches=branches)
        else:
            h, state = mlstm_recurrent(q, k, v, log_i, log_f, state, starts=starts, branches=branches)

        # Per-head RMS norm keeps the output scale independent of the stabiliser.
        h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
        h = h.reshape(batch, length, cfg.inner_dim) * self.param("h_scale", nn.initializers.ones, (cfg.inner_dim,))
        out = nn.Dense(cfg.embed_dim, use_bias=False, name="down")(h * nn.silu(gate))
        return x + out, state


class MLSTMLanguageModel(nn.Module):
    """tokens [B, T] int32, state, mask [B, T] bool[, starts, branches [B, T] bool] -> (logits [B, T, V] float32, state)."""

    config: MLSTMConfig

    @nn.compact
    def __call__(self, tokens, state, mask, starts=None, branches=None):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.embed_dim, name="embed")(tokens)
        new_state = []
        for layer in range(cfg.num_layers):
            x, layer_state = MLSTMBlock(cfg, name=f"block_{layer}")(x, state[layer], mask, starts, branches)
            new_state.append(layer_state)
        x = nn.LayerNorm(name="final_norm")(x)
        logits = nn.Dense(cfg.vocab_size, use_bias=False, name="unembed")(x)
        return logits.astype(jnp.float32), tuple(new_state)


def init_params(config: MLSTMConfig, seed: int = 0):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return MLSTMLanguageModel(config).init(
        jax.random.key(seed), tokens, init_state(config, 1), jnp.ones((1, 1), bool)
    )["params"]


def as_language_model(config: MLSTMConfig, params) -> LanguageModel:
    """The reference model under the model contract."""
    module = MLSTMLanguageModel(config)

    def apply(params, tokens, state, mask, starts=None, branches=None):
        return module.apply({"params": params}, tokens, state, mask, starts, branches)

    return LanguageModel(
        apply=apply,
        init_state=lambda batch_size: init_state(config, batch_size),
        params=params,
        vocab_size=config.vocab_size,
        has_state=True,
        packable=True,
    )


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
