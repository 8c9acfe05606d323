"""A Hugging Face save_pretrained directory goes wherever a checkpoint goes: load, evaluate, LoggedModels."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import XLSTM_LOGIT
from test_bad_inputs import write_task

import mlflow_lmeval
from mlflow_lmeval.errors import UserError
from mlflow_lmeval.models import hf
from mlflow_lmeval.tracking import checkpoint_info, ensure_checkpoint_model

SINGLE = Path(__file__).parent / "fixtures" / "hf_xlstm" / "single"


@pytest.fixture(scope="module")
def loaded():
    return mlflow_lmeval.load(SINGLE)


@pytest.fixture
def step_dir(tmp_path):
    """The fixture under a transformers-style name, which gives the step."""
    return Path(shutil.copytree(SINGLE, tmp_path / "checkpoint-5"))


def test_load_detects_the_format_and_gives_the_same_logits(loaded):
    direct = hf.load_hf_checkpoint(SINGLE)
    assert isinstance(loaded, hf.HFCheckpoint) and loaded.fingerprint == direct.fingerprint
    assert loaded.step == 0 and loaded.mlflow_run_id is None and loaded.hf_config["model_type"] == "xlstm"
    tokens = np.asarray([loaded.tokenizer.encode("hello world, hello xLSTM")] * 2, np.int32)
    logits = loaded.logits(tokens)
    assert logits.shape == (*tokens.shape, direct.model.vocab_size) and logits.dtype == np.float32
    # The same weights through the same jitted program (padded to 64 positions) on the same inputs:
    # bit-identical on any CPU.
    np.testing.assert_array_equal(logits, direct.logits(tokens))
    # An eager call on the unpadded tokens is our other path, in another order (other segment
    # boundaries, other vector code): within the fixture's float32 bound on each logit.
    model = direct.model
    expected, _ = model.apply(model.params, tokens, model.init_state(2), np.ones(tokens.shape, bool))
    np.testing.assert_allclose(logits, np.asarray(expected), rtol=0, atol=XLSTM_LOGIT)


def test_a_directory_of_neither_kind_says_what_is_missing(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    message = f"not a checkpoint: {tmp_path} has neither metadata.json (mlflow_lmeval) nor config.json (Hugging Face)"
    for attempt in (mlflow_lmeval.load, checkpoint_info):
        with pytest.raises(UserError) as error:
            attempt(tmp_path)
        assert str(error.value) == message


def test_logged_model_of_a_hf_directory_has_its_step_fingerprint_and_config(step_dir, loaded, tmp_path):
    info = checkpoint_info(step_dir)
    assert info["step"] == 5 and info["fingerprint"] == loaded.fingerprint and info["mlflow_run_id"] is None
    assert info["hf_config"] == loaded.hf_config
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = MlflowClient(uri).get_logged_model(ensure_checkpoint_model(step_dir, tracking_uri=uri, experiment="hf"))
    assert model.name == "checkpoint-step-5" and model.params["fingerprint"] == loaded.fingerprint
    assert model.params["hf_config.model_type"] == "xlstm"
    assert model.params["hf_config.num_blocks"] == str(loaded.hf_config["num_blocks"])


def test_cli_evaluates_a_hf_directory(loaded, tmp_path):
    write_task(tmp_path / "tasks", "tiny", b"".join(
        json.dumps({"text": text}).encode() + b"\n" for text in ("hello world", "the cat sat", "a b c d")))
    command = [sys.executable, "-m", "mlflow_lmeval.cli", "evaluate", "--checkpoint", str(SINGLE), "--tasks", "tiny",
               "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"), "--no_tracking",
               "--bootstrap_iters", "0", "--limit", "3", "--step", "12"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["checkpoint"]["fingerprint"] == loaded.fingerprint and results["checkpoint"]["step"] == 12
    assert results["checkpoint"]["hf_config"] == loaded.hf_config
    assert results["n-samples"]["tiny"]["effective"] == 3 and "acc,none" in results["results"]["tiny"]


def test_bfloat16_weights_are_a_keyed_setting_close_to_float32(tmp_path):
    """--dtype bfloat16 evaluates the same weights in bfloat16: close to float32, not equal, and the
    response cache keeps the two apart (a cache blind to dtype would hand back float32's numbers)."""
    write_task(tmp_path / "tasks", "tiny", b"".join(
        json.dumps({"text": text}).encode() + b"\n" for text in ("hello world", "the cat sat", "a b c d")))
    base = {"evaluation_tasks": ["tiny"], "include_path": str(tmp_path / "tasks"), "bootstrap_iters": 0,
            "response_cache_path": str(tmp_path / "responses.sqlite")}

    def perplexity(dtype):
        results = mlflow_lmeval.evaluate(SINGLE, {**base, "dtype": dtype, "output_path": str(tmp_path / dtype)})
        assert results["eval_config"]["dtype"] == dtype
        return results["results"]["tiny"]["token_perplexity,none"]

    full, half = perplexity("float32"), perplexity("bfloat16")
    # bfloat16 keeps 8 significant bits (2^-9 = 2e-3 relative per rounding) and a logit passes about
    # a dozen such roundings in sequence (each projection's input, the residual sums, the head), so
    # each log-probability moves by up to a few hundredths: the perplexity, exp of minus their mean,
    # by a few percent. Lost weights or a float32 run under the bfloat16 name give 0 or far more.
    assert half != full and abs(half - full) / full < 0.05, (full, half)
