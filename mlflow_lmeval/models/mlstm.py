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


def _by_source(source, incoming, branch, fresh):
    """``incoming``, ``branch`` or ``fresh`` by where each position's sequence began from
    (``source``: None, all from the incoming state; else int [..., T] of 0, 1, 2 in that order)."""
    if source is None:
        return incoming
    return jnp.where(source == 0, incoming, jnp.where(source == 1, branch, fresh))


def _sources(starts, branches, length):
    """Each position's sequence (int32 [B, 1, T], 0: the one the incoming state continues), what
    that sequence began from (int32 [B, 1, T], see ``_by_source``), and its first position (int
    [B, 1, T])."""
    starts = jnp.zeros_like(branches) if starts is None else starts
    branches = jnp.zeros_like(starts) if branches is None else branches
    begins = starts | branches
    sequence = jnp.cumsum(begins, axis=-1, dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(begins, jnp.arange(length), 0), axis=1)
    source = jnp.where(sequence == 0, 0, jnp.where(jnp.take_along_axis(starts, first, axis=1), 2, 1))
    return sequence[:, None, :], source[:, None, :], first[:, None, :]


def mlstm_parallel(q, k, v, log_i, log_f, state, eps: float = 0.0, starts=None, branches=None, branch_state=None):
    """One segment of the mLSTM, all positions at once, starting from ``state``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_i, log_f: [B, T, H];
    state: (C [B,H,V,K], n [B,H,K], m [B,H]).
    ``starts``, ``branches``: None or bool [B, T]. At a start a new sequence begins from the fresh
    state (zeros); at a branch one begins from ``branch_state`` (default ``state``), so that
    several continuations of one context can share a row. Neither sees the positions before it.
    Returns h [B, T, H, V] and the state after the segment (of its last sequence).
    """
    c0, n0, m0 = state
    cb, nb, mb = state if branch_state is None else branch_state
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, D]
    log_i, log_f = log_i.transpose(0, 2, 1), log_f.transpose(0, 2, 1)  # [B, H, T]
    length = q.shape[2]

    decay = jnp.cumsum(log_f, axis=-1)  # log of the product of forget gates up to t
    causal = jnp.tril(jnp.ones((length, length), bool))
    # ``since_start``: the log decay since each position's sequence began (where the state it
    # began from enters).
    source, since_start, in_last = None, decay, True
    if starts is not None or branches is not None:
        sequence, source, first = _sources(starts, branches, length)
        causal = causal & (sequence[..., :, None] == sequence[..., None, :])
        decay_before_first = jnp.take_along_axis(decay - log_f, jnp.broadcast_to(first, decay.shape), axis=-1)
        since_start = decay - jnp.where(sequence == 0, 0.0, decay_before_first)
        in_last = sequence == sequence[..., -1:]
    log_w = jnp.where(causal, decay[..., :, None] - decay[..., None, :] + log_i[..., None, :], -jnp.inf)
    # Weight of the state each position's sequence began from; the fresh state has m = 0.
    log_w0 = since_start + _by_source(source, m0[..., None], mb[..., None], 0.0)
    m = jnp.maximum(log_w.max(-1), log_w0)  # [B, H, T]; equals the recurrence's m_t
    w = jnp.exp(log_w - m[..., None])
    w0 = jnp.exp(log_w0 - m)

    def started(weight, at, c_term, n_term):
        """The starting states' share of the numerator and denominator: ``weight`` on the incoming
        state where ``at`` is 0, on ``branch_state`` where 1; a fresh state's C and n are zero."""
        incoming = _by_source(at, weight, 0.0, 0.0)
        numerator, denominator = c_term(c0, incoming), n_term(n0, incoming)
        if branches is not None:
            branch = jnp.where(at == 1, weight, 0.0)
            numerator, denominator = numerator + c_term(cb, branch), denominator + n_term(nb, branch)
        return numerator, denominator

    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) * w
    state_numerator, state_denominator = started(
        w0, source,
        lambda c, weight: weight[..., None] * jnp.einsum("bhde,bhte->bhtd", c, q),
        lambda n, weight: weight * jnp.einsum("bhe,bhte->bht", n, q))
    numerator = scores @ v + state_numerator
    denominator = scores.sum(-1) + state_denominator
    h = numerator / (jnp.maximum(jnp.abs(denominator), jnp.exp(-m)) + eps)[..., None]

    # The state at the segment's end: only the last sequence's inputs count.
    log_w_end = jnp.where(in_last, decay[..., -1:] - decay + log_i, -jnp.inf)  # weight of each input
    source_end = None if source is None else source[..., -1]  # [B, 1]
    log_w0_end = since_start[..., -1] + _by_source(source_end, m0, mb, 0.0)
    m_end = jnp.maximum(log_w_end.max(-1), log_w0_end)
    w_end = jnp.exp(log_w_end - m_end[..., None])
    state_c, state_n = started(jnp.exp(log_w0_end - m_end), source_end,
                               lambda c, weight: weight[..., None, None] * c, lambda n, weight: weight[..., None] * n)
    c_end = jnp.einsum("bht,bhtd,bhte->bhde", w_end, v, k) + state_c
    n_end = jnp.einsum("bht,bhte->bhe", w_end, k) + state_n
    return h.transpose(0, 2, 1, 3), (c_end, n_end, m_end)


def mlstm_chunkwise(q, k, v, log_i, log_f, state, segment_length: int, eps: float = 0.0, starts=None, branches=None):
    """``mlstm_parallel`` over consecutive segments with the state carried; shapes as there.
    A branch in any segment begins from ``state``, the state the call began with.

    The tail is padded with masked positions (log i = -inf, log f = 0), which leave the state as
    it was, so any length works.
    """
    batch, length = q.shape[:2]
    if length <= segment_length:
        return mlstm_parallel(q, k, v, log_i, log_f, state, eps, starts, branches)
    segments = -(-length // segment_length)
    pad = segments * segment_length - length

    def split(x, fill):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(batch, segments, segment_length, *x.shape[2:]), 1, 0)

    inputs = (split(q, 0.0), split(k, 0.0), split(v, 0.0), split(log_i, -jnp.inf), split(log_f, 0.0))
    marks = {name: split(x, False) for name, x in (("starts", starts), ("branches", branches)) if x is not None}
    branch_state = state if branches is not None else None

    def segment(carry, xs):
        h, carry = mlstm_parallel(*xs[0], carry, eps, **xs[1], branch_state=branch_state)
        return carry, h

    state, h = jax.lax.scan(segment, state, (inputs, marks))
    h = jnp.moveaxis(h, 0, 1).reshape(batch, segments * segment_length, *h.shape[3:])
    return h[:, :length], state


def mlstm_recurrent(q, k, v, log_i, log_f, state, eps: float = 0.0, starts=None, branches=None):
    """The same as ``mlstm_parallel``, one token at a time; shapes as there (a branch begins
    from ``state``)."""

    def restart(at, carry, to):
        """``carry`` with the rows marked in ``at`` (bool [B]) replaced by ``to``."""
        return tuple(jnp.where(at.reshape((-1,) + (1,) * (x.ndim - 1)), new, x) for x, new in zip(carry, to))

    def step(carry, inputs):
        (q_t, k_t, v_t, log_i_t, log_f_t), marks = inputs  # [B, H, D] and [B, H]; bool [B]
        if "starts" in marks:  # a new sequence from the fresh state
            carry = restart(marks["starts"], carry, (0.0, 0.0, 0.0))
        if "branches" in marks:  # a new sequence from the state the call began with
            carry = restart(marks["branches"], carry, state)
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
        return (c, n, m_new), h_t

    marks = {name: x for name, x in (("starts", starts), ("branches", branches)) if x is not None}
    time_major = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), ((q, k, v, log_i, log_f), marks))
    end, h = jax.lax.scan(step, state, time_major)
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
