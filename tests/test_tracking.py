"""Tracking against real MLflow: SQLite stores in tmp dirs, and a real `mlflow server` on loopback."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from mlflow_lmeval import tracking
from mlflow_lmeval.errors import UserError
from mlflow_lmeval.tracking import (
    TrackingUnavailable,
    evaluation_identity,
    flatten_metrics,
    metric_key,
    publish_results,
    read_results,
    resolve_tracking_uri,
    results_table,
    run_contents,
    sync,
)

FINGERPRINTS = {
    100: "sha256:959b469d644f114441ea9a3887e3cf53373399e10c5ff2d7148539a8041f3ea2",
    200: "sha256:1d5c7e0f9a3b4c2d8e6f7a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d",
    300: "sha256:18055510fde73ca6678d112d1c4486baa14af77557145872df09c92cac2b10c3",
}


def _config(task, output_type, metrics):
    """A task config shaped like lm-eval's, with the absolute paths lm-eval records."""
    return {
        "task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": f"/tmp/tasks/{task}.jsonl"}},
        "test_split": "test", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}", "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
        "output_type": output_type, "repeats": 1,
        "metadata": {"version": 1.0, "config_source": f"/tmp/tasks/{task}.yaml"},
    }


# A compact results.json of the real shape (lm-eval's keys plus ours), incl. a filter, an "@" and N/A.
RESULTS = {
    "results": {
        "pydoc_rolling": {
            "name": "pydoc_rolling", "alias": "pydoc_rolling", "sample_len": 10,
            "word_perplexity,none": 15613519900.89682, "word_perplexity_stderr,none": "N/A",
            "byte_perplexity,none": 29.325040533245915, "byte_perplexity_stderr,none": "N/A",
            "bits_per_byte,none": 4.874061197244214, "bits_per_byte_stderr,none": "N/A",
        },
        "pydoc_lastword": {
            "name": "pydoc_lastword", "alias": "pydoc_lastword", "sample_len": 10,
            "perplexity,none": 254116343.37418506, "perplexity_stderr,none": 1770227737.012131,
            "acc,none": 0.1, "acc_stderr,none": 0.1,
        },
        "pydoc_nextsentence": {
            "name": "pydoc_nextsentence", "alias": "pydoc_nextsentence", "sample_len": 10,
            "acc,none": 0.2, "acc_stderr,none": 0.13333333333333333,
            "acc_norm,none": 0.2, "acc_norm_stderr,none": 0.13333333333333333,
        },
        "pydoc_complete": {
            "name": "pydoc_complete", "alias": "pydoc_complete", "sample_len": 10,
            "exact_match,strict-match": 0.3, "exact_match_stderr,strict-match": 0.15275252316519466,
            "pass@1,none": 0.25, "pass@1_stderr,none": 0.1,
        },
    },
    "group_subtasks": {"pydoc_complete": [], "pydoc_lastword": [], "pydoc_nextsentence": [], "pydoc_rolling": []},
    "configs": {
        "pydoc_complete": _config("pydoc_complete", "generate_until", ["exact_match", "pass@1"]),
        "pydoc_lastword": _config("pydoc_lastword", "loglikelihood", ["perplexity", "acc"]),
        "pydoc_nextsentence": _config("pydoc_nextsentence", "multiple_choice", ["acc", "acc_norm"]),
        "pydoc_rolling": _config("pydoc_rolling", "loglikelihood_rolling", ["word_perplexity"]),
    },
    "versions": {"pydoc_complete": 1.0, "pydoc_lastword": 1.0, "pydoc_nextsentence": 1.0, "pydoc_rolling": 1.0},
    "n-shot": {"pydoc_complete": 0, "pydoc_lastword": 0, "pydoc_nextsentence": 0, "pydoc_rolling": 0},
    "higher_is_better": {"pydoc_nextsentence": {"acc": True, "acc_norm": True}},
    "n-samples": {"pydoc_nextsentence": {"original": 73, "effective": 10}},
    "config": {"model": "JaxLM", "model_args": None, "batch_size": None, "limit": 10, "bootstrap_iters": 100,
               "random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234, "fewshot_seed": 1234},
    "git_hash": "555c86d",
    "date": 1795923624.0532846,
    "lm_eval_version": "0.4.13",
    "checkpoint": {"path": "/tmp/run1/step_300", "step": 300, "fingerprint": FINGERPRINTS[300], "mlflow_run_id": None},
    "eval_config": {
        "evaluation_tasks": ["pydoc_rolling", "pydoc_lastword", "pydoc_nextsentence", "pydoc_complete"],
        "tokenizer_path": None, "limit_requests": 10, "use_infinite_eval": True, "infinite_eval_chunksize": 64,
        "batch_size": 8, "num_fewshot": None, "bootstrap_iters": 100, "include_path": "/tmp/tasks",
        "output_path": "/tmp/out1", "log_samples": True,
    },
    "engine": {"compilations": 2, "scored_tokens": {"loglikelihood": 2066}},
}


def make_results_dir(root: Path, step: int, *, run_id=None, acc=0.2, samples=True, **eval_config) -> Path:
    """A results dir as an evaluation of checkpoint ``step_<step>`` would leave it."""
    results = copy.deepcopy(RESULTS)
    results["checkpoint"] = {"path": str(root / "ckpt" / f"step_{step}"), "step": step,
                             "fingerprint": FINGERPRINTS[step], "mlflow_run_id": run_id}
    results["results"]["pydoc_nextsentence"]["acc,none"] = acc
    results["eval_config"].update(eval_config)
    directory = root / "out" / f"step_{step}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results, indent=2))
    if samples:
        (directory / "samples_pydoc_complete.jsonl").write_text(
            json.dumps({"doc_id": 0, "arguments": [["def f(", {"until": ["\n"]}]], "resps": [["x)"]]}) + "\n")
    return directory


def make_checkpoint(root: Path, step: int, run_id: str | None) -> Path:
    directory = root / "ckpt" / f"step_{step}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metadata.json").write_text(json.dumps(
        {"format": "mlflow_lmeval.checkpoint/1", "step": step, "fingerprint": FINGERPRINTS[step], "mlflow_run_id": run_id}))
    return directory


# ----------------------------------------------------------------------------------------------
# Fixtures: a real SQLite store per test (copied from one migrated template: migrations take ~3 s)
# ----------------------------------------------------------------------------------------------




def all_runs(client, experiment="mlflow_lmeval"):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], max_results=1000)


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, raw, expected", [
    ("arc_easy", "acc,none", "lmeval/arc_easy/acc"),
    ("arc_easy", "acc_stderr,none", "lmeval/arc_easy/acc_stderr"),
    ("gsm8k", "exact_match,strict-match", "lmeval/gsm8k/exact_match/strict-match"),
    ("humaneval", "pass@1,create_test", "lmeval/humaneval/pass_at_1/create_test"),
    ("mmlu (group)", "acc,none", "lmeval/mmlu _group_/acc"),
    ("a/b", "acc,x=y", "lmeval/a_b/acc/x_y"),
    ("..", "acc,none", "lmeval/_/acc"),
    ("arc_easy", "alias", None),
    ("arc_easy", "name", None),
    ("arc_easy", "sample_len", None),
])
def test_metric_key_maps_lm_eval_keys_to_valid_mlflow_keys(task, raw, expected):
    from mlflow.utils.validation import _validate_metric_name

    assert metric_key(task, raw) == expected
    if expected:
        _validate_metric_name(expected)  # MLflow's own check: raises if MLflow would reject it


def test_metric_key_stays_within_mlflow_length_limit():
    key = metric_key("t" * 300, "acc,none")
    assert len(key) <= 250 and key != metric_key("t" * 299 + "u", "acc,none")


def test_flatten_metrics_keeps_numbers_and_drops_na_and_labels():
    import jax.numpy as jnp

    flat = flatten_metrics({
        "results": {"t": {"alias": "t", "name": "t", "sample_len": 3, "acc,none": np.float32(0.5),
                          "acc_stderr,none": jnp.asarray(0.25), "ppl,none": 3, "ppl_stderr,none": "N/A",
                          "vec,none": np.ones(3)}},
        "groups": {"g": {"acc,none": 0.75}},
    })
    assert flat == {"lmeval/t/acc": 0.5, "lmeval/t/acc_stderr": 0.25, "lmeval/t/ppl": 3.0, "lmeval/g/acc": 0.75}
    assert all(type(v) is float for v in flat.values())
    assert flatten_metrics(RESULTS["results"]) == flatten_metrics(RESULTS)  # bare results mapping works too


def test_results_table_has_one_row_per_metric_with_raw_keys():
    rows = results_table(RESULTS)
    assert set(rows[0]) >= {"Task", "Version", "Filter", "n-shot", "Metric", "Value", "Stderr"}
    by_key = {(r["Task"], r["lm-eval key"]): r for r in rows}
    assert len(rows) == 9  # 3 rolling + 2 lastword + 2 nextsentence + 2 complete; no stderr rows
    row = by_key[("pydoc_complete", "exact_match,strict-match")]
    assert (row["Filter"], row["Metric"], row["Value"], row["Stderr"], row["Version"], row["n-shot"]) == (
        "strict-match", "exact_match", 0.3, 0.15275252316519466, 1.0, 0)
    assert row["MLflow key"] == "lmeval/pydoc_complete/exact_match/strict-match"
    assert by_key[("pydoc_rolling", "bits_per_byte,none")]["Stderr"] == "N/A"


def test_identity_follows_checkpoint_tasks_and_score_settings_only():
    base = evaluation_identity(RESULTS)["lmeval.identity"]

    def identity_after(change):
        results = copy.deepcopy(RESULTS)
        change(results)
        return evaluation_identity(results)["lmeval.identity"]

    # Same evaluation elsewhere on disk or run faster: same identity.
    assert identity_after(lambda r: r["eval_config"].update(output_path="/elsewhere", batch_size=64)) == base
    assert identity_after(lambda r: r["eval_config"].update(response_cache=False, response_cache_path="/c")) == base
    assert identity_after(lambda r: r["configs"]["pydoc_complete"]["dataset_kwargs"]["data_files"].update(
        test="/tmp/dvc-exp-copy/tasks/pydoc_complete.jsonl")) == base
    assert identity_after(lambda r: r["checkpoint"].update(path="/moved", mlflow_run_id="abc")) == base
    # Another checkpoint, task config, task version or score-changing setting: another evaluation.
    assert identity_after(lambda r: r["checkpoint"].update(fingerprint=FINGERPRINTS[100])) != base
    assert identity_after(lambda r: r["configs"]["pydoc_complete"].update(doc_to_text="Q: {{prompt}}")) != base
    assert identity_after(lambda r: r["versions"].update(pydoc_complete=2.0)) != base
    # The same task name and config over other documents.
    assert identity_after(lambda r: r.update(task_documents={"pydoc_complete": "sha256:other"})) != base
    assert identity_after(lambda r: r["eval_config"].update(limit_requests=20)) != base
    assert identity_after(lambda r: r["config"].update(fewshot_seed=7)) != base


def test_redaction_of_secret_keys_uris_and_environment(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value")
    config = {"hf_token": "abc", "api_key": "k", "tokenizer_path": "/models/tok.model", "monkey": "banana",
              "remote": "https://alice:pw123@example.org/x", "model_args": "pretrained=x,token=abc123",
              "note": "uses s3cr3t-value here", "nested": {"password": "p", "depth": 2}}
    flat = tracking.flatten_params(config)
    assert flat["hf_token"] == flat["api_key"] == flat["nested.password"] == tracking.REDACTED
    assert flat["tokenizer_path"] == "/models/tok.model" and flat["monkey"] == "banana" and flat["nested.depth"] == "2"
    assert "pw123" not in flat["remote"] and flat["remote"].endswith("@example.org/x")
    assert "abc123" not in flat["model_args"] and "pretrained=x" in flat["model_args"]
    assert "s3cr3t-value" not in flat["note"]


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(name, raising=False)
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "sub" / "dir").mkdir(parents=True)
    monkeypatch.chdir(project / "sub" / "dir")
    assert resolve_tracking_uri() == f"sqlite:///{project}/mlflow.db"  # found from cwd upward
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "dvc_root"))  # `dvc exp run --temp` runs in a copy
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/dvc_root/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path}/dvc_root/rel.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # no project markers: cwd
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"


# ----------------------------------------------------------------------------------------------
# Publishing into a real SQLite store
# ----------------------------------------------------------------------------------------------


def test_every_metric_in_results_json_equals_mlflow_key_by_key(store, tmp_path):
    directory = make_results_dir(tmp_path, 300)
    outcome = publish_results(directory, tracking_uri=store)
    assert outcome.created
    client = MlflowClient(store)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"

    results = json.loads((directory / "results.json").read_text())
    expected = {}
    for task, values in results["results"].items():
        for raw_key, value in values.items():
            if raw_key in ("alias", "name", "sample_len") or value == "N/A":
                continue
            expected[metric_key(task, raw_key)] = value
    assert len(expected) == 15
    assert run.data.metrics == expected  # every numeric metric and stderr, nothing else
    for key, value in expected.items():
        (point,) = client.get_metric_history(outcome.run_id, key)
        assert (point.value, point.step) == (value, 300)

    assert run.data.params["limit_requests"] == "10" and run.data.params["lm_eval.fewshot_seed"] == "1234"
    tags = run.data.tags
    assert tags["lmeval.fingerprint"] == FINGERPRINTS[300]
    assert tags["lmeval.checkpoint_path"] == str(tmp_path / "ckpt" / "step_300")
    assert tags["lmeval.task_config_digest"].startswith("sha256:")
    assert tags["lmeval.lm_eval_version"] == "0.4.13" and tags["lmeval.git_commit"] == "555c86d"
    assert "mlflow.parentRunId" not in tags  # no training run known
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert artifacts == {"results.json", "results_table.json", "results_table.csv", "eval_config.json", "samples"}
    assert [a.path for a in client.list_artifacts(outcome.run_id, "samples")] == ["samples/samples_pydoc_complete.jsonl"]
    table = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/results_table.json")
    assert "lm-eval key" in table["columns"] and len(table["data"]) == 9
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == set(results["results"])


def test_training_run_with_three_checkpoints_gets_children_and_ranked_models(store, tmp_path):
    with tracking.TrainingRun(tracking_uri=store, experiment="train", params={"lr": 3e-3, "model": {"dim": 64}}) as run:
        for step in (100, 200, 300):
            run.log_metrics(step, {"loss": np.float32(4.0 - step / 100), "tokens_per_s": 1234.5})
            run.log_checkpoint(step, make_checkpoint(tmp_path, step, run.run_id))
    accs = {100: 0.3, 200: 0.5, 300: 0.4}
    for step, acc in accs.items():
        make_results_dir(tmp_path, step, run_id=run.run_id, acc=acc)  # run id from the checkpoint metadata
    outcomes = sync([tmp_path / "out"], tracking_uri=store)
    assert [o.created for o in outcomes] == [True] * 3

    client = MlflowClient(store)
    training = client.get_run(run.run_id)
    assert training.info.status == "FINISHED" and training.data.params["model.dim"] == "64"
    assert [p.step for p in client.get_metric_history(run.run_id, "loss")] == [100, 200, 300]
    experiment_id = training.info.experiment_id  # children default to the training run's experiment
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.run_id}'")
    assert sorted(int(c.data.tags["lmeval.checkpoint_step"]) for c in children) == [100, 200, 300]
    assert {c.info.status for c in children} == {"FINISHED"}

    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    assert len(models) == 3
    for model in models:
        assert model.source_run_id == run.run_id and model.tags["mlflow.modelIsExternal"] == "true"
        assert model.params["fingerprint"] == FINGERPRINTS[int(model.params["step"])]
        acc = [m for m in model.metrics if m.key == "lmeval/pydoc_nextsentence/acc"]
        assert [(m.value, m.step, m.dataset_name) for m in acc] == [
            (accs[int(model.params["step"])], int(model.params["step"]), "pydoc_nextsentence")]
    assert sorted((o.step, o.model_id) for o in training.outputs.model_outputs) == sorted(
        (int(m.params["step"]), m.model_id) for m in models)

    ranked = mlflow.search_logged_models(
        experiment_ids=[experiment_id], output_format="list",
        order_by=[{"field_name": "metrics.lmeval/pydoc_nextsentence/acc", "ascending": False}])
    assert [m.params["step"] for m in ranked] == ["200", "300", "100"]
    ranked = mlflow.search_logged_models(
        experiment_ids=[experiment_id], output_format="list", datasets=[{"dataset_name": "pydoc_nextsentence"}],
        order_by=[{"field_name": "metrics.lmeval/pydoc_nextsentence/acc", "ascending": True,
                   "dataset_name": "pydoc_nextsentence"}])
    assert [m.params["step"] for m in ranked] == ["100", "300", "200"]


def _snapshot(client, store):
    """Everything that a duplicate publish could add: runs, metric points, models, links."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    points = {(r.info.run_id, k): len(client.get_metric_history(r.info.run_id, k)) for r in runs for k in r.data.metrics}
    models = client.search_logged_models(experiments).to_list()
    return {
        "runs": sorted(r.info.run_id for r in runs),
        "points": points,
        "models": sorted(m.model_id for m in models),
        "model_metrics": sum(len(m.metrics or []) for m in models),
        "inputs": sum(len(r.inputs.dataset_inputs) + len(r.inputs.model_inputs) for r in runs),
        "outputs": sum(len(r.outputs.model_outputs) for r in runs if r.outputs),
    }


def test_sync_twice_creates_nothing_new(store, tmp_path):
    training = tracking.start_training_run(tracking_uri=store)
    for step in (100, 200, 300):
        make_checkpoint(tmp_path, step, training.run_id)
        make_results_dir(tmp_path, step, run_id=training.run_id)
    training.end()
    client = MlflowClient(store)
    first = sync([tmp_path / "out"], tracking_uri=store)
    before = _snapshot(client, store)
    assert len(before["runs"]) == 4 and len(before["models"]) == 3 and before["outputs"] == 3
    second = sync([tmp_path / "out"], tracking_uri=store)
    assert [o.created for o in second] == [False] * 3
    assert [o.run_id for o in second] == [o.run_id for o in first]
    after = _snapshot(client, store)
    assert after == before
    # One point per metric on each evaluation run, never a repeat; on the training run one per
    # checkpoint, at its step (the learning curve).
    assert {n for (run_id, _), n in after["points"].items() if run_id != training.run_id} == {1}
    curves = {key: n for (run_id, key), n in after["points"].items() if run_id == training.run_id}
    assert len(curves) == 15 and set(curves.values()) == {3}
    assert sorted(p.step for p in client.get_metric_history(training.run_id, "lmeval/pydoc_nextsentence/acc")) == [
        100, 200, 300]
    # Registering a checkpoint again finds its model instead of making a twin.
    assert tracking.ensure_checkpoint_model(tmp_path / "ckpt" / "step_100", tracking_uri=store) in before["models"]
    assert _snapshot(client, store) == before


def test_interrupted_publish_is_marked_failed_then_completed(store, tmp_path, monkeypatch):
    directory = make_results_dir(tmp_path, 200)
    real_write = run_contents.write_artifacts

    def crash(*args, **kwargs):
        raise OSError("disk vanished mid-publish")

    monkeypatch.setattr(run_contents, "write_artifacts", crash)
    with pytest.raises(tracking.TrackingError, match="disk vanished") as caught:
        publish_results(directory, tracking_uri=store)
    assert caught.value.exit_code == 4 and "\n" not in str(caught.value)
    client = MlflowClient(store)
    (partial,) = all_runs(client)
    assert partial.info.status == "FAILED"  # never left RUNNING
    assert partial.data.metrics  # metrics went in before the crash

    monkeypatch.setattr(run_contents, "write_artifacts", real_write)
    outcome = publish_results(directory, tracking_uri=store)
    assert outcome.created and outcome.run_id == partial.info.run_id
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED" and run.data.metrics == partial.data.metrics
    assert all(len(client.get_metric_history(run.info.run_id, k)) == 1 for k in run.data.metrics)
    assert len(client.list_artifacts(run.info.run_id)) == 5
    (model,) = client.search_logged_models([run.info.experiment_id]).to_list()
    assert len(model.metrics) == len(run.data.metrics)


def test_missing_results_json_is_a_one_line_error_and_writes_nothing(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no results.json") as caught:
        publish_results(tmp_path / "empty", tracking_uri=store)
    assert "\n" not in str(caught.value)
    assert MlflowClient(store).get_experiment_by_name("mlflow_lmeval") is None


def test_no_secret_reaches_mlflow(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    directory = make_results_dir(
        tmp_path, 100, tokenizer_path="https://user:hunter2@host/tok.model", hf_token="hunter2",
        system_instruction="mirror at https://bob:hunter2@mirror.example/")
    (directory / "samples_pydoc_complete.jsonl").write_text(json.dumps({"prompt": "creds hunter2"}) + "\n")
    outcome = publish_results(directory, tracking_uri=store)
    assert "hunter2" in (directory / "results.json").read_text()  # the source of truth is untouched

    client = MlflowClient(store)
    run = client.get_run(outcome.run_id)
    assert run.data.params["tokenizer_path"] == "https://[REDACTED]@host/tok.model"
    assert run.data.params["hf_token"] == "[REDACTED]"
    stored = json.dumps([run.data.params, run.data.tags, [m.to_dictionary() for m in client.search_logged_models(
        [run.info.experiment_id]).to_list()]], default=str)
    assert "hunter2" not in stored
    downloaded = Path(client.download_artifacts(outcome.run_id, "", str(tmp_path / "downloaded")))
    files = [p for p in downloaded.rglob("*") if p.is_file()]
    assert len(files) == 5
    everything = [tmp_path / "mlflow.db", *files, *(p for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file())]
    for path in everything:
        assert b"hunter2" not in path.read_bytes(), path


def test_dvc_stage_context_tags_runs(store, tmp_path, monkeypatch):
    from importlib.metadata import entry_points

    root = tmp_path / "repo"
    root.mkdir()
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_STAGE", "evaluate@300")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    outcome = publish_results(make_results_dir(tmp_path, 300), tracking_uri=store)
    tags = MlflowClient(store).get_run(outcome.run_id).data.tags
    import hashlib

    expected = {"dvc.stage": "evaluate@300", "dvc.exp_name": "exp-abc", "dvc.root": str(root),
                "dvc.lock_digest": "sha256:" + hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()}
    assert {k: v for k, v in tags.items() if k.startswith("dvc.")} == expected

    if not any(ep.value.startswith("mlflow_lmeval.dvc_context") for ep in entry_points(group="mlflow.run_context_provider")):
        pytest.skip("package not installed with its entry points (pip install -e .)")
    mlflow.set_tracking_uri(store)
    with mlflow.start_run() as plain:  # any run, not only ours, through the entry point
        pass
    assert {k: v for k, v in mlflow.get_run(plain.info.run_id).data.tags.items() if k.startswith("dvc.")} == expected

    # Importing the provider's module before mlflow must not make MLflow drop it (circular import).
    script = ("import mlflow_lmeval.dvc_context, mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]);"
              "run = mlflow.start_run(); mlflow.end_run(); print(run.info.run_id)")
    done = subprocess.run([sys.executable, "-W", "error::UserWarning:mlflow.tracking.context.registry", "-c", script,
                           store], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    tags = MlflowClient(store).get_run(done.stdout.split()[-1]).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("dvc.")} == expected


# ----------------------------------------------------------------------------------------------
# A real `mlflow server` on loopback: publish, outage, catch-up
# ----------------------------------------------------------------------------------------------


def test_real_server_publish_outage_and_catch_up(server, tmp_path):
    uri = server.uri
    with tracking.TrainingRun(tracking_uri=uri, experiment="train") as run:
        for step in (100, 200):
            run.log_checkpoint(step, make_checkpoint(tmp_path, step, run.run_id))
    first = make_results_dir(tmp_path, 100, run_id=run.run_id, acc=0.3)
    assert publish_results(first, tracking_uri=uri).created

    server.stop()
    second = make_results_dir(tmp_path, 200, run_id=run.run_id, acc=0.6)
    written = (second / "results.json").read_bytes()
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as caught:
        publish_results(second, tracking_uri=uri)
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"a dead server took {elapsed:.0f} s to fail"
    assert caught.value.exit_code == 3 and "\n" not in str(caught.value) and uri in str(caught.value)
    assert (second / "results.json").read_bytes() == written  # results stay the source of truth

    server.start()  # same store, restarted
    outcomes = sync([tmp_path / "out"], tracking_uri=uri)
    assert [(Path(o.results_dir).name, o.created) for o in outcomes] == [("step_100", False), ("step_200", True)]
    client = MlflowClient(uri)
    experiment_id = client.get_run(run.run_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    ranked = client.search_logged_models(
        [experiment_id], order_by=[{"field_name": "metrics.lmeval/pydoc_nextsentence/acc", "ascending": False}]).to_list()
    assert [m.params["step"] for m in ranked] == ["200", "100"]
    assert sync([tmp_path / "out"], tracking_uri=uri)[1].created is False


SLOW_PUBLISH = r"""
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from mlflow_lmeval.cli import main

log_artifacts = MlflowClient.log_artifacts

def slow(self, *args, **kwargs):
    Path(sys.argv[1]).touch()  # the run exists and holds its params, tags and metrics by now
    time.sleep(8)  # the test kills the server here
    return log_artifacts(self, *args, **kwargs)

MlflowClient.log_artifacts = slow
sys.exit(main(["sync", *sys.argv[2:]]))
"""


def test_server_killed_mid_publish_then_sync_completes_the_run(server, tmp_path):
    directory = make_results_dir(tmp_path, 100, acc=0.3)
    marker = tmp_path / "mid-publish"
    publisher = subprocess.Popen([sys.executable, "-c", SLOW_PUBLISH, str(marker), str(directory),
                                  "--tracking_uri", server.uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert publisher.poll() is None and time.monotonic() < deadline, publisher.communicate()
            time.sleep(0.1)
        server.stop()
        _out, err = publisher.communicate(timeout=120)
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait()
    assert publisher.returncode == 3 and err.strip().count("\n") == 0, err

    server.start()
    client = MlflowClient(server.uri)
    (half,) = all_runs(client)
    assert half.info.status == "RUNNING" and not client.list_artifacts(half.info.run_id)  # the server died first

    (outcome,) = sync([directory], tracking_uri=server.uri)
    (run,) = all_runs(client)
    assert outcome.run_id == run.info.run_id == half.info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics == flatten_metrics(read_results(directory))  # doubles through the server and back: exact
    assert "results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
