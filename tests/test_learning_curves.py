"""The training run as the place to read a training's progress: every evaluation's scores at its
step (checkpoint and live ones apart), nothing lost in an outage, and what the MLflow UI shows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import pytest
from lm_eval.utils import make_table
from mlflow import MlflowClient
from servers import MlflowServer
from test_tracking import RESULTS, _snapshot, make_checkpoint, make_results_dir

from mlflow_lmeval.callback import LMEvalCallback
from mlflow_lmeval.pipeline import stages
from mlflow_lmeval.tracking import (
    TrackingWarning,
    TrainingRun,
    flatten_metrics,
    publish,
    publish_results,
    read_results,
    sync,
)
from mlflow_lmeval.tracking import store as tracking_store

KIND = "mlflow.experimentKind"
EVALUATED_AT_MS = int(RESULTS["date"] * 1000)  # lm-eval's "date" of the results dirs make_results_dir writes


def live_scores(acc):
    """What an injected live evaluator returns (lm-eval's shape)."""
    return lambda params: {"results": {"pydoc_nextsentence": {"acc,none": acc, "acc_stderr,none": 0.01}}}


def points(client, run_id, key):
    return sorted((p.step, p.value) for p in client.get_metric_history(run_id, key))


def test_checkpoint_and_live_evaluations_draw_two_curves_on_the_training_run(store, tmp_path):
    callback = LMEvalCallback(live_scores(0.9), spool_dir=tmp_path / "spool", process_index=lambda: 0)
    with TrainingRun(tracking_uri=store, experiment="curves", spool_dir=tmp_path / "spool") as run:
        for step in (100, 200):
            callback(step, None)
            run.log_checkpoint(step, make_checkpoint(tmp_path, step, run.run_id))
    accs = {100: 0.3, 200: 0.5}
    outcomes = {step: publish_results(make_results_dir(tmp_path, step, run_id=run.run_id, acc=acc), tracking_uri=store)
                for step, acc in accs.items()}

    client = MlflowClient(store)
    # Same steps, same task, both kept: the live evaluations under lmeval_live/, the checkpoints' under lmeval/.
    assert points(client, run.run_id, "lmeval_live/pydoc_nextsentence/acc") == [(100, 0.9), (200, 0.9)]
    assert points(client, run.run_id, "lmeval/pydoc_nextsentence/acc") == [(100, 0.3), (200, 0.5)]
    assert {p.timestamp for p in client.get_metric_history(run.run_id, "lmeval/pydoc_nextsentence/acc")} == {
        EVALUATED_AT_MS}  # the evaluation's own time: what makes a repeat a no-op
    for step, outcome in outcomes.items():  # every metric and stderr of the child is on the parent at its step
        child = client.get_run(outcome.run_id)
        assert child.data.tags["mlflow.parentRunId"] == run.run_id
        for key, value in child.data.metrics.items():
            assert (step, value) in points(client, run.run_id, key), key

    before = _snapshot(client, store)
    for step in accs:  # publishing again (CLI, pipeline, sync all come here) adds no point
        assert publish_results(tmp_path / "out" / f"step_{step}", tracking_uri=store).created is False
    assert _snapshot(client, store) == before


def test_an_evaluation_published_without_its_curve_point_catches_up(store, tmp_path, monkeypatch):
    with TrainingRun(tracking_uri=store) as run:
        run.log_checkpoint(300, make_checkpoint(tmp_path, 300, run.run_id))
    directory = make_results_dir(tmp_path, 300, run_id=run.run_id)
    # As an older version published it: the evaluation run, nothing on the training run.
    monkeypatch.setattr(publish, "_log_points_once", lambda *args, **kwargs: False)
    first = publish_results(directory, tracking_uri=store)
    client = MlflowClient(store)
    assert not any(key.startswith("lmeval/") for key in client.get_run(run.run_id).data.metrics)
    monkeypatch.undo()

    again = publish_results(directory, tracking_uri=store)
    assert (again.run_id, again.created) == (first.run_id, False)  # no second evaluation run
    expected = flatten_metrics(read_results(directory))
    assert {k: v for k, v in client.get_run(run.run_id).data.metrics.items() if k.startswith("lmeval/")} == expected
    before = _snapshot(client, store)
    assert sync([directory], tracking_uri=store)[0].created is False
    assert _snapshot(client, store) == before


def test_an_evaluation_published_before_its_spooled_training_run_becomes_its_child(store, tmp_path, dead_uri):
    spool = tmp_path / "spool"
    with pytest.warns(TrackingWarning, match="unreachable"):
        with TrainingRun(tracking_uri=dead_uri, experiment="mlflow_lmeval", spool_dir=spool) as run:
            run.log_checkpoint(100, make_checkpoint(tmp_path, 100, run.reference))
    mlflow.set_tracking_uri(None)
    directory = make_results_dir(tmp_path, 100, run_id=run.reference)
    with pytest.warns(TrackingWarning, match="without a parent link"):
        orphan = publish_results(directory, tracking_uri=store)
    client = MlflowClient(store)
    assert "mlflow.parentRunId" not in client.get_run(orphan.run_id).data.tags

    sync([spool, directory], tracking_uri=store)
    training = store_run(client, run.reference)
    evaluation = client.get_run(orphan.run_id)
    assert evaluation.data.tags["mlflow.parentRunId"] == training.info.run_id
    assert evaluation.data.tags["lmeval.training_run_id"] == training.info.run_id
    assert points(client, training.info.run_id, "lmeval/pydoc_nextsentence/acc") == [(100, 0.2)]


def store_run(client, reference):
    run = tracking_store.get_run_or_none(client, reference)
    assert run is not None, f"{reference} not in the store"
    return run


def test_a_training_run_spooled_in_an_outage_arrives_whole_once_the_server_is_up(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "server").mkdir()
    server, spool = MlflowServer(tmp_path / "server"), tmp_path / "spool"  # not started yet: a dead port
    callback = LMEvalCallback(live_scores(0.7), every_n_steps=100, spool_dir=spool, tracking_uri=server.uri,
                              process_index=lambda: 0)
    try:
        with pytest.warns(TrackingWarning, match="unreachable"):
            with TrainingRun(tracking_uri=server.uri, experiment="curves", params={"lr": 0.1, "model": {"dim": 8}},
                             spool_dir=spool) as run:
                for step in (50, 100, 150, 200):
                    run.log_metrics(step, {"loss": 4.0 / step, "tokens_per_s": 10.0 * step})
                    callback(step, None)
                    if step % 100 == 0:
                        run.log_checkpoint(step, make_checkpoint(tmp_path, step, run.reference))
        assert run.run_id is None
        for step, acc in ((100, 0.3), (200, 0.5)):  # evaluations of the checkpoints, made offline too
            make_results_dir(tmp_path, step, run_id=run.reference, acc=acc)

        server.start()
        # The report stage attaches its charts to the training run the results name: not yet here.
        monkeypatch.chdir(tmp_path)
        (tmp_path / "results").symlink_to(tmp_path / "out")  # the pipeline's results/<checkpoint>/
        (tmp_path / "reports").mkdir()
        for name in stages.REPORT_FILES:
            (tmp_path / "reports" / name).write_text(name)
        report_params = {"tracking": SimpleNamespace(enabled=True, tracking_uri=server.uri, experiment="curves")}
        with pytest.warns(UserWarning, match=f"training run {run.reference} is not in"):
            stages._log_report_to_training_runs(report_params)
        outcomes = sync([spool, tmp_path / "out"], tracking_uri=server.uri)
        client = MlflowClient(server.uri)
        training = store_run(client, run.reference)
        run_id = training.info.run_id
        assert training.info.status == "FINISHED" and training.data.tags["lmeval.kind"] == "training"
        assert training.data.params == {"lr": "0.1", "model.dim": "8"}
        assert points(client, run_id, "loss") == [(s, 4.0 / s) for s in (50, 100, 150, 200)]
        assert points(client, run_id, "tokens_per_s") == [(s, 10.0 * s) for s in (50, 100, 150, 200)]
        assert points(client, run_id, "lmeval_live/pydoc_nextsentence/acc") == [(100, 0.7), (200, 0.7)]
        assert points(client, run_id, "lmeval/pydoc_nextsentence/acc") == [(100, 0.3), (200, 0.5)]
        models = {m.model_id: m for m in client.search_logged_models([training.info.experiment_id]).to_list()}
        assert sorted((o.step, models[o.model_id].params["step"]) for o in training.outputs.model_outputs) == [
            (100, "100"), (200, "200")]
        children = client.search_runs([training.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
        assert sorted(int(c.data.tags["lmeval.checkpoint_step"]) for c in children) == [100, 200]
        assert {o.run_id for o in outcomes} == {run_id} | {c.info.run_id for c in children}
        assert client.get_experiment(training.info.experiment_id).tags[KIND] == "custom_model_development"

        before = _snapshot(client, server.uri)
        assert [o.created for o in sync([spool, tmp_path / "out"], tracking_uri=server.uri)] == [False] * 4
        assert _snapshot(client, server.uri) == before  # no run, no point, no model added
        stages._log_report_to_training_runs(report_params)  # the spooled reference now finds the run
        assert sorted(a.path for a in client.list_artifacts(run_id, "report")) == [f"report/{n}" for n in sorted(stages.REPORT_FILES)]
    finally:
        server.stop()
        mlflow.set_tracking_uri(None)


def test_an_outage_mid_training_spools_the_rest_into_the_same_run(store, tmp_path, dead_uri):
    spool = tmp_path / "spool"
    with pytest.warns(TrackingWarning, match="unreachable"):
        with TrainingRun(tracking_uri=store, spool_dir=spool) as run:
            for step in range(1, 7):
                run.tracking_uri = dead_uri if step >= 3 else store  # the server goes away at step 3
                run.log_metrics(step, {"loss": 1.0 / step})
                if step == 4:
                    run.log_checkpoint(step, make_checkpoint(tmp_path, 100, run.run_id))
    client = MlflowClient(store)
    assert points(client, run.run_id, "loss") == [(1, 1.0), (2, 0.5)]

    sync([spool], tracking_uri=store)
    assert points(client, run.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 7)]
    assert [o.step for o in client.get_run(run.run_id).outputs.model_outputs] == [4]
    before = _snapshot(client, store)
    sync([spool], tracking_uri=store)
    assert _snapshot(client, store) == before
    assert len(client.search_runs([client.get_run(run.run_id).info.experiment_id])) == 1


def test_experiments_are_marked_as_model_development_unless_marked_otherwise(store):
    client = MlflowClient(store)
    created = tracking_store.ensure_experiment(client, "fresh", store)
    assert client.get_experiment(created).tags[KIND] == "custom_model_development"
    unmarked = client.create_experiment("older")
    assert KIND not in client.get_experiment(unmarked).tags
    assert tracking_store.ensure_experiment(client, "older", store) == unmarked
    assert client.get_experiment(unmarked).tags[KIND] == "custom_model_development"
    chosen = client.create_experiment("chat", tags={KIND: "genai_development"})
    assert tracking_store.ensure_experiment(client, "chat", store) == chosen
    assert client.get_experiment(chosen).tags[KIND] == "genai_development"


def test_the_run_description_is_lm_evals_results_table(store, tmp_path):
    directory = make_results_dir(tmp_path, 200, acc=0.4375)
    outcome = publish_results(directory, tracking_uri=store)
    description = MlflowClient(store).get_run(outcome.run_id).data.tags["mlflow.note.content"]
    assert description == make_table(json.loads((directory / "results.json").read_text()))
    header = description.splitlines()[0]
    assert all(column in header for column in ("Tasks", "Version", "Filter", "n-shot", "Metric", "Value", "Stderr"))
    rows = [line for line in description.splitlines() if "|acc_norm" in line or "|acc " in line]
    assert any("0.4375" in row for row in rows)  # the scores at a glance
    assert sum("|pydoc_" in line for line in description.splitlines()) == 4  # one block per task
