"""The reference mLSTM: chunked recurrent evaluation equals one full pass; masks leave state alone."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import MLSTM_LOGPROB, MLSTM_STATE_RTOL, check_packed_sequences, log_probs, run_in_chunks

from mlflow_lmeval import load
from mlflow_lmeval.models import mlstm

LENGTH = 709


def length_for(chunk_size):
    """More than 10 chunks, and never shorter than 100 tokens."""
    return max(100, 11 * chunk_size + 5)


@pytest.fixture(scope="module", params=["random", "trained"])
def weights(request, tiny_config, trained_checkpoints):
    if request.param == "random":
        return tiny_config, mlstm.init_params(tiny_config, seed=1)
    checkpoint = load(trained_checkpoints[0][-1])
    return checkpoint.config, checkpoint.params


@pytest.fixture(scope="module")
def tokens(tiny_config):
    return np.asarray(jax.random.randint(jax.random.key(7), (2, LENGTH), 0, tiny_config.vocab_size))


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunks_match_full_pass(weights, tokens, form, chunk_size):
    config, params = weights
    tokens = tokens[:, : length_for(chunk_size)]
    full, _ = run_in_chunks(mlstm.as_language_model(config, params), params, tokens, tokens.shape[1])
    model = mlstm.as_language_model(dataclasses.replace(config, form=form), params)
    chunked, _ = run_in_chunks(model, params, tokens, chunk_size)
    # Our two paths, another order (other chunks, and the recurrent form's token-by-token sums):
    # each log-probability within the tiny mLSTM's float32 bound (conftest.MLSTM_LOGPROB).
    np.testing.assert_allclose(log_probs(chunked), log_probs(full), rtol=0, atol=MLSTM_LOGPROB)


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_fully_masked_chunk_leaves_state_exactly_unchanged(weights, tokens, form):
    config, params = weights
    model = mlstm.as_language_model(dataclasses.replace(config, form=form), params)
    _, state = run_in_chunks(model, params, tokens[:, :50], 50)
    _, after = model.apply(params, tokens[:, 50:90], state, np.zeros((2, 40), bool))
    # Exact: a masked position selects the state it came with (jnp.where), no arithmetic touches it.
    for before_leaf, after_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(before_leaf), np.asarray(after_leaf))


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_masked_positions_are_skipped(weights, tokens, form):
    """Masking positions anywhere gives the same state and logits as removing those tokens."""
    config, params = weights
    model = mlstm.as_language_model(dataclasses.replace(config, form=form), params)
    mask = np.ones((2, 120), bool)
    mask[0, 30:45] = False  # a hole inside row 0
    mask[1, 100:] = False  # right padding on row 1
    masked_logits, masked_state = run_in_chunks(model, params, tokens[:, :120], 7, mask)
    for row in range(2):
        kept = tokens[row : row + 1, :120][:, mask[row]]
        logits, state = run_in_chunks(model, params, kept, 7)
        # Our two paths, another order (the kept tokens fall into other chunks): the tiny mLSTM's bounds.
        np.testing.assert_allclose(log_probs(masked_logits[row][mask[row]]), log_probs(logits[0]), rtol=0, atol=MLSTM_LOGPROB)
        for masked_leaf, leaf in zip(jax.tree.leaves(masked_state), jax.tree.leaves(state)):
            leaf = np.asarray(leaf)[0]
            np.testing.assert_allclose(np.asarray(masked_leaf)[row], leaf, rtol=0, atol=MLSTM_STATE_RTOL * np.abs(leaf).max())


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_packed_sequences_equal_each_run_alone(weights, tokens, form):
    """What lets the engine pack requests end to end in a row, and continuations after their context."""
    config, params = weights
    model = mlstm.as_language_model(dataclasses.replace(config, form=form, segment_length=16), params)
    check_packed_sequences(model, tokens, chunk_size=7 if form == "recurrent" else 37,
                           logprob_atol=MLSTM_LOGPROB, state_rtol=MLSTM_STATE_RTOL)


def test_presets(tokenizer):
    tiny = mlstm.preset_config("tiny", 1024)
    small = mlstm.preset_config("small", 8192)
    assert mlstm.count_params(jax.eval_shape(lambda: mlstm.init_params(tiny))) < 500_000
    assert 8_000_000 < mlstm.count_params(jax.eval_shape(lambda: mlstm.init_params(small))) < 14_000_000
    with pytest.raises(Exception, match="unknown model preset 'huge'"):
        mlstm.preset_config("huge", 1024)
