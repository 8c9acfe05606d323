"""transformers' xLSTM in Flax: the same weights give transformers' logits and greedy tokens.

The references come from tests/fixtures/hf_xlstm/make_fixture.py (run once with torch); these
tests need neither torch nor transformers.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import (
    XLSTM_LOGIT,
    XLSTM_LOGPROB,
    XLSTM_STATE_RTOL,
    check_packed_sequences,
    log_probs,
    run_in_chunks,
)

from mlflow_lmeval.errors import UserError
from mlflow_lmeval.models import hf, xlstm
from mlflow_lmeval.tokenizer import HFTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hf_xlstm"
MODES = ["single", "fused"]


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="module", params=MODES)
def checkpoint(request):
    return hf.load_hf_checkpoint(FIXTURES / request.param)


def with_form(checkpoint, form):
    config = dataclasses.replace(checkpoint.model_config, form=form)
    return xlstm.as_language_model(config, checkpoint.model.params)


@pytest.fixture(scope="module")
def fused():
    return hf.load_hf_checkpoint(FIXTURES / "fused")


@pytest.fixture(scope="module")
def long_tokens():
    return np.asarray(jax.random.randint(jax.random.key(3), (2, 150), 0, 320))


# Another implementation: transformers computed these logits with its chunkwise kernel, in float32
# in its own order, so each logit is within XLSTM_LOGIT (conftest: the float32 rounding of the
# fixture's path of reductions at |logits| <= 6.4) of ours, in either form. Against a float64 run
# of ours, float32 loses at most 2.7e-5 (chunkwise) and 1.2e-4 (recurrent: it contracts the state
# C with q after summing outer products, which cancels more), transformers' 1.8e-5.
@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_logits_equal_transformers(checkpoint, reference, form):
    mode = checkpoint.config["weight_mode"]
    model = with_form(checkpoint, form)
    sequences = [reference[f"{mode}/tokens_{index}"] for index in range(3)]
    # One right-padded batch: padded positions are masked, so they touch no real position.
    tokens = np.zeros((3, max(map(len, sequences))), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)], mask[row, : len(sequence)] = sequence, True
    logits, _ = run_in_chunks(model, model.params, tokens, tokens.shape[1], mask)
    for row, sequence in enumerate(sequences):
        expected = reference[f"{mode}/logits_{row}"]
        np.testing.assert_allclose(logits[row, : len(sequence)], expected, rtol=0, atol=XLSTM_LOGIT)


def test_greedy_generation_equals_transformers(checkpoint, reference):
    """Prompt in one pass, then one token at a time with the state carried, as generate() does."""
    mode = checkpoint.config["weight_mode"]
    model = checkpoint.model
    apply = jax.jit(model.apply)
    prompt = reference[f"{mode}/prompt"][None]
    logits, state = apply(model.params, prompt, model.init_state(1), np.ones(prompt.shape, bool))
    generated = []
    for _ in range(len(reference[f"{mode}/generated"])):
        token = np.asarray(logits[:, -1].argmax(-1), np.int32)[:, None]
        generated.append(int(token[0, 0]))
        logits, state = apply(model.params, token, state, np.ones((1, 1), bool))
    assert generated == reference[f"{mode}/generated"].tolist()


# The chunk and mask properties do not depend on the weight mode: they are checked on the fused
# checkpoint, which also has every bias.
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunks_match_full_pass(fused, long_tokens, chunk_size):
    model = fused.model
    full, _ = run_in_chunks(model, model.params, long_tokens, long_tokens.shape[1])
    chunked, _ = run_in_chunks(model, model.params, long_tokens, chunk_size)
    # Our two paths, another order (other chunk and segment boundaries): within the fixture's bound.
    np.testing.assert_allclose(log_probs(chunked), log_probs(full), rtol=0, atol=XLSTM_LOGPROB)


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_masked_chunk_leaves_state_bit_identical(fused, long_tokens, form):
    model = with_form(fused, form)
    _, state = run_in_chunks(model, model.params, long_tokens[:, :40], 40)
    _, after = jax.jit(model.apply)(model.params, long_tokens[:, 40:75], state, np.zeros((2, 35), bool))
    # Exact: a masked position selects the state it came with, no arithmetic touches it.
    for before_leaf, after_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(before_leaf), np.asarray(after_leaf))


def test_masked_positions_act_as_removed(fused, long_tokens):
    """A hole in row 0 and right padding in row 1 give what dropping those tokens gives."""
    model = fused.model
    mask = np.ones((2, 60), bool)
    mask[0, 20:30] = False
    mask[1, 50:] = False
    masked_logits, masked_state = run_in_chunks(model, model.params, long_tokens[:, :60], 10, mask)
    for row in range(2):
        kept = long_tokens[row : row + 1, :60][:, mask[row]]
        logits, state = run_in_chunks(model, model.params, kept, 10)
        # Our two paths, another order (the kept tokens fall into other chunks): the fixture's bounds.
        np.testing.assert_allclose(log_probs(masked_logits[row][mask[row]]), log_probs(logits[0]), rtol=0, atol=XLSTM_LOGPROB)
        for masked_leaf, leaf in zip(jax.tree.leaves(masked_state), jax.tree.leaves(state), strict=True):
            leaf = np.asarray(leaf)[0]
            np.testing.assert_allclose(np.asarray(masked_leaf)[row], leaf, rtol=0, atol=XLSTM_STATE_RTOL * np.abs(leaf).max())


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_packed_sequences_equal_each_run_alone(fused, long_tokens, form):
    check_packed_sequences(with_form(fused, form), long_tokens, chunk_size=29, logprob_atol=XLSTM_LOGPROB, state_rtol=XLSTM_STATE_RTOL)


def test_bfloat16_weights_keep_the_state_dtype(reference):
    checkpoint = hf.load_hf_checkpoint(FIXTURES / "single", dtype="bfloat16")
    model = checkpoint.model
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {np.dtype("bfloat16")}
    tokens = reference["single/tokens_2"][None]
    logits, state = run_in_chunks(model, model.params, tokens, 64)
    assert {leaf.dtype for leaf in jax.tree.leaves(state)} == {np.dtype("float32")}
    assert logits.dtype == np.float32
    # bfloat16 matmuls: same predictions, logits within bfloat16 precision: 8 significant bits (2^-9
    # relative per rounding), about a dozen roundings in sequence on a logit's path (each projection's
    # input, the residual sums, the head), at |logits| <= 6.4: 12·2^-9·6.4 = 0.15, and 0.25 leaves room
    # for what the norms and gates amplify. A weight read wrongly moves logits by units.
    expected = reference["single/logits_2"]
    assert np.abs(logits[0] - expected).max() < 0.25
    assert (logits[0].argmax(-1) == expected.argmax(-1)).mean() > 0.9


def test_7b_parameter_shapes_equal_transformers():
    """NX-AI's xLSTM-7b config: the shapes transformers builds on the meta device, without allocating."""
    recorded = json.loads((FIXTURES / "xlstm_7b" / "parameters.json").read_text())
    config = xlstm.XLSTMConfig.from_hf(json.loads((FIXTURES / "xlstm_7b" / "config.json").read_text()))
    shapes = xlstm.hf_parameter_shapes(config)
    assert shapes == {name: tuple(shape) for name, shape in recorded["shapes"].items()}
    assert xlstm.count_params(config) == recorded["count"] == 6_865_424_896
    assert (config.qk_head_dim, config.v_head_dim, config.ffn_dim) == (256, 512, 10944)


def test_loader_identity(tmp_path):
    directory = tmp_path / "checkpoint-1200"
    shutil.copytree(FIXTURES / "single", directory)
    loaded = hf.load_hf_checkpoint(directory)
    assert hf.is_hf_checkpoint(directory) and not hf.is_hf_checkpoint(tmp_path)
    assert loaded.step == 1200 and hf.load_hf_checkpoint(FIXTURES / "single").step == 0
    assert loaded.fingerprint == hf.load_hf_checkpoint(FIXTURES / "single").fingerprint
    assert loaded.fingerprint.startswith("sha256:") and loaded.config["model_type"] == "xlstm"
    assert loaded.model.has_state and loaded.model.vocab_size == 320


def test_sharded_checkpoint_loads_like_one_file(tmp_path, reference):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(FIXTURES / "single" / "model.safetensors", framework="numpy") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        save_file({name: tensors[name] for name in members}, tmp_path / file)
    weight_map = {name: file for file, members in shards.items() for name in members}
    (tmp_path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "single" / name, tmp_path / name)

    model = hf.load_hf_checkpoint(tmp_path).model
    one_file = hf.load_hf_checkpoint(FIXTURES / "single").model
    # The same weights, then the same jitted program on the same inputs: bit-identical on any CPU
    # (test_logits_equal_transformers compares those logits with transformers').
    for sharded_leaf, leaf in zip(jax.tree.leaves(model.params), jax.tree.leaves(one_file.params), strict=True):
        assert sharded_leaf.dtype == leaf.dtype
        np.testing.assert_array_equal(np.asarray(sharded_leaf), np.asarray(leaf))
    tokens = reference["single/tokens_1"][None]
    logits, _ = run_in_chunks(model, model.params, tokens, tokens.shape[1])
    np.testing.assert_array_equal(logits, run_in_chunks(one_file, one_file.params, tokens, tokens.shape[1])[0])

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="missing weight shards named in model.safetensors.index.json: model-00002"):
        hf.load_hf_checkpoint(tmp_path)


def edited_checkpoint(tmp_path, **changes):
    directory = tmp_path / "edited"
    shutil.copytree(FIXTURES / "single", directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported; supported: xlstm"),
        ({"hidden_size": 128, "embedding_dim": 128}, r"model.safetensors: weight backbone\.\S+ has shape \(.+\), config.json implies \(.+\)"),
        ({"weight_mode": "tripled"}, "weight_mode='tripled' is not supported"),
        ({"inference_state_dtype": "float64"}, "inference_state_dtype='float64' is not supported"),
        ({"add_out_norm": False}, "add_out_norm=false is not supported"),
        ({"num_heads": 3}, "qk_dim_factor gives dim 64, not a positive multiple of num_heads 3"),
        ({"hidden_size": 32}, "hidden_size=32 and embedding_dim=64 disagree"),
    ],
)
def test_loader_errors_are_one_line(tmp_path, changes, message):
    with pytest.raises(UserError, match=message) as error:
        hf.load_hf_checkpoint(edited_checkpoint(tmp_path, **changes))
    assert "\n" not in str(error.value)


def test_loader_says_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        hf.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlstm"}))
    with pytest.raises(UserError, match="has no model.safetensors or model.safetensors.index.json"):
        hf.load_hf_checkpoint(tmp_path)
    directory = edited_checkpoint(tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        hf.load_hf_checkpoint(directory)
    with pytest.raises(UserError, match="model dtype 'float64' is not supported"):
        hf.load_hf_checkpoint(FIXTURES / "single", dtype="float64")


def test_hf_tokenizer_adds_no_special_tokens(reference):
    tokenizer = HFTokenizer.load(FIXTURES / "single")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (0, 0, 1, 320)
    ids = tokenizer.encode("The quick brown fox")
    assert ids == reference["single/tokens_0"].tolist()  # what transformers encoded, specials off
    assert tokenizer.bos_id not in ids
    assert tokenizer.decode([tokenizer.bos_id, *ids]) == "The quick brown fox"
    assert tokenizer.name.startswith("hf-tokenizers:") and len(tokenizer.name) == len("hf-tokenizers:") + 16
    assert tokenizer.name == HFTokenizer.load(FIXTURES / "fused").name


def test_hf_tokenizer_without_config_has_no_specials(tmp_path):
    shutil.copy(FIXTURES / "single" / "tokenizer.json", tmp_path / "tokenizer.json")
    tokenizer = HFTokenizer.load(tmp_path)
    assert tokenizer.bos_id is None and tokenizer.eos_id is None
    assert tokenizer.encode("fox") == HFTokenizer.load(FIXTURES / "single").encode("fox")
