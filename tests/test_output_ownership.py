"""An evaluation owns its output directory's files, and only those: what is stale of an earlier
evaluation there is removed, a user's file is neither overwritten nor published; ``compare`` says
what it drops; a LoggedModel keeps a full evaluation's value apart from a limited one's.

Real evaluations of a tiny random model on a local task of a few short documents, run once for
the module; the tests only read their directories (or copies of them)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mlflow_lmeval import EvalConfig
from mlflow_lmeval.compare import compare
from mlflow_lmeval.compare_report import render_table
from mlflow_lmeval.errors import UserError
from mlflow_lmeval.evaluation import run_evaluation
from mlflow_lmeval.models import mlstm
from mlflow_lmeval.tracking import flatten_metrics, publish_results

SENTENCES = [
    "The list is sorted in place.", "A tuple cannot change.", "Each key maps to one value.",
    "The loop ends when the iterator is exhausted.", "A set holds each element once.",
    "The function returns None by default.", "Strings are immutable sequences.", "The file is closed on exit.",
]
FINGERPRINT = "sha256:" + "ab" * 32


def _write_task(directory: Path, name: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": s.rsplit(" ", 1)[0], "target": " " + s.rsplit(" ", 1)[1]}) + "\n"
                            for s in SENTENCES))
    (directory / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{text}}", "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }))


class Evaluations:
    """Runs evaluations of one tiny model on the tasks ``alpha`` and ``beta``."""

    def __init__(self, tokenizer, tasks_dir: Path):
        config = mlstm.MLSTMConfig(vocab_size=tokenizer.vocab_size, embed_dim=32, num_layers=1, num_heads=2).validate()
        self.model, self.tokenizer, self.tasks_dir = mlstm.as_language_model(config, mlstm.init_params(config)), tokenizer, tasks_dir

    def config(self, output: Path, tasks=("alpha",), **settings) -> EvalConfig:
        # No response cache: each evaluation must compute its own scores, or a comparison of two is vacuous.
        return EvalConfig(evaluation_tasks=tuple(tasks), include_path=str(self.tasks_dir), output_path=str(output),
                          bootstrap_iters=0, batch_size=4, response_cache=False, **settings)

    def run(self, output: Path, tasks=("alpha",), **settings) -> dict:
        checkpoint = {"path": None, "step": 5, "fingerprint": FINGERPRINT, "mlflow_run_id": None}
        return run_evaluation(self.model, self.tokenizer, self.config(output, tasks, **settings), checkpoint,
                              show_progress=False)


@pytest.fixture(scope="module")
def evaluations(tokenizer, tmp_path_factory):
    tasks_dir = tmp_path_factory.mktemp("tasks")
    for name in ("alpha", "beta"):
        _write_task(tasks_dir, name)
    return Evaluations(tokenizer, tasks_dir)


@pytest.fixture(scope="module")
def runs(evaluations, tmp_path_factory):
    """``both``: alpha and beta with samples; ``reused``: the same directory evaluated again on
    alpha alone, with a user's files in it; ``limited``: alpha on its first 3 documents."""
    root = tmp_path_factory.mktemp("runs")
    evaluations.run(root / "reused", ("alpha", "beta"), log_samples=True)
    shutil.copytree(root / "reused", root / "both")
    (root / "reused" / "notes.txt").write_text("mine\n")
    (root / "reused" / "samples_mine.jsonl").write_text('{"mine": 1}\n')
    evaluations.run(root / "reused", ("alpha",), log_samples=True)
    evaluations.run(root / "limited", ("alpha",), limit_requests=3)
    return root


def _scores(run) -> dict[str, float]:
    """A run's metrics but the loss by position (its steps are positions, not from the results)."""
    return {key: value for key, value in run.data.metrics.items() if not key.endswith("/nll_by_position")}


def _files(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def test_a_reused_directory_loses_the_stale_samples_and_keeps_the_users_files(runs):
    assert _files(runs / "both") == {"results.json", "samples_alpha.jsonl", "samples_beta.jsonl"}
    # beta's samples were the earlier evaluation's: stale now. notes.txt and samples_mine.jsonl are
    # no evaluation's: left as they were.
    assert _files(runs / "reused") == {"results.json", "samples_alpha.jsonl", "notes.txt", "samples_mine.jsonl"}
    assert (runs / "reused" / "samples_mine.jsonl").read_text() == '{"mine": 1}\n'
    results = json.loads((runs / "reused" / "results.json").read_text())
    assert set(results["results"]) == {"alpha"} and results["samples_files"] == {"alpha": "samples_alpha.jsonl"}
    assert len((runs / "reused" / "samples_alpha.jsonl").read_text().splitlines()) == len(SENTENCES)


def test_publishing_sends_only_the_samples_results_json_lists(runs, store, tmp_path):
    directory = shutil.copytree(runs / "reused", tmp_path / "reused")
    outcome = publish_results(directory, tracking_uri=store)
    client = MlflowClient(store)
    assert [a.path for a in client.list_artifacts(outcome.run_id, "samples")] == ["samples/samples_alpha.jsonl"]
    assert _scores(client.get_run(outcome.run_id)) == flatten_metrics(json.loads((directory / "results.json").read_text()))


def test_results_json_without_a_listing_publishes_only_its_own_tasks_samples(runs, store, tmp_path):
    """A results dir an earlier version left: a piqa-only results.json beside an earlier lambada
    evaluation's samples. Only the samples of the tasks results.json holds are its own."""
    directory = shutil.copytree(runs / "both", tmp_path / "old")
    results = json.loads((directory / "results.json").read_text())
    results.pop("samples_files", None)  # (an earlier version wrote none)
    del results["results"]["beta"]
    (directory / "results.json").write_text(json.dumps(results))
    outcome = publish_results(directory, tracking_uri=store)
    artifacts = MlflowClient(store).list_artifacts(outcome.run_id, "samples")
    assert [a.path for a in artifacts] == ["samples/samples_alpha.jsonl"]


@pytest.mark.parametrize("name, content", [("samples_alpha.jsonl", '{"mine": 1}\n'), ("results.json", '{"mine": 1}\n')],
                         ids=["samples", "results"])
def test_a_users_file_in_the_way_is_refused_before_the_work(evaluations, tmp_path, monkeypatch, name, content):
    def work(*args, **kwargs):
        raise AssertionError("the evaluation began")

    monkeypatch.setattr("mlflow_lmeval.evaluation.run_lm_eval", work)
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=rf"{name} was not written by (an|the) evaluation.*not overwriting it"):
        evaluations.run(tmp_path, ("alpha",), log_samples=True)
    assert _files(tmp_path) == {name} and (tmp_path / name).read_text() == content


def test_compare_names_the_tasks_it_drops_and_each_sides_shots_and_limit(runs):
    comparison = compare(runs / "both", runs / "reused", iterations=200)
    assert (comparison.only_a, comparison.only_b) == (["beta"], [])
    assert {row.task for row in comparison.rows} == {"alpha"}
    table = render_table(comparison)
    assert "- beta: only in A" in table
    assert f"`{runs / 'both'}` (step 5; 0-shot; no limit)" in table
    assert f"`{runs / 'reused'}` (step 5; 0-shot; no limit)" in table


def test_compare_reads_no_stale_samples(runs, tmp_path):
    """An evaluation without samples, beside a samples file of an earlier one: not its samples."""
    directory = shutil.copytree(runs / "limited", tmp_path / "limited")
    shutil.copy(runs / "both" / "samples_alpha.jsonl", directory)
    with pytest.raises(UserError, match=r"no per-document samples for task alpha"):
        compare(runs / "both", directory, iterations=10)


def test_a_limited_evaluation_never_overwrites_a_full_ones_value_on_the_model(runs, store, tmp_path):
    """Full first, then limited, both of one checkpoint: the model holds each value under its own
    dataset, and MLflow's runs hold exactly what each results.json says."""
    full = shutil.copytree(runs / "reused", tmp_path / "full")
    limited = shutil.copytree(runs / "limited", tmp_path / "limited")
    client = MlflowClient(store)
    outcomes = [publish_results(directory, tracking_uri=store) for directory in (full, limited)]
    values = {}
    for directory, outcome in zip((full, limited), outcomes, strict=True):
        results = json.loads((directory / "results.json").read_text())
        run = client.get_run(outcome.run_id)
        assert _scores(run) == flatten_metrics(results)
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs if d.dataset.name == "alpha"]
        values[dataset.digest] = run.data.metrics["lmeval/alpha/perplexity"]
    assert len(values) == 2, "the full and the limited evaluation must be two datasets"
    assert outcomes[0].model_id == outcomes[1].model_id
    model = client.get_logged_model(outcomes[0].model_id)
    held = {}
    for metric in model.metrics:
        if metric.key == "lmeval/alpha/perplexity":
            assert metric.dataset_name == "alpha"
            held.setdefault(metric.dataset_digest, []).append(metric.value)
    assert held == {digest: [value] for digest, value in values.items()}


def test_dataset_digest_keys_on_the_documents_scored_shots_and_settings(runs):
    from mlflow_lmeval.tracking.identity import dataset_digest

    results = json.loads((runs / "reused" / "results.json").read_text())
    base = dataset_digest(results, "alpha")

    def changed(edit) -> str:
        other = copy.deepcopy(results)
        edit(other)
        return dataset_digest(other, "alpha")

    assert base != dataset_digest(json.loads((runs / "limited" / "results.json").read_text()), "alpha")
    assert changed(lambda r: r["n-shot"].update(alpha=2)) != base
    assert changed(lambda r: r["eval_config"].update(dtype="bfloat16")) != base
    # Not what else was evaluated alongside, nor a limit the task's size made no limit.
    assert changed(lambda r: r["eval_config"].update(evaluation_tasks=["alpha", "beta"])) == base
    assert changed(lambda r: (r["eval_config"].update(limit_requests=100), r["config"].update(limit=100))) == base
