"""Concurrent publishers lose nothing and duplicate nothing: into the default SQLite file, and into
one `mlflow server` from processes that share no lock (as if on different machines).

Each publisher is a separate `mlflow-lmeval sync` process. They wait for each other at a barrier, so
their searches and creates overlap. Two of them publish the same evaluation, a third publishes
another evaluation of the same checkpoint (so all three want its one LoggedModel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_tracking import FINGERPRINTS, make_results_dir

from mlflow_lmeval.tracking import TAG_FINGERPRINT, TAG_IDENTITY, evaluation_identity, flatten_metrics, read_results

PUBLISH_AT = r"""
import os, sys, time
from mlflow import MlflowClient
from mlflow_lmeval.cli import main

def slowed(create):
    def wrapper(*args, **kwargs):
        time.sleep(3)  # every publisher has searched before any creates: the race, every time
        return create(*args, **kwargs)
    return wrapper

if os.environ.get("SLOW_CREATE"):
    MlflowClient.create_run = slowed(MlflowClient.create_run)
    MlflowClient.create_logged_model = slowed(MlflowClient.create_logged_model)
# A barrier: publish only once every publisher has started (imported everything).
barrier, count = sys.argv[1], int(sys.argv[2])
open(os.path.join(barrier, str(os.getpid())), "w").close()
deadline = time.time() + 180
while len(os.listdir(barrier)) < count and time.time() < deadline:
    time.sleep(0.002)
sys.exit(main(["sync", *sys.argv[3:]]))
"""


def _results_dirs(root: Path) -> list[Path]:
    """The same evaluation twice (in two places) and another evaluation of the same checkpoint."""
    same = [make_results_dir(root / name, 100, acc=0.4) for name in ("a", "b")]
    other = make_results_dir(root / "c", 100, acc=0.7, num_fewshot=3)  # a score setting: another identity
    return [*same, other]


def _publish_together(directories: list[Path], cwd: Path, env_for) -> list[subprocess.CompletedProcess]:
    """Start one publisher per directory; all begin publishing at the same moment."""
    barrier = Path(tempfile.mkdtemp(prefix="lmeval-barrier-"))
    processes = [
        subprocess.Popen([sys.executable, "-c", PUBLISH_AT, str(barrier), str(len(directories)), str(directory)], cwd=cwd,
                         env=env_for(index), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index, directory in enumerate(directories)
    ]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=240)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(barrier, ignore_errors=True)
    return results


def _assert_one_of_each(client: MlflowClient, directories: list[Path]) -> None:
    """One FINISHED run per evaluation, holding exactly its metrics; one READY model for the checkpoint."""
    experiment = client.get_experiment_by_name("mlflow_lmeval")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert {run.info.status for run in runs} == {"FINISHED"}
    by_identity = {}
    for run in runs:
        by_identity.setdefault(run.data.tags[TAG_IDENTITY], []).append(run)
    assert sorted(len(group) for group in by_identity.values()) == [1, 1]
    for directory in directories:
        results = read_results(directory)
        matching = [run for run in runs if run.data.tags[TAG_IDENTITY] == evaluation_identity(results)[TAG_IDENTITY]]
        assert len(matching) == 1
        assert matching[0].data.metrics == flatten_metrics(results)  # doubles stored and read back: exact
    models = client.search_logged_models([experiment.experiment_id]).to_list()
    assert [(m.tags[TAG_FINGERPRINT], m.status.name) for m in models] == [(FINGERPRINTS[100], "READY")]
    for run in runs:
        assert run.data.tags["lmeval.model_id"] == models[0].model_id


def test_concurrent_publishers_into_a_new_default_sqlite_file(tmp_path):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)  # the project root, where the default mlflow.db goes
    directories = _results_dirs(project)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    outcomes = _publish_together(directories, project, lambda _: env)
    assert [o.returncode for o in outcomes] == [0, 0, 0], [o.stderr[-800:] for o in outcomes]
    assert (project / "mlflow.db").exists()  # nobody created its schema twice
    lines = sorted(o.stdout.strip() for o in outcomes)
    assert lines == ["0 evaluation(s) published, 1 already in MLflow",
                     "1 evaluation(s) published, 0 already in MLflow",
                     "1 evaluation(s) published, 0 already in MLflow"]
    _assert_one_of_each(MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), directories)


def test_concurrent_publishers_on_separate_machines_into_one_server(server, tmp_path):
    """No shared lock (each has its own cache dir), and creates delayed until all have searched:
    each makes its own run and model, and the duplicates converge to one."""
    directories = _results_dirs(tmp_path)

    def machine(index):
        return {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_LMEVAL_CACHE": str(tmp_path / f"m{index}"),
                "SLOW_CREATE": "1"}

    outcomes = _publish_together(directories, tmp_path, machine)
    assert [o.returncode for o in outcomes] == [0, 0, 0], [o.stderr[-800:] for o in outcomes]
    _assert_one_of_each(MlflowClient(server.uri), directories)
    # A later sync from anywhere finds everything there.
    again = subprocess.run([sys.executable, "-m", "mlflow_lmeval.cli", "sync", *map(str, directories)],
                           env=machine(9), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 evaluation(s) published, 3 already in MLflow" in again.stdout


def test_a_lost_insert_race_is_retried_and_other_errors_are_not():
    from mlflow_lmeval.tracking.store import retry_on_conflict

    calls = []

    def insert():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
        return "done"

    assert retry_on_conflict(insert) == "done" and len(calls) == 2

    def reject():
        calls.append(1)
        raise ValueError("bad value")

    with pytest.raises(ValueError, match="bad value"):
        retry_on_conflict(reject)
    assert len(calls) == 3  # tried once, not retried
