"""Random-weight xLSTMs for the GPU check (``benchmarks/gpu.py``): one set of weights for our Flax
port and, where torch is importable, transformers' ``xLSTMForCausalLM``, and what the check
measures of the torch model. The weights reach our model through the loader's own name mapping.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mlflow_lmeval.models import xlstm

try:  # optional: without them the torch comparison is reported as not measured
    import torch
    import transformers

    TORCH_MISSING = None
except ImportError as missing:
    torch = transformers = None
    TORCH_MISSING = f"torch/transformers not importable here ({missing})"


def _hashed_uniform(shape: tuple[int, ...], salt: int):
    """Uniform in [-1, 1) from an integer hash of each position: random enough for speed and for
    the equality checks, and quick to compile (jax.random's threefry for every weight of a tiny
    two-block model took 11 s to compile on this machine's CPU)."""
    x = jax.lax.iota(jnp.uint32, int(np.prod(shape))) * jnp.uint32(0x9E3779B1) + jnp.uint32(salt * 0x85EBCA77 & 0xFFFFFFFF)
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = (x ^ (x >> shift)) * jnp.uint32(multiplier)
    return ((x ^ (x >> 16)) >> 8).astype(jnp.float32).reshape(shape) * 2.0**-23 - 1.0


def _random_leaf(name: str, shape: tuple[int, ...], salt: int, std: float):
    """transformers' init in spirit: gate biases that keep a long memory (input -10, forget
    3..6), norm weights 1, other biases 0, matrices random with standard deviation ``std``."""
    forget = jnp.linspace(3.0, 6.0, shape[0] // 2 if "ifgate" in name else shape[0])
    gates = {"ifgate_preact.bias": jnp.concatenate([jnp.full_like(forget, -10.0), forget]),
             "igate_preact.bias": jnp.full(shape, -10.0), "fgate_preact.bias": forget}
    for suffix, value in gates.items():
        if name.endswith(suffix):
            return value
    if len(shape) == 1:
        return (jnp.ones if name.endswith(".weight") else jnp.zeros)(shape)
    return std * 3**0.5 * _hashed_uniform(shape, salt)


def random_named_weights(shapes: dict, hidden_size: int) -> dict:
    """transformers' parameter names -> random bf16 arrays of these shapes, made on the device by
    one jitted program; matrices take transformers' small-init deviation sqrt(2 / (5 hidden))."""
    std = (2 / (5 * hidden_size)) ** 0.5

    @jax.jit
    def make():
        return {name: _random_leaf(name, shape, index + 1, std).astype(jnp.bfloat16)
                for index, (name, shape) in enumerate(sorted(shapes.items()))}

    return make()


def torch_named_weights(model) -> dict:
    """A torch model's state dict as jax arrays (bf16 travels as its bits: numpy has no bf16)."""
    named = {}
    for name, tensor in model.state_dict().items():
        host = tensor.detach().to("cpu")
        named[name] = jnp.asarray(host.view(torch.int16).numpy().view(jnp.bfloat16) if host.dtype == torch.bfloat16
                                  else host.numpy())
    return named


def params_from_hf_names(named: dict, expected: dict) -> dict:
    """Our parameter tree, placed by the loader's own name mapping (``xlstm.param_path``) and
    checked against the shapes it expects (``xlstm.hf_parameter_shapes``)."""
    if set(named) != set(expected):
        raise ValueError(f"weight names differ from the config's: {sorted(set(named) ^ set(expected))[:5]}")
    params: dict = {}
    for name, value in named.items():
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{name}: shape {tuple(value.shape)}, the config implies {expected[name]}")
        *parents, leaf = xlstm.param_path(name)
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return params


def build_models(hf_config: dict, dtype: str, with_torch: bool):
    """Our model, transformers' with the same weights (or None) and its device, and a description."""
    torch_model, device = None, None
    if with_torch and torch is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_config = transformers.xLSTMConfig(**hf_config)
        with torch.device(device):
            torch_model = transformers.xLSTMForCausalLM(torch_config).to(torch.bfloat16).eval()
        hf_config = torch_config.to_dict()  # both sides read the very same config
    config = xlstm.XLSTMConfig.from_hf(hf_config)
    shapes = xlstm.hf_parameter_shapes(config)
    named = random_named_weights(shapes, config.hidden_size) if torch_model is None else torch_named_weights(torch_model)
    model = xlstm.as_language_model(config, params_from_hf_names(named, shapes), dtype=dtype)
    num_params = sum(int(np.prod(shape)) for shape in shapes.values())
    fields = ("vocab_size", "hidden_size", "num_blocks", "num_heads", "qk_dim_factor", "v_dim_factor", "weight_mode")
    described = {
        "hf_config": {key: hf_config[key] for key in fields if key in hf_config}, "dtype": dtype, "num_params": num_params,
        "non_embedding_params": num_params - 2 * config.vocab_size * config.hidden_size,
        "weights": "hashed uniform, made on the device" if torch_model is None else f"transformers' init on {device}"}
    return model, torch_model, device, described


def torch_logliks(model, requests: list, device: str) -> np.ndarray:
    """transformers' log-likelihood of each request's continuation: one full pass each."""
    values = []
    with torch.inference_mode():
        for context, continuation in requests:
            ids = torch.tensor([list(context) + list(continuation)], device=device)
            log_probs = torch.log_softmax(model(input_ids=ids[:, :-1], use_cache=False).logits.float(), -1)
            values.append(float(log_probs.gather(-1, ids[:, 1:, None])[0, -len(continuation):].double().sum()))
    return np.array(values)


def torch_forward_rate(model, stream: np.ndarray, rows: int, length: int, device: str, budget_s: float) -> dict:
    """transformers' forward over the stream as [rows, length] calls: one to warm up, then as many
    as the first call's time says fit the budget."""
    calls = max(2, len(stream) // (rows * length))
    data = torch.tensor(np.resize(stream, calls * rows * length).reshape(calls, rows, length), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for index in range(calls):
            start = time.perf_counter()
            model(input_ids=data[index], use_cache=False)
            sync()
            times.append(time.perf_counter() - start)
            if sum(times[1:]) + times[-1] > budget_s and len(times) > 1:
                break
    return {"torch_forward_tokens_per_s": (len(times) - 1) * rows * length / sum(times[1:]), "torch_warmup_s": times[0],
            "torch_tokens_timed": (len(times) - 1) * rows * length, "torch_rows": rows, "torch_length": length}
