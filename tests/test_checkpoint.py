"""Checkpoints are self-contained, restore bit-identically, and reject damage clearly."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from mlflow_lmeval import UserError, load
from mlflow_lmeval.models import mlstm
from mlflow_lmeval.models.checkpoint import save_checkpoint
from mlflow_lmeval.tokenizer import Tokenizer


@pytest.fixture
def checkpoint(tmp_path, tokenizer, tiny_config):
    params = mlstm.init_params(tiny_config, seed=4)
    path = save_checkpoint(tmp_path, step=7, config=tiny_config, params=params, tokenizer=tokenizer, mlflow_run_id="abc123")
    return path, params


def test_save_then_load_gives_bit_identical_logits(checkpoint, tiny_config):
    path, params = checkpoint
    loaded = load(path)
    assert loaded.step == 7 and loaded.mlflow_run_id == "abc123" and loaded.config == tiny_config
    assert loaded.fingerprint.startswith("sha256:")
    tokens = np.arange(60, dtype=np.int32).reshape(2, 30) % tiny_config.vocab_size
    before_saving = dataclasses.replace(loaded, params=params)
    # The same jitted program on the same inputs, with the weights restored bit for bit: exact.
    np.testing.assert_array_equal(loaded.logits(tokens), before_saving.logits(tokens))
    for saved, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        assert saved.dtype == restored.dtype and np.array_equal(np.asarray(saved), np.asarray(restored))


def test_checkpoint_carries_its_tokenizer(checkpoint, tokenizer):
    path, _ = checkpoint
    loaded = load(path)
    assert loaded.tokenizer.model_bytes == tokenizer.model_bytes
    text = "def f(x):\n    return x"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    metadata = json.loads((path / "metadata.json").read_text())
    assert metadata["model"]["config"]["vocab_size"] == tokenizer.vocab_size


def test_same_content_same_fingerprint(tmp_path, checkpoint, tokenizer, tiny_config):
    path, params = checkpoint
    again = save_checkpoint(tmp_path / "again", step=7, config=tiny_config, params=params, tokenizer=tokenizer)
    other = save_checkpoint(tmp_path / "other", step=7, config=tiny_config, params=mlstm.init_params(tiny_config, 5), tokenizer=tokenizer)
    assert load(again).fingerprint == load(path).fingerprint != load(other).fingerprint


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load(tmp_path / "nope")


def test_directory_without_metadata(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint"):
        load(tmp_path)


def test_corrupt_metadata(checkpoint):
    path, _ = checkpoint
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt checkpoint metadata"):
        load(path)


def test_damaged_parameters(checkpoint):
    path, _ = checkpoint
    shutil.rmtree(path / "params")
    (path / "params").mkdir()
    with pytest.raises(UserError, match="corrupt checkpoint parameters"):
        load(path)


def test_tampered_parameters_fail_the_fingerprint(checkpoint):
    path, _ = checkpoint
    metadata = json.loads((path / "metadata.json").read_text())
    metadata["fingerprint"] = "sha256:" + "0" * 64
    (path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(UserError, match="do not match the recorded fingerprint"):
        load(path)


def test_tokenizer_larger_than_model(tmp_path, tokenizer, tiny_config):
    small = dataclasses.replace(tiny_config, vocab_size=tokenizer.vocab_size - 10)
    path = save_checkpoint(tmp_path, step=1, config=small, params=mlstm.init_params(small), tokenizer=tokenizer)
    with pytest.raises(UserError, match=r"tokenizer vocabulary \(512\) is larger than the model's \(502\)"):
        load(path)


def test_tokenizer_is_deterministic_and_roundtrips(corpus_path, tokenizer, tmp_path):
    from mlflow_lmeval.tokenizer import train_tokenizer

    again = train_tokenizer(corpus_path, 512, tmp_path / "again.model")
    assert again.model_bytes == tokenizer.model_bytes
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 512
    text = "Ünïcode  and\ttabs\n\n  😀 survive"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert Tokenizer.load(tmp_path / "again.model").encode(text) == tokenizer.encode(text)
