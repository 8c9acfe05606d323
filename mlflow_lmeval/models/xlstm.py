"""transformers' ``xLSTMForCausalLM`` (the xLSTM-7b architecture) in Flax Linen.

The same weights give the same logits as transformers 5.24 (``models/xlstm/modeling_xlstm.py``,
its native kernels). The model reads top to bottom::

    x = embeddings[tokens]
    per block:  x = x + mLSTMLayer(RMSNorm(x));  x = x + GatedFFN(RMSNorm(x))
    logits = soft_cap(lm_head(RMSNorm(x)), output_logit_soft_cap)

    mLSTMLayer(x): q, k, v, o = projections of x (one fused matrix or four)
                   i~, f~ = soft_cap(gate projections of x, gate_soft_cap)
                   h = mLSTM(q / sqrt(d_qk), k, v, log i = i~, log f = log sigmoid(f~))
                   out_proj(sigmoid(o) * MultiHeadLayerNorm(h))

The mLSTM cell is the one kernel shared with our reference model (``mlstm.py``). Parameter names
mirror transformers' so that loading is a renaming: ``backbone.blocks.3.ffn.proj_up.weight`` lives
at ``params["backbone"]["blocks_3"]["ffn"]["proj_up"]["weight"]``, with Linear weights kept in
torch's [out, in] layout (no transpose on load).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import UserError
from .mlstm import mlstm_chunkwise, mlstm_recurrent
from .protocol import LanguageModel

State = tuple  # per block: (C [B,H,Dv,Dqk], n [B,H,Dqk], m [B,H]) in inference_state_dtype

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def round_up(x: float, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= x (transformers' round_up_to_next_multiple_of)."""
    return int(((x + multiple - 1) // multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class XLSTMConfig:
    """The fields of transformers' ``xLSTMConfig`` that decide the math; defaults are its own
    defaults, which are the xLSTM-7b values.

    Fields transformers has but that change no result (kernel names, ``mode``, ``chunk_size``
    beyond choosing our segment length, ``autocast_kernel_dtype``, ``max_inference_chunksize``,
    token ids) are not kept.
    """

    vocab_size: int = 50304
    hidden_size: int = 4096
    num_blocks: int = 32
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    use_bias: bool = False
    norm_eps: float = 1e-6
    norm_reduction_force_float32: bool = True
    # transformers 5.24 never ties lm_head to the embeddings (it has no tied-weights keys), so this
    # only matters to the loader: a checkpoint without lm_head.weight then reuses the embeddings.
    tie_word_embeddings: bool = False
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    weight_mode: Literal["single", "fused"] = "single"
    eps: float = 1e-6
    inference_state_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Ours: "chunkwise" runs segments of `segment_length` tokens in parallel, "recurrent" scans
    # token by token; both give the same results.
    form: Literal["chunkwise", "recurrent"] = "chunkwise"
    segment_length: int = 64

    # transformers' layers size q/k/v with int(hidden * factor); its config properties (used only
    # for the cache) round that up to a multiple of 64. The two agree for every published config;
    # where they differ transformers cannot carry its cache, and the weights follow int().
    @property
    def qk_dim(self) -> int:
        return int(self.hidden_size * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.hidden_size * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round_up(self.hidden_size * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> XLSTMConfig:
        """Build from a transformers ``config.json`` dict; ``overrides`` set our own fields (form...)."""
        defaults = cls()

        def alias(name, other):
            # transformers keeps two names for the width and the depth and fills one from the other.
            a, b = hf.get(name), hf.get(other)
            if a is not None and b is not None and a != b:
                raise UserError(f"config.json: {name}={a} and {other}={b} disagree")
            return a if a is not None else b

        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: hf[key] for key in fields & hf.keys()}
        values["hidden_size"] = alias("hidden_size", "embedding_dim") or defaults.hidden_size
        values["num_blocks"] = alias("num_blocks", "num_hidden_layers") or defaults.num_blocks
        if "chunk_size" in hf:
            values["segment_length"] = hf["chunk_size"]
        if hf.get("add_out_norm", True) is not True:
            # transformers applies out_norm whatever this says, so its results would not be the
            # model the flag describes: refuse rather than pick one silently.
            raise UserError("config.json: add_out_norm=false is not supported (transformers ignores it)")
        return cls(**{**values, **overrides}).validate()

    def validate(self) -> XLSTMConfig:
        for name in ("vocab_size", "hidden_size", "num_blocks", "num_heads", "ffn_round_up_to_multiple_of", "segment_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"xlstm config: {name} must be a positive integer, got {value!r}")
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "norm_eps", "eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UserError(f"xlstm config: {name} must be a non-negative number, got {value!r}")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise UserError(f"xlstm config: {name} must be a positive number or null, got {value!r}")
        for name in ("use_bias", "norm_reduction_force_float32", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"xlstm config: {name} must be true or false, got {getattr(self, name)!r}")
        choices = {
            "weight_mode": ("single", "fused"),
            "inference_state_dtype": tuple(DTYPES),
            "form": ("chunkwise", "recurrent"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"xlstm config: {name}={getattr(self, name)!r} is not supported; choose one of: {', '.join(allowed)}")
        for name, dim in (("qk_dim_factor", self.qk_dim), ("v_dim_factor", self.v_dim)):
            if dim < self.num_heads or dim % self.num_heads:
                raise UserError(f"xlstm config: {name} gives dim {dim}, not a positive multiple of num_heads {self.num_heads}")
        return self


def soft_cap(x, cap: float | None):
    """cap * tanh(x / cap): bounded in (-cap, cap), the identity near 0; no cap when None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class Linear(nn.Module):
    """torch's nn.Linear: weight [out, in], optional bias [out]."""

    features: int
    use_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]), self.dtype)
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), weight)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return y


class RMSNorm(nn.Module):
    """x / rms(x) over the last axis, times weight (+ bias); the reduction in float32 if forced."""

    eps: float
    use_bias: bool
    force_float32: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        y = x.astype(jnp.float32) if self.force_float32 else x
        y = (y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + self.eps)).astype(x.dtype)
        y = y * self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.dtype)
        return y


class MultiHeadLayerNorm(nn.Module):
    """Layer norm of each head [B, T, H, D] over D, flattened to [B, T, H*D], times weight (+ bias)."""

    eps: float
    use_bias: bool
    force_float32: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        batch, length, heads, dim = x.shape
        y = x.astype(jnp.float32) if self.force_float32 else x
        centred = y - y.mean(-1, keepdims=True)
        y = (centred * jax.lax.rsqrt(jnp.mean(centred * centred, -1, keepdims=True) + self.eps)).astype(x.dtype)
        y = y.reshape(batch, length, heads * dim) * self.param("weight", nn.initializers.ones, (heads * dim,), self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (heads * dim,), self.dtype)
        return y


class MLSTMLayer(nn.Module):
    """x [B, T, D], state, mask [B, T][, starts, branches [B, T]] -> (y [B, T, D], state)."""

    config: XLSTMConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, state, mask, starts=None, branches=None):
        cfg, dtype = self.config, self.dtype
        batch, length, _ = x.shape
        heads = cfg.num_heads
        if cfg.weight_mode == "single":
            q = Linear(cfg.qk_dim, cfg.use_bias, dtype, name="q")(x)
            k = Linear(cfg.qk_dim, cfg.use_bias, dtype, name="k")(x)
            v = Linear(cfg.v_dim, cfg.use_bias, dtype, name="v")(x)
            o = Linear(cfg.v_dim, cfg.use_bias, dtype, name="ogate_preact")(x)
            i_pre = soft_cap(Linear(heads, True, dtype, name="igate_preact")(x), cfg.gate_soft_cap)
            f_pre = soft_cap(Linear(heads, True, dtype, name="fgate_preact")(x), cfg.gate_soft_cap)
        else:
            qkvo = Linear(2 * cfg.qk_dim + 2 * cfg.v_dim, cfg.use_bias, dtype, name="qkv_opreact")(x)
            q, k, v, o = jnp.split(qkvo, [cfg.qk_dim, 2 * cfg.qk_dim, 2 * cfg.qk_dim + cfg.v_dim], -1)
            gates = soft_cap(Linear(2 * heads, True, dtype, name="ifgate_preact")(x), cfg.gate_soft_cap)
            i_pre, f_pre = jnp.split(gates, 2, -1)

        # The cell runs in at least float32 whatever the weights are; the state is stored in
        # inference_state_dtype between calls, as transformers' recurrent kernels do.
        compute = jnp.promote_types(dtype, jnp.float32)

        def heads_of(t):
            return t.astype(compute).reshape(batch, length, heads, -1)

        q = heads_of(q) * (cfg.qk_head_dim**-0.5)  # transformers scales the query, not the key
        k, v = heads_of(k), heads_of(v)
        keep = mask[..., None]
        log_i = jnp.where(keep, i_pre.astype(compute), -jnp.inf)  # masked: no input...
        log_f = jnp.where(keep, jax.nn.log_sigmoid(f_pre.astype(compute)), 0.0)  # ...and no decay
        state_dtype = state[0].dtype
        cell_state = tuple(s.astype(compute) for s in state)
        if cfg.form == "chunkwise":
            h, new_state = mlstm_chunkwise(q, k, v, log_i, log_f, cell_state, cfg.segment_length, cfg.eps, starts, branches)
        else:
            h, new_state = mlstm_recurrent(q, k, v, log_i, log_f, cell_state, cfg.eps, starts, branches)
        new_state = tuple(s.astype(state_dtype) for s in new_state)

        norm = MultiHeadLayerNorm(cfg.norm_eps, cfg.use_bias, cfg.norm_reduction_force_float32, dtype, name="multihead_norm")
        h = norm(h.astype(dtype))
        y = Linear(cfg.hidden_size, cfg.use_bias, dtype, name="out_proj")(jax.nn.sigmoid(o) * h)
        return y, new_state


class FeedForward(nn.Module):
    """The gated (SwiGLU) FFN: proj_down(silu(gate(x)) * up(x)); x [B, T, D]."""

    config: XLSTMConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.config, self.dtype
        if cfg.weight_mode == "single":
            gate = Linear(cfg.ffn_dim, cfg.use_bias, dtype, name="proj_up_gate")(x)
            up = Linear(cfg.ffn_dim, cfg.use_bias, dtype, name="proj_up")(x)
        else:
            gate, up = jnp.split(Linear(2 * cfg.ffn_dim, cfg.use_bias, dtype, name="proj_up_gate_z")(x), 2, -1)
        return Linear(cfg.hidden_size, cfg.use_bias, dtype, name="proj_down")(nn.silu(gate) * up)


class XLSTMBlock(nn.Module):
    config: XLSTMConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, state, mask, starts=None, branches=None):
        cfg = self.config

        def norm(name):
            return RMSNorm(cfg.norm_eps, cfg.use_bias, cfg.norm_reduction_force_float32, self.dtype, name=name)

        y, state = MLSTMLayer(cfg, self.dtype, name="mlstm_layer")(norm("norm_mlstm")(x), state, mask, starts, branches)
        x = x + y
        x = x + FeedForward(cfg, self.dtype, name="ffn")(norm("norm_ffn")(x))
        return x, state


class Backbone(nn.Module):
    """tokens [B, T] -> hidden states [B, T, D] after the output norm, and the new state."""

    config: XLSTMConfig
    dtype: Any

    @nn.compact
    def __call__(self, tokens, state, mask, starts=None, branches=None):
        cfg = self.config
        embeddings = self.param("embeddings", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size), self.dtype)
        x = jnp.take(embeddings, tokens, axis=0)
        new_state = []
        # A Python loop, not a scan: each block's weights stay separate arrays, so loading never
        # needs a stacked copy of all blocks next to the per-block tensors.
        for index in range(cfg.num_blocks):
            x, block_state = XLSTMBlock(cfg, self.dtype, name=f"blocks_{index}")(x, state[index], mask, starts, branches)
            new_state.append(block_state)
        # transformers' out_norm: always applied, no bias, float32 reduction.
        x = RMSNorm(cfg.norm_eps, False, True, self.dtype, name="out_norm")(x)
        return x, tuple(new_state)


class XLSTMForCausalLM(nn.Module):
    """tokens [B, T] int32, state, mask [B, T] bool[, starts, branches [B, T] bool] -> (logits [B, T, V] float32, state)."""

    config: XLSTMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, state, mask, starts=None, branches=None):
        x, state = Backbone(self.config, self.dtype, name="backbone")(tokens, state, mask, starts, branches)
        logits = Linear(self.config.vocab_size, False, self.dtype, name="lm_head")(x).astype(jnp.float32)
        return soft_cap(logits, self.config.output_logit_soft_cap), state


def init_state(config: XLSTMConfig, batch_size: int) -> State:
    """The zero state of a fresh sequence (transformers' xLSTMCache), one (C, n, m) per block."""
    dtype = DTYPES[config.inference_state_dtype]
    heads, dqk, dv = config.num_heads, config.qk_head_dim, config.v_head_dim
    return tuple(
        (
            jnp.zeros((batch_size, heads, dv, dqk), dtype),
            jnp.zeros((batch_size, heads, dqk), dtype),
            jnp.zeros((batch_size, heads), dtype),
        )
        for _ in range(config.num_blocks)
    )


def resolve_dtype(dtype) -> Any:
    """The weights' dtype from its name ("float32" or "bfloat16"); a jnp dtype passes through."""
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16"):
            raise UserError(f"model dtype {dtype!r} is not supported; choose float32 or bfloat16")
        return DTYPES[dtype]
    return dtype


def init_params(config: XLSTMConfig, *, dtype="float32", seed: int = 0):
    """Random parameters of the right shapes (for tests; checkpoints come from ``models/hf.py``).
    Under ``jax.eval_shape`` this allocates nothing."""
    tokens, mask = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)
    module = XLSTMForCausalLM(config, resolve_dtype(dtype))
    return module.init(jax.random.key(seed), tokens, init_state(config, 1), mask)["params"]


def as_language_model(config: XLSTMConfig, params, *, dtype="float32") -> LanguageModel:
    """The model under the evaluator's contract. ``dtype`` is the dtype of the weights."""
    module = XLSTMForCausalLM(config, resolve_dtype(dtype))

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


# --- transformers names <-> our parameter tree -------------------------------------------------

_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.(.+)$")


def param_path(hf_name: str) -> tuple[str, ...]:
    """``backbone.blocks.3.ffn.proj_up.weight`` -> ("backbone", "blocks_3", "ffn", "proj_up", "weight").

    The embedding table is a bare parameter here, so ``backbone.embeddings.weight`` maps to
    ("backbone", "embeddings").
    """
    if hf_name == "backbone.embeddings.weight":
        return ("backbone", "embeddings")
    block = _BLOCK.match(hf_name)
    if block:
        return ("backbone", f"blocks_{block.group(1)}", *block.group(2).split("."))
    return tuple(hf_name.split("."))


def hf_name(path: tuple[str, ...]) -> str:
    """The inverse of ``param_path``."""
    if path == ("backbone", "embeddings"):
        return "backbone.embeddings.weight"
    if len(path) > 1 and path[1].startswith("blocks_"):
        return ".".join(("backbone", "blocks", path[1][len("blocks_"):], *path[2:]))
    return ".".join(path)


def hf_parameter_shapes(config: XLSTMConfig) -> dict[str, tuple[int, ...]]:
    """transformers' parameter name -> shape for this config, computed without allocating."""
    shapes = jax.eval_shape(lambda: init_params(config))
    return {
        hf_name(tuple(key.key for key in path)): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }


def count_params(config: XLSTMConfig) -> int:
    """The number of parameters transformers builds for this config."""
    return sum(math.prod(shape) for shape in hf_parameter_shapes(config).values())
