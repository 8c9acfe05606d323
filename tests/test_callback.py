"""LMEvalCallback in toy JAX training loops, logging into real MLflow (SQLite) or a dead server."""

from __future__ import annotations

import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mlflow import MlflowClient

from mlflow_lmeval import tracking
from mlflow_lmeval.callback import LMEvalCallback, flush_spool, pending_spool_entries
from mlflow_lmeval.errors import UserError
from mlflow_lmeval.tracking import TrackingWarning, TrainingRun


def fake_lm_eval(params):
    """Stands in for the injected evaluator: lm-eval's result shape, JAX/numpy scalars as values."""
    weight = params["w"] if params is not None else jnp.zeros(4)
    return {
        "results": {
            "toy_task": {
                "alias": "toy_task", "sample_len": 8,
                "acc,none": jnp.mean(weight > 0.5), "acc_stderr,none": np.float32(0.125),
                "perplexity,none": jnp.exp(jnp.mean((weight - 1.0) ** 2)), "perplexity_stderr,none": "N/A",
            }
        },
        "versions": {"toy_task": 1.0},
        "n-shot": {"toy_task": 0},
        "configs": {"toy_task": {"task": "toy_task", "output_type": "loglikelihood"}},
        "samples": {"toy_task": [{"doc_id": 0}]},
    }


def toy_training(steps, on_step, log=None):
    """Real JAX: gradient descent of 4 weights towards 1; ``on_step(step, params)`` after each step."""
    params = {"w": jnp.zeros(4)}
    loss_fn = lambda p: jnp.mean((p["w"] - 1.0) ** 2)
    step_fn = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 1.0 * g, p, jax.grad(loss_fn)(p)))
    for step in range(1, steps + 1):
        params = step_fn(params)
        if log is not None:
            log(step, {"loss": loss_fn(params)})
        on_step(step, params)
    return params


def history(client, run_id, key):
    return [(point.step, point.value) for point in client.get_metric_history(run_id, key)]


def test_callback_logs_eval_metrics_at_the_right_steps_of_the_active_run(store, tmp_path):
    calls = []
    callback = LMEvalCallback(lambda p: calls.append(1) or fake_lm_eval(p), every_n_steps=4,
                              spool_dir=tmp_path / "spool", process_index=lambda: 0)
    with TrainingRun(tracking_uri=store, experiment="toy") as run:
        toy_training(12, callback, log=run.log_metrics)
    assert len(calls) == 3
    client = MlflowClient(store)
    acc = history(client, run.run_id, "lmeval_live/toy_task/acc")
    assert [step for step, _ in acc] == [4, 8, 12]
    assert acc == [(step, callback.history[step]["lmeval_live/toy_task/acc"]) for step in (4, 8, 12)]
    assert acc[-1][1] == 1.0  # the weights passed 0.5 by then: the live params were evaluated
    assert [s for s, _ in history(client, run.run_id, "lmeval_live/toy_task/acc_stderr")] == [4, 8, 12]
    assert "lmeval_live/toy_task/perplexity_stderr" not in client.get_run(run.run_id).data.metrics  # "N/A"
    assert all(type(v) is float for metrics in callback.history.values() for v in metrics.values())
    assert [s for s, _ in history(client, run.run_id, "loss")] == list(range(1, 13))
    assert pending_spool_entries(tmp_path / "spool") == []


def test_validation_and_test_hooks_honour_the_filters(store, tmp_path):
    state = {"params": {"w": jnp.full(4, 0.7)}}
    callback = LMEvalCallback(fake_lm_eval, every_n_steps=30, every_n_epochs=2, spool_dir=tmp_path / "spool",
                              params_fn=lambda: state["params"], process_index=lambda: 0)
    with TrainingRun(tracking_uri=store) as run:
        for epoch in range(1, 6):
            callback.on_validation_epoch_start(epoch, epoch * 10)  # epochs 2, 4; step 30
            callback.on_validation_epoch_start(epoch, epoch * 10)  # same step again: not twice
        callback.on_test_epoch_start(5)  # always, at the last step seen
    points = history(MlflowClient(store), run.run_id, "lmeval_live/toy_task/acc")
    assert points == [(20, 1.0), (30, 1.0), (40, 1.0), (50, 1.0)]


def test_only_process_zero_logs_but_every_process_evaluates(store, tmp_path):
    calls = []
    callback = LMEvalCallback(lambda p: calls.append(1) or fake_lm_eval(p), spool_dir=tmp_path / "spool",
                              process_index=lambda: 1)
    with TrainingRun(tracking_uri=store) as run:
        toy_training(3, callback)
    assert len(calls) == 3  # collectives of a sharded model need every host in the evaluation
    assert MlflowClient(store).get_run(run.run_id).data.metrics == {}
    assert not (tmp_path / "spool").exists()


def test_training_finishes_with_a_dead_server_and_the_spool_syncs_later(store, tmp_path, dead_uri):
    spool = tmp_path / "spool"
    callback = LMEvalCallback(fake_lm_eval, every_n_steps=3, spool_dir=spool, tracking_uri=dead_uri,
                              process_index=lambda: 0)
    started = time.monotonic()
    with pytest.warns(TrackingWarning) as caught:
        with TrainingRun(tracking_uri=dead_uri, params={"lr": 0.2}, spool_dir=spool) as run:
            final = toy_training(9, callback, log=run.log_metrics)
            assert run.log_checkpoint(9, tmp_path / "nowhere") is None
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"a dead server slowed training by {elapsed:.0f} s"
    assert float(final["w"][0]) > 0.99  # training ran to the end (1 - 0.5**9)
    assert run.run_id is None and run.unavailable and run.reference.startswith("spooled:")
    messages = [str(w.message) for w in caught]
    assert any("unreachable" in m and dead_uri in m and str(spool) in m for m in messages)
    assert len(messages) <= 3  # warned once per cause, not once per step
    entries = pending_spool_entries(spool)
    assert len(entries) == 3
    spooled = json.loads((entries[0] / "results.json").read_text())
    assert spooled["live"]["step"] == 3 and "samples" not in spooled
    assert spooled["live"]["run_id"] == run.reference  # the spooled training run, not an orphan

    # The server is gone; publish to SQLite instead. The training run is created first, and the
    # live evaluations go into it at their steps.
    outcomes = flush_spool(spool, tracking_uri=store)
    assert [o.created for o in outcomes] == [True] * 3
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("mlflow_lmeval")
    (training,) = client.search_runs([experiment.experiment_id])
    assert {o.run_id for o in outcomes} == {training.info.run_id}
    assert training.data.tags["lmeval.kind"] == "training" and training.info.status == "FINISHED"
    assert training.data.params == {"lr": "0.2"}
    assert [s for s, _ in history(client, training.info.run_id, "loss")] == list(range(1, 10))
    acc = history(client, training.info.run_id, "lmeval_live/toy_task/acc")
    assert acc == [(step, callback.history[step]["lmeval_live/toy_task/acc"]) for step in (3, 6, 9)]
    assert flush_spool(spool, tracking_uri=store) == []
    assert [o.created for o in tracking.sync([spool], tracking_uri=store)] == [False] * 3
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert len(history(client, training.info.run_id, "loss")) == 9
    assert len(history(client, training.info.run_id, "lmeval_live/toy_task/acc")) == 3


def test_outage_mid_training_spools_into_the_same_run_and_recovers(store, tmp_path, dead_uri):
    spool = tmp_path / "spool"
    callback = LMEvalCallback(fake_lm_eval, every_n_steps=2, spool_dir=spool, tracking_uri=store,
                              process_index=lambda: 0, retry_after_s=0.0, max_retries=0)
    client = MlflowClient(store)
    with TrainingRun(tracking_uri=store) as run:
        def on_step(step, params):
            # The server is down for steps 3-7: the callback's URI points at a dead port meanwhile.
            callback.tracking_uri = dead_uri if 3 <= step <= 7 else store
            callback(step, params)
            if step == 7:
                assert len(pending_spool_entries(spool)) == 2
                assert [s for s, _ in history(client, run.run_id, "lmeval_live/toy_task/acc")] == [2]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            toy_training(8, on_step)
    assert any(issubclass(w.category, TrackingWarning) for w in caught)
    # Back online at step 8: the spool was flushed into the same run, at the original steps.
    assert pending_spool_entries(spool) == []
    acc = history(client, run.run_id, "lmeval_live/toy_task/acc")
    assert sorted(step for step, _ in acc) == [2, 4, 6, 8]
    assert flush_spool(spool, tracking_uri=store) == []
    for entry in spool.iterdir():  # publishing a spooled entry again adds no point
        assert tracking.publish_results(entry, tracking_uri=store).created is False
    assert sorted(step for step, _ in history(client, run.run_id, "lmeval_live/toy_task/acc")) == [2, 4, 6, 8]


def test_invalid_filters_are_user_errors():
    with pytest.raises(UserError, match="every_n_steps"):
        LMEvalCallback(fake_lm_eval, every_n_steps=0)
