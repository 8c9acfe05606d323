"""Linen (mutable ``cache`` collection) and NNX models reach the model contract through adapters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import log_probs, logprob_bound, rounding_bound, run_in_chunks
from flax import nnx

from mlflow_lmeval import from_linen_cache, from_nnx

VOCAB, DIM, LENGTH = 50, 16, 40
# A logit's path of reductions: the drive's projection (DIM), the recurrence (one rounding per step,
# at most LENGTH steps) and the output projection (DIM); the logits are below 0.6 (measured, both
# adapters), so chunked and full passes agree within LOGPROB on each log-probability (1.6e-5).
LOGPROB = logprob_bound(rounding_bound(DIM + LENGTH + DIM, 0.6), VOCAB)


def gated_rnn_step(decay, drive, state, keep):
    new = decay * state + (1.0 - decay) * jnp.tanh(drive)
    return jnp.where(keep[:, None], new, state)


class LinenRNN(nn.Module):
    """A small gated linear RNN that keeps its hidden state in the ``cache`` collection."""

    @nn.compact
    def __call__(self, tokens, mask):
        drive = nn.Dense(DIM)(nn.Embed(VOCAB, DIM)(tokens))
        decay = nn.sigmoid(self.param("decay", nn.initializers.normal(1.0), (DIM,)))
        hidden = self.variable("cache", "hidden", jnp.zeros, (tokens.shape[0], DIM))
        state, outputs = hidden.value, []
        for t in range(tokens.shape[1]):
            state = gated_rnn_step(decay, drive[:, t], state, mask[:, t])
            outputs.append(state)
        hidden.value = state
        return nn.Dense(VOCAB)(jnp.stack(outputs, 1))


class LinenBagOfWords(nn.Module):
    """No cache collection: a stateless model."""

    @nn.compact
    def __call__(self, tokens, mask):
        return nn.Dense(VOCAB)(nn.Embed(VOCAB, DIM)(tokens))


class NNXRNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.drive = nnx.Linear(DIM, DIM, rngs=rngs)
        self.decay = nnx.Param(jax.random.normal(rngs.params(), (DIM,)))
        self.out = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def init_state(self, batch_size):
        return jnp.zeros((batch_size, DIM))

    def __call__(self, tokens, state, mask):
        drive = self.drive(self.embed(tokens))
        decay = jax.nn.sigmoid(self.decay[...])
        outputs = []
        for t in range(tokens.shape[1]):
            state = gated_rnn_step(decay, drive[:, t], state, mask[:, t])
            outputs.append(state)
        return self.out(jnp.stack(outputs, 1)), state


def linen_model():
    module = LinenRNN()
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = module.init(jax.random.key(0), tokens, mask=jnp.ones((1, 1), bool))["params"]
    return from_linen_cache(module, params, vocab_size=VOCAB)


def nnx_model():
    return from_nnx(NNXRNN(nnx.Rngs(0)), vocab_size=VOCAB)


@pytest.fixture(params=["linen", "nnx"])
def model(request):
    return {"linen": linen_model, "nnx": nnx_model}[request.param]()


@pytest.fixture
def tokens():
    return np.asarray(jax.random.randint(jax.random.key(3), (2, LENGTH), 0, VOCAB))


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunks_match_full_pass(model, tokens, chunk_size):
    assert model.has_state
    full, _ = run_in_chunks(model, model.params, tokens, LENGTH)
    chunked, _ = run_in_chunks(model, model.params, tokens, chunk_size)
    # Our two paths, another order (XLA compiles each chunk length on its own): within LOGPROB.
    np.testing.assert_allclose(log_probs(chunked), log_probs(full), rtol=0, atol=LOGPROB)


def test_masked_positions_leave_state_unchanged(model, tokens):
    _, state = run_in_chunks(model, model.params, tokens[:, :10], 10)
    _, after = model.apply(model.params, tokens[:, 10:20], state, np.zeros((2, 10), bool))
    # Exact: a masked step selects the state it came with (gated_rnn_step's jnp.where).
    for before_leaf, after_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(before_leaf), np.asarray(after_leaf))


def test_fresh_state_is_the_modules_initial_cache(model):
    for leaf in jax.tree.leaves(model.init_state(3)):
        assert leaf.shape[0] == 3
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_linen_module_without_cache_is_stateless():
    module = LinenBagOfWords()
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = module.init(jax.random.key(0), tokens, mask=jnp.ones((1, 4), bool))["params"]
    model = from_linen_cache(module, params, vocab_size=VOCAB, context_length=16)
    assert not model.has_state and model.init_state(2) is None
    logits, state = model.apply(params, tokens, None, jnp.ones((1, 4), bool))
    assert logits.shape == (1, 4, VOCAB) and state is None
