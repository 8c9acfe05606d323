"""The DVC pipeline in a copy of the repository: repro, no-op repro, metrics, bad params."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "prepare": {"vocab_size": 400},
    "train": {"steps": 12, "checkpoint_steps": [6, 12], "batch_size": 4, "sequence_length": 32},
    "evaluate": {
        "checkpoints": {"step_6": "checkpoints/step_6", "step_12": "checkpoints/step_12"},
        "limit": 4,
        "bootstrap_iters": 1000,
    },
}


def run(args, cwd, check=True, timeout=600):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def copy_repo(destination: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    for generated in ("dvc.lock", "metrics", "reports/metrics_by_step.csv"):
        shutil.rmtree(destination / generated, ignore_errors=True) if (destination / generated).is_dir() else (destination / generated).unlink(missing_ok=True)
    run(["git", "init", "-q"], destination)
    # DVC's site cache stays inside the repo; only an absolute path survives `exp run --temp`.
    run(["dvc", "config", "--local", "core.site_cache_dir", str(destination / ".dvc/tmp/site_cache")], destination)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], destination)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], destination)
    return destination


def set_params(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    set_params(repo, SMALL)
    run(["dvc", "repro"], repo)
    return repo


def test_repro_writes_every_output(repo):
    for path in ["data/prepared/tokenizer.model", "data/tasks/heldout_rolling.yaml", "checkpoints/step_6/metadata.json",
                 "checkpoints/step_12/metadata.json", "results/step_6/results.json", "results/step_12/results.json",
                 "metrics/step_12.json", "reports/metrics_by_step.csv", "reports/metrics_by_step.png",
                 "reports/loss_by_position.csv", "reports/loss_by_position.png"]:
        assert (repo / path).is_file(), path
    results = json.loads((repo / "results/step_12/results.json").read_text())
    assert results["checkpoint"]["step"] == 12
    assert set(results["results"]) == {"heldout_rolling", "heldout_lastword", "heldout_nextsentence", "heldout_complete"}
    rows = (repo / "reports/metrics_by_step.csv").read_text().splitlines()
    assert rows[0].startswith("checkpoint,step,") and len(rows) == 3
    by_position = (repo / "reports/loss_by_position.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in by_position[1:]} == {"step_6", "step_12"}  # recurrent mode: both tabled
    assert set(results["loss_by_position"]) == {"heldout_rolling", "heldout_lastword", "heldout_nextsentence"}


def mlflow_state(repo: Path, db: str = "mlflow.db"):
    """(training runs, evaluation runs, logged models) in the repo's MLflow store."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / db}"
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    training = [r for r in runs if r.info.run_name.startswith("train-")]
    evaluations = [r for r in runs if "lmeval.fingerprint" in r.data.tags]
    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=experiments, output_format="list")
    return training, evaluations, models


def test_mlflow_holds_the_training_run_linked_evaluations_and_models(repo):
    training, evaluations, models = mlflow_state(repo)
    assert len(training) == 1 and len(evaluations) == 2 and len(models) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in evaluations} == {training[0].info.run_id}
    assert {r.info.status for r in training + evaluations} == {"FINISHED"}
    assert "loss" in training[0].data.metrics
    results = json.loads((repo / "results/step_12/results.json").read_text())
    assert results["checkpoint"]["mlflow_run_id"] is None  # DVC hashes it: linked by the model's fingerprint


def test_second_repro_only_republishes_and_creates_nothing(repo):
    before = [len(x) for x in mlflow_state(repo)]
    result = run(["dvc", "repro"], repo)
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'publish':"], result.stdout
    assert "0 evaluation(s) published, 2 already in MLflow" in result.stdout
    assert [len(x) for x in mlflow_state(repo)] == before


def test_exp_run_temp_reruns_only_evaluation_into_the_same_training_run(repo):
    training, evaluations, _ = mlflow_state(repo)
    result = run(["dvc", "exp", "run", "--temp", "-S", "evaluate.num_fewshot=1"], repo)
    ran = {line for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"Running stage 'evaluate@step_6':", "Running stage 'evaluate@step_12':",
                   "Running stage 'publish':", "Running stage 'report':"}, result.stdout
    training_after, evaluations_after, _ = mlflow_state(repo)  # the main repo's store, not the temp copy's
    assert [r.info.run_id for r in training_after] == [r.info.run_id for r in training]
    new = [r for r in evaluations_after if r.info.run_id not in {e.info.run_id for e in evaluations}]
    assert len(new) == 2 and {r.data.tags["mlflow.parentRunId"] for r in new} == {training[0].info.run_id}
    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout))
    assert '"num_fewshot": 1' in shown and '"num_fewshot": 0' in shown  # baseline and experiment
    diff = json.loads(run(["dvc", "metrics", "diff", "--json", "HEAD"], repo).stdout)
    assert "metrics/step_12.json" in diff


def test_run_cache_restore_still_publishes(repo):
    """DVC restores evaluate outputs from its run-cache without running them; publish catches up."""
    shutil.rmtree(repo / "results")
    set_params(repo, {"tracking": {"tracking_uri": f"sqlite:///{repo / 'fresh.db'}"}})
    result = run(["dvc", "repro"], repo)
    assert "Running stage 'evaluate@step_6'" not in result.stdout, result.stdout
    assert (repo / "results/step_6/results.json").is_file()
    _, evaluations, models = mlflow_state(repo, "fresh.db")
    assert len(evaluations) == 2 and len(models) == 2


def test_dvc_metrics_show_lists_the_metrics(repo):
    out = run(["dvc", "metrics", "show", "--json"], repo).stdout
    metrics = json.loads(out)
    files = next(iter(metrics.values()))["data"]
    assert "metrics/step_12.json" in files
    assert "acc" in files["metrics/step_12.json"]["data"]["heldout_nextsentence"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train": {"stepz": 3}}, "unknown param train.stepz"),
        ({"train": {"checkpoint_steps": [-5]}}, "train.checkpoint_steps has -5"),
        ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size must be a positive integer"),
        ({"evaluate": {"mode": "fixed"}}, "evaluate.mode must be recurrent or windowed, got 'fixed'"),
        ({"evaluate": {"checkpoints": {"mine": "/nonexistent/step_1"}}}, "evaluate.checkpoints.mine: checkpoint directory not found"),
    ],
    ids=["unknown-key", "negative-step", "zero-batch", "bad-mode", "missing-checkpoint-dir"],
)
def test_bad_params_fail_with_one_line_naming_the_param(tmp_path, changes, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage = ["evaluate", "mine"] if "mine" in str(changes) else ["report"]
    result = run([sys.executable, "-m", "mlflow_lmeval.cli", "pipeline", *stage], tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
