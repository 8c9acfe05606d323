"""Training lowers the loss on real text; the CLI answers bad input with one line and exit code 2."""

import subprocess
import sys

import pytest

from mlflow_lmeval.cli import main


def test_training_lowers_the_loss(trained_checkpoints):
    paths, losses = trained_checkpoints
    assert [p.name for p in paths] == ["step_20", "step_60"]
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 1.0, losses


def test_cli_trains_and_writes_checkpoints(tmp_path, corpus_path, capsys):
    tok = tmp_path / "tok.model"
    assert main(["tokenizer", "--input", str(corpus_path), "--vocab_size", "400", "--output", str(tok)]) == 0
    assert main([
        "train", "--corpus", str(corpus_path), "--tokenizer", str(tok), "--output", str(tmp_path / "ck"),
        "--steps", "4", "--save_every", "2", "--batch_size", "2", "--sequence_length", "16",
    ]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "loss" in out
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_2", "step_4"]


def run_cli(*args):
    result = subprocess.run([sys.executable, "-m", "mlflow_lmeval.cli", *args], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr.strip()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, c, t: ["train", "--corpus", str(c), "--tokenizer", str(t), "--output", str(d), "--steps", "2", "--save_every", "1", "--model_size", "huge"], "unknown model preset 'huge'"),
        (lambda d, c, t: ["train", "--corpus", str(d / "empty.txt"), "--tokenizer", str(t), "--output", str(d), "--steps", "2", "--save_every", "1"], "corpus is empty"),
        (lambda d, c, t: ["tokenizer", "--input", str(d / "empty.txt"), "--output", str(d / "x.model")], "corpus is empty"),
        (lambda d, c, t: ["train", "--corpus", str(c), "--tokenizer", str(d / "missing.model"), "--output", str(d), "--steps", "2", "--save_every", "1"], "tokenizer not found"),
        (lambda d, c, t: ["train", "--corpus", str(c), "--tokenizer", str(t), "--output", str(d), "--steps", "0", "--save_every", "1"], "must be a positive integer"),
    ],
    ids=["unknown-preset", "empty-corpus-train", "empty-corpus-tokenizer", "missing-tokenizer", "zero-steps"],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, corpus_path, tokenizer, make_args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    tok = tmp_path / "tok.model"
    tok.write_bytes(tokenizer.model_bytes)
    code, err = run_cli(*make_args(tmp_path, corpus_path, tok))
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err


def test_train_cli_logs_a_run_with_live_evaluations(tmp_path, corpus_path, tokenizer, local_tasks):
    from mlflow import MlflowClient

    directory, names = local_tasks
    tok = tmp_path / "tok.model"
    tok.write_bytes(tokenizer.model_bytes)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, err = run_cli("train", "--corpus", str(corpus_path), "--tokenizer", str(tok), "--output", str(tmp_path / "ck"),
                        "--steps", "4", "--save_every", "4", "--batch_size", "2", "--sequence_length", "16",
                        "--eval_every", "2", "--eval_tasks", names[1], "--include_path", str(directory), "--eval_limit", "3",
                        "--tracking_uri", store)
    assert code == 0, err
    client = MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "4"
    history = client.get_metric_history(run.info.run_id, f"lmeval_live/{names[1]}/acc")  # live evaluations
    assert sorted(m.step for m in history) == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [4]
    import json

    assert json.loads((tmp_path / "ck/step_4/metadata.json").read_text())["mlflow_run_id"] == run.info.run_id


def test_tokens_per_s_leaves_out_time_spent_in_on_step(corpus_path, tokenizer, tiny_config, tmp_path):
    """A live evaluation runs inside a logging interval; its time is not training throughput."""
    import time

    from mlflow_lmeval.training import TrainSettings, encode_corpus, train

    tokens = encode_corpus(corpus_path, tokenizer)
    settings = TrainSettings(steps=6, save_steps=(), batch_size=4, sequence_length=32, log_every=3)

    rates = {}
    pause_s = 1.2
    train(tokens, tokenizer, tiny_config, settings, tmp_path, on_log=lambda step, m: rates.__setitem__(step, m["tokens_per_s"]),
          on_step=lambda step, params: time.sleep(pause_s / 3) if step > 3 else None)
    interval_tokens = 3 * settings.batch_size * settings.sequence_length
    # Counting the pause would cap the second interval's rate at interval_tokens / pause_s; three
    # steps of this tiny model take a small fraction of it.
    assert rates[6] > 3 * interval_tokens / pause_s, rates
