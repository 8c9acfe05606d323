"""The rows of docs/errors.md that other test files do not already cover: one test per row."""

import json
import os
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mlflow_lmeval import EvalConfig, UserError, from_linen_cache


def run_cli(*args, timeout=300):
    result = subprocess.run([sys.executable, "-m", "mlflow_lmeval.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return result.returncode, last, result.stderr


def write_task(directory, name, data_bytes, output_type="loglikelihood"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.jsonl").write_bytes(data_bytes)
    (directory / f"{name}.yaml").write_text(json.dumps({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(directory / f"{name}.jsonl")}},
        "test_split": "test", "output_type": output_type, "doc_to_text": "{{text}}", "doc_to_target": " end",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))


def evaluate_cli(checkpoint, task, include, output):
    return run_cli("evaluate", "--checkpoint", checkpoint.path, "--tasks", task, "--include_path", include,
                   "--output_path", output, "--no_tracking", "--no_cache")


def test_malformed_task_yaml(checkpoint, tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "broken.yaml").write_text("task: broken\ndataset_path: json\n  bad_indent: [\n")
    code, last, err = evaluate_cli(checkpoint, "broken", tmp_path / "tasks", tmp_path / "out")
    assert code == 2 and last.startswith("error: malformed task YAML") and "broken.yaml" in last, err


def test_empty_task(checkpoint, tmp_path):
    write_task(tmp_path / "tasks", "nothing", b"")
    code, last, err = evaluate_cli(checkpoint, "nothing", tmp_path / "tasks", tmp_path / "out")
    assert code == 2 and "has no documents" in last, err


def test_non_utf8_task_data(checkpoint, tmp_path):
    write_task(tmp_path / "tasks", "latin", b'{"text": "caf\xe9 au lait"}\n')
    code, last, err = evaluate_cli(checkpoint, "latin", tmp_path / "tasks", tmp_path / "out")
    assert code == 2 and "UnicodeDecodeError" in last and "latin.jsonl" in last, err


def test_mistakes_in_tasks_data_and_templates_are_exit_2_naming_the_file(checkpoint, tmp_path):
    """Rows 26-29 of docs/errors.md, run side by side (each is a CLI start)."""
    tasks = tmp_path / "tasks"
    write_task(tasks / "json", "badjson", b'{"text": "a b"}\n{"text": broken\n')
    write_task(tasks / "field", "badfield", b'{"text": "a b"}\n')
    (tasks / "field" / "badfield.yaml").write_text((tasks / "field" / "badfield.yaml").read_text().replace("{{text}}", "{{nosuch}}"))
    write_task(tasks / "func", "badfunc", b'{"text": "a b"}\n')
    (tasks / "func" / "badfunc.yaml").write_text(
        f"task: badfunc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'func' / 'badfunc.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: !function nosuchmodule.fn\ndoc_to_target: ' end'\n")
    write_task(tasks / "chat", "good", b'{"text": "a b"}\n')
    base = ["evaluate", "--checkpoint", checkpoint.path, "--no_tracking", "--no_cache", "--bootstrap_iters", "0"]
    cases = {
        "badjson": (["--tasks", "badjson", "--include_path", tasks / "json"], ["task badjson", "badjson.jsonl", "Trailing data"]),
        "badfield": (["--tasks", "badfield", "--include_path", tasks / "field"], ["task badfield", "badfield.yaml", "'nosuch' is undefined"]),
        "badfunc": (["--tasks", "badfunc", "--include_path", tasks / "func"], ["badfunc.yaml:", "nosuchmodule.fn", "cannot be imported"]),
        "chat": (["--tasks", "good", "--include_path", tasks / "chat", "--apply_chat_template", "{% for m in messages %}{{ m }"],
                 ["chat template", "line 1", "TemplateSyntaxError"]),
    }
    running = {name: subprocess.Popen([sys.executable, "-m", "mlflow_lmeval.cli", *map(str, base + args + ["--output_path", tmp_path / name])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, (args, _) in cases.items()}
    for name, process in running.items():
        _, err = process.communicate(timeout=300)
        last = err.strip().splitlines()[-1]
        assert process.returncode == 2 and last.startswith("error: "), (name, err)
        assert all(part in last for part in cases[name][1]), (name, last)


def test_corrupt_checkpoint_is_one_line_and_nothing_after_it(checkpoint, tmp_path, local_tasks):
    """Orbax's background thread once printed an asyncio traceback at exit after the error line."""
    import shutil

    broken = tmp_path / "step_1"
    shutil.copytree(checkpoint.path, broken)
    for data in (broken / "params").rglob("*"):
        if data.is_file() and data.stat().st_size > 0 and data.name != "_METADATA":
            data.write_bytes(b"\0" * data.stat().st_size)
    directory, names = local_tasks
    args = [sys.executable, "-m", "mlflow_lmeval.cli", "evaluate", "--checkpoint", broken, "--tasks", names[1],
            "--include_path", directory, "--no_tracking"]
    running = [subprocess.Popen([*map(str, args), "--output_path", str(tmp_path / f"o{i}")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(4)]
    for process in running:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2 and err.strip().splitlines()[-1].startswith("error: "), err
        assert "Traceback" not in err and "Event loop is closed" not in err, err


def test_non_utf8_corpus_is_read_with_replacement(tmp_path, tokenizer):
    from mlflow_lmeval.training import encode_corpus

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"caf\xe9 " * 50)
    assert len(encode_corpus(path, tokenizer)) > 0


def test_unknown_config_key():
    with pytest.raises(UserError, match="unknown config key\\(s\\): batchsize"):
        EvalConfig.from_dict({"evaluation_tasks": ["x"], "batchsize": 3})


def test_task_name_cannot_write_outside_the_output_dir(tmp_path):
    from mlflow_lmeval.evaluation import write_results

    output = tmp_path / "out"
    write_results({"results": {}, "samples": {"../../escape": [{"doc_id": 0}], "/etc/passwd": [{"doc_id": 1}]}}, output)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(name.startswith("out/") for name in written), written
    assert "out/samples__.._escape.jsonl" in written and "out/samples__etc_passwd.jsonl" in written


def test_full_disk_for_the_output(checkpoint, local_tasks, tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (mount / "out").mkdir()
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last byte
            while os.write(filler, b"\0" * 512):
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        directory, names = local_tasks
        code, last, err = run_cli("evaluate", "--checkpoint", checkpoint.path, "--tasks", names[1], "--include_path", directory,
                                  "--output_path", mount / "out", "--limit", 2, "--no_tracking", "--no_cache")
        assert code == 2 and "cannot write results" in last and "No space left on device" in last, err
    finally:
        subprocess.run(["umount", str(mount)], check=False)


class PoisonedModel(nn.Module):
    """Finite logits, except NaN after token 7."""

    vocab: int

    @nn.compact
    def __call__(self, tokens, mask):
        logits = nn.Dense(self.vocab)(nn.Embed(self.vocab, 8)(tokens))
        return jnp.where((tokens == 7)[..., None], jnp.nan, logits)


def test_nan_logits_name_the_request(tokenizer):
    from lm_eval.api.instance import Instance

    from mlflow_lmeval.engine.loop import EngineSettings
    from mlflow_lmeval.lm import JaxLM

    module = PoisonedModel(tokenizer.vocab_size)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), mask=jnp.ones((1, 2), bool))["params"]
    model = from_linen_cache(module, params, vocab_size=tokenizer.vocab_size, context_length=64)
    lm = JaxLM(model, tokenizer, EngineSettings(batch_size=2), show_progress=False)
    poisoned = tokenizer.decode([7]) * 3
    requests = [Instance("loglikelihood", {}, ("A fine context", " and more"), 0, ("toy", 0, 1)),
                Instance("loglikelihood", {}, ("Then " + poisoned, " boom"), 1, ("toy", 1, 1))]
    with pytest.raises(UserError, match="NaN or inf log-probabilities for context .*Then"):
        lm.loglikelihood(requests)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--num_processes", "2", "--process_id", "2", "--coordinator_address", "127.0.0.1:1234"],
         "error: process_id must be below num_processes (2), got 2"),
        (["--num_processes", "2", "--process_id", "0", "--coordinator_address", "127.0.0.1"],
         "error: coordinator address must be HOST:PORT with a port from 1 to 65535, got '127.0.0.1'"),
        (["--num_processes", "2", "--coordinator_address", "127.0.0.1:1234"], "error: a distributed run needs process_id too"),
        (["--num_processes", "0"], "must be a positive integer, got 0"),
    ],
    ids=["process-id-too-large", "address-without-port", "missing-process-id", "zero-processes"],
)
def test_bad_multihost_options(tmp_path, options, message):
    # Checked before any checkpoint is read or any process is contacted, so no fixture is needed.
    code, last, err = run_cli("evaluate", "--checkpoint", tmp_path / "step_1", "--tasks", "t", "--output_path", tmp_path / "out",
                              *options, timeout=120)
    assert code == 2, err
    assert message in last


def test_unreachable_coordinator_is_one_line_after_the_join_timeout(tmp_path):
    with socket.socket() as probe:  # a loopback port that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code, last, err = run_cli("evaluate", "--checkpoint", tmp_path / "step_1", "--tasks", "t", "--output_path", tmp_path / "out",
                              "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "1",
                              "--join_timeout", "2", timeout=120)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert last.startswith(f"error: cannot join the distributed run: nothing answers at 127.0.0.1:{port} after 2 s")
    assert time.monotonic() - started < 60
