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


def mlstm_parallel(q, k, v, log_i, log_f, state, eps: float = 0.0, starts=None):
    """One segment of the mLSTM, all positions at once, starting from ``state``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_i, log_f: [B, T, H];
    state: (C [B,H,V,K], n [B,H,K], m [B,H]); starts: None or bool [B, T], True where a new
    sequence starts from the fresh state (zeros) instead of continuing the one before it.
    Returns h [B, T, H, V] and the state after the segment.
    """
    c0, n0, m0 = state
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, D]
    log_i, log_f = log_i.transpose(0, 2, 1), log_f.transpose(0, 2, 1)  # [B, H, T]
    length = q.shape[2]

    decay = jnp.cumsum(log_f, axis=-1)  # log of the product of forget gates up to t
    causal = jnp.tril(jnp.ones((length, length), bool))
    # ``carried``: positions that continue the incoming state; ``since_start``: the log decay
    # since each position's sequence began (the segment's start, for the incoming state).
    carried, since_start, in_last = True, decay, True
    if starts is not None:
        sequence = jnp.cumsum(starts, axis=-1, dtype=jnp.int32)[:, None, :]  # [B, 1, T]; 0: the incoming one
        causal = causal & (sequence[..., :, None] == sequence[..., None, :])
        first = jax.lax.cummax(jnp.where(starts, jnp.arange(length), 0), axis=1)[:, None, :]
        decay_before_first = jnp.take_along_axis(decay - log_f, jnp.broadcast_to(first, decay.shape), axis=-1)
        carried = sequence == 0
        since_start = decay - jnp.where(carried, 0.0, decay_before_first)
        in_last = sequence == sequence[..., -1:]
    log_w = jnp.where(causal, decay[..., :, None] - decay[..., None, :] + log_i[..., None, :], -jnp.inf)
    # Weight of the incoming state at each position; a new sequence's fresh state has m = 0.
    log_w0 = since_start + jnp.where(carried, m0[..., None], 0.0)
    m = jnp.maximum(log_w.max(-1), log_w0)  # [B, H, T]; equals the recurrence's m_t
    w = jnp.exp(log_w - m[..., None])
    w0 = jnp.where(carried, jnp.exp(log_w0 - m), 0.0)  # a fresh state's C and n are zero

    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) * w
    numerator = scores @ v + w0[..., None] * jnp.einsum("bhde,bhte->bhtd", c0, q)
    denominator = scores.sum(-1) + w0 * jnp.einsum("bhe,bhte->bht", n0, q)
    h = numerator / (jnp.maximum(jnp.abs(denominator), jnp.exp(-m)) + eps)[..., None]

    # The state at the segment's end: only the last sequence's inputs count.
    log_w_end = jnp.where(in_last, decay[..., -1:] - decay + log_i, -jnp.inf)  # weight of each input
    carried_end = carried if starts is None else carried[..., -1]
    log_w0_end = since_start[..., -1] + jnp.where(carried_end, m0, 0.0)
    m_end = jnp.maximum(log_w_end.max(-1), log_w0_end)
    w_end = jnp.exp(log_w_end - m_end[..., None])
    w0_end = jnp.where(carried_end, jnp.exp(log_w0_end - m_end), 0.0)
    c_end = jnp.einsum("bht,bhtd,bhte->bhde", w_end, v, k) + w0_end[..., None, None] * c0
    n_end = jnp.einsum("bht,bhte->bhe", w_end, k) + w0_end[..., None] * n0
    return h.transpose(0, 2, 1, 3), (c_end, n_end, m_end)


def mlstm_chunkwise(q, k, v, log_i, log_f, state, segment_length: int, eps: float = 0.0, starts=None):
    """``mlstm_parallel`` over consecutive segments with the state carried; shapes as there.

    The tail is padded with masked positions (log i = -inf, log f = 0), which leave the state as
    it was, so any length works.
    """
    batch, length = q.shape[:2]
    if length <= segment_length:
        return mlstm_parallel(q, k, v, log_i, log_f, state, eps, starts)
    segments = -(-length // segment_length)
    pad = segments * segment_length - length

    def split(x, fill):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(batch, segments, segment_length, *x.shape[2:]), 1, 0)

    inputs = (split(q, 0.0), split(k, 0.0), split(v, 0.0), split(log_i, -jnp.inf), split(log_f, 0.0))
    if starts is not None:
        inputs += (split(starts, False),)

    def segment(carry, xs):
        h, carry = mlstm_parallel(*xs[:5], carry, eps, *xs[5:])
        return carry, h

    state, h = jax.lax.scan(segment, state, inputs)
    h = jnp.moveaxis(h, 0, 1).reshape(batch, segments * segment_length, *h.shape[3:])
    return h[:, :length], state


def mlstm_recurrent(q, k, v, log_i, log_f, state, eps: float = 0.0, starts=None):
    """The same as ``mlstm_parallel``, one token at a time; shapes as there."""

    def step(carry, inputs):
        c, n, m = carry
        q_t, k_t, v_t, log_i_t, log_f_t = inputs[:5]  # [B, H, D] and [B, H]
        if starts is not None:  # a new sequence begins from the fresh state
            c, n, m = (jnp.where(inputs[5].reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x) for x in (c, n, m))
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

    sequences = (q, k, v, log_i, log_f) + (() if starts is None else (starts,))
    time_major = [jnp.moveaxis(x, 1, 0) for x in sequences]
    state, h = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(h, 0, 1), state


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
    def __call__(self, x, state, mask, starts=None):
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
            h, state = mlstm_chunkwise(q, k, v, log_i, log_f, state, cfg.segment_length, starts=starts)
        else:
            h, state = mlstm_recurrent(q, k, v, log_i, log_f, state, starts=starts)

        # Per-head RMS norm keeps the output scale independent of the stabiliser.
        h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
        h = h.reshape(batch, length, cfg.inner_dim) * self.param("h_scale", nn.initializers.ones, (cfg.inner_dim,))
        out = nn.Dense(cfg.embed_dim, use_bias=False, name="down")(h * nn.silu(gate))
        return x + out, state


class MLSTMLanguageModel(nn.Module):
    """tokens [B, T] int32, state, mask [B, T] bool[, starts [B, T] bool] -> (logits [B, T, V] float32, state)."""

    config: MLSTMConfig

    @nn.compact
    def __call__(self, tokens, state, mask, starts=None):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.embed_dim, name="embed")(tokens)
        new_state = []
        for layer in range(cfg.num_layers):
            x, layer_state = MLSTMBlock(cfg, name=f"block_{layer}")(x, state[layer], mask, starts)
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

    def apply(params, tokens, state, mask, starts=None):
        return module.apply({"params": params}, tokens, state, mask, starts)

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
