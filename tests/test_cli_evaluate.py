"""`mlflow-lmeval evaluate` end to end, and its one-line answers to bad input (exit code 2)."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    result = subprocess.run([sys.executable, "-m", "mlflow_lmeval.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout, result.stderr.strip()


def test_evaluate_writes_results_and_prints_the_table(checkpoint, local_tasks, tmp_path):
    directory, names = local_tasks
    code, out, err = run_cli("evaluate", "--checkpoint", checkpoint.path, "--tasks", ",".join(names[:2]), "--include_path", directory,
                             "--output_path", tmp_path, "--limit", 3, "--chunk_size", 16, "--log_samples")
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == set(names[:2])
    assert results["checkpoint"]["step"] == checkpoint.step
    assert (tmp_path / f"samples_{names[0]}.jsonl").is_file()
    assert "|" in out and names[0] in out  # lm-eval's summary table
    assert "tok/s" in err  # the progress bar


@pytest.fixture(scope="module")
def empty_target_task(tmp_path_factory):
    directory = tmp_path_factory.mktemp("badtask")
    (directory / "empty.jsonl").write_text(json.dumps({"text": "some context"}) + "\n")
    (directory / "empty.yaml").write_text(json.dumps({
        "task": "empty_target", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(directory / "empty.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{text}}", "doc_to_target": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    return directory


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": "no_such_task"}, "unknown task(s): no_such_task"),
        ({"include_path": "/nonexistent/tasks"}, "include path not found: /nonexistent/tasks"),
        ({"chunk_size": 0}, "--chunk_size must be a positive integer, got 0"),
        ({"batch_size": -2}, "--batch_size must be a positive integer, got -2"),
        ({"tasks": "empty_target", "include_path": "EMPTY"}, "tokenizes to nothing"),
        ({"checkpoint": "/nonexistent/step_1"}, "checkpoint not found"),
    ],
    ids=["unknown-task", "missing-include-path", "chunk-size-0", "negative-batch-size", "empty-request", "missing-checkpoint"],
)
def test_bad_input_is_one_line_and_exit_2(checkpoint, local_tasks, empty_target_task, tmp_path, change, message):
    directory, names = local_tasks
    options = {"checkpoint": checkpoint.path, "tasks": names[1], "include_path": directory, "output_path": tmp_path, "limit": 2}
    options.update(change)
    if options["include_path"] == "EMPTY":
        options["include_path"] = empty_target_task
    args = ["evaluate"] + [part for key, value in options.items() for part in (f"--{key}", value)]
    code, _, err = run_cli(*args)
    last_line = err.splitlines()[-1] if err else ""
    assert code == 2, err
    assert message in last_line and last_line.startswith("error: "), err
    assert "Traceback" not in err


def test_unreachable_tracking_server_keeps_results_and_sync_catches_up(checkpoint, local_tasks, tmp_path, dead_uri):
    from mlflow import MlflowClient

    dead = dead_uri
    directory, names = local_tasks
    out = tmp_path / "out"
    code, _, err = run_cli("evaluate", "--checkpoint", checkpoint.path, "--tasks", names[1], "--include_path", directory,
                           "--output_path", out, "--limit", 3, "--tracking_uri", dead)
    assert code == 3, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "mlflow-lmeval sync" in last and "(connection refused)" in last
    assert len(last.replace(str(out), "OUT")) <= 200, last  # the server, the reason, where results are, what to run
    assert (out / "results.json").is_file()

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, stdout, err = run_cli("sync", out, "--tracking_uri", store)
    assert code == 0 and "1 evaluation(s) published" in stdout, err
    code, stdout, err = run_cli("sync", out, "--tracking_uri", store)
    assert code == 0 and "0 evaluation(s) published, 1 already in MLflow" in stdout, err
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.metrics


def test_evaluate_publishes_by_default_and_no_tracking_turns_it_off(checkpoint, local_tasks, tmp_path):
    from mlflow import MlflowClient

    directory, names = local_tasks
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["evaluate", "--checkpoint", checkpoint.path, "--tasks", names[1], "--include_path", directory, "--limit", 3]
    code, stdout, err = run_cli(*common, "--output_path", tmp_path / "a", "--no_tracking", "--tracking_uri", store)
    assert code == 0 and "MLflow run" not in stdout, err
    assert not (tmp_path / "mlflow.db").exists()
    code, stdout, err = run_cli(*common, "--output_path", tmp_path / "b", "--tracking_uri", store)
    assert code == 0 and "MLflow run" in stdout, err
    client = MlflowClient(store)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1
