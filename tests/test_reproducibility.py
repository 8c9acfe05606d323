"""What reproduces: checkpoints are byte-identical for the same parameters, and evaluating one
committed checkpoint agrees across the CPU instruction sets XLA compiles for."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from mlflow_lmeval import load
from mlflow_lmeval.models import mlstm
from mlflow_lmeval.models.checkpoint import PARAMS_DIR, fingerprint, save_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "repro_mlstm" / "step_40"  # make_fixture.py beside it writes it
# XLA_FLAGS of each run: the two caps every x86-64 CPU of the last decade can run, and the host's own
# (AVX-512 on the machine these tests were written on; on an AVX2-only CPU it repeats the AVX2 run).
CAPS = {"SSE4_2": "--xla_cpu_max_isa=SSE4_2", "AVX2": "--xla_cpu_max_isa=AVX2", "host": ""}
# Why 1e-5 relative. A cap changes only how XLA vectorizes, so only the order of float32 sums: the
# dot products over 32-64 features, the log-sum-exp over 512 logits, the state update per token.
# A reordered float32 sum of n terms moves by about sqrt(n) * 2**-24 of its terms' magnitude: a
# few 1e-7 relative on each token's log-probability. A request's log-likelihood sums same-signed
# terms, so its relative error is no larger than its terms', and the forget gate keeps the error
# carried in the recurrent state from growing over a document. 1e-5 leaves a factor of 10 or more.
RELATIVE = 1e-5
# Two choices closer than this may swap places under another summation order: a "near-tie".
NEAR_TIE = 1e-4


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by its relative name."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_saves_of_the_same_params_are_byte_identical(tmp_path, tokenizer, tiny_config):
    params = mlstm.init_params(tiny_config, seed=3)
    first = save_checkpoint(tmp_path / "a", step=5, config=tiny_config, params=params, tokenizer=tokenizer)
    second = save_checkpoint(tmp_path / "b", step=5, config=tiny_config, params=params, tokenizer=tokenizer)
    a, b = tree_bytes(first), tree_bytes(second)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    # one zarr array directory per leaf, named by its path in the tree
    assert sum(name.endswith("/.zarray") for name in a) == len(jax.tree.leaves(params))
    loaded = load(first)
    assert loaded.fingerprint == fingerprint(tiny_config, params, tokenizer.model_bytes)
    for saved, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        assert saved.dtype == restored.dtype and np.array_equal(np.asarray(saved), np.asarray(restored))


def test_a_checkpoint_in_the_old_ocdbt_layout_still_loads(tmp_path, tokenizer, tiny_config):
    import orbax.checkpoint as ocp

    params = mlstm.init_params(tiny_config, seed=4)
    path = save_checkpoint(tmp_path, step=2, config=tiny_config, params=params, tokenizer=tokenizer)
    expected = load(path).fingerprint
    # What save_checkpoint wrote until the layout was made deterministic: orbax's defaults (OCDBT).
    (old := path / PARAMS_DIR).rename(path / "new_params")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(old, params)
    checkpointer.wait_until_finished()
    assert (old / "manifest.ocdbt").is_file()
    loaded = load(path)
    assert loaded.fingerprint == expected
    for saved, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        assert np.array_equal(np.asarray(saved), np.asarray(restored))


def _evaluate_under(flags: str, local_tasks, output: Path) -> subprocess.Popen:
    directory, names = local_tasks
    tasks = [n for n in names if n.endswith(("_lastword", "_nextsentence", "_rolling"))]
    env = {**os.environ, "XLA_FLAGS": flags}
    # Each run compiles for itself: a shared persistent XLA cache could hand one cap's code to another.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "mlflow_lmeval.cli", "evaluate", "--checkpoint", str(FIXTURE), "--tasks", ",".join(tasks),
               "--include_path", str(directory), "--output_path", str(output), "--limit", "6", "--log_samples",
               "--no_tracking", "--no_cache", "--bootstrap_iters", "0"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _samples(output: Path) -> dict[str, dict[str, list]]:
    """{task: {doc_id: filtered_resps}} from the --log_samples files."""
    samples = {}
    for path in output.glob("samples_*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        samples[path.stem.removeprefix("samples_")] = {str(s["doc_id"]): s["filtered_resps"] for s in lines}
    return samples


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def _differences(reference: dict, other: dict) -> tuple[float, list[str]]:
    """(largest relative difference of any log-likelihood, what disagrees beyond the bounds)."""
    worst, problems = 0.0, []
    for task, docs in reference.items():
        assert docs.keys() == other[task].keys(), task
        for doc, resps in docs.items():
            theirs = other[task][doc]
            if all(isinstance(r, list) for r in resps):  # [loglik, is_greedy] per choice
                ours_ll, theirs_ll = [float(r[0]) for r in resps], [float(r[0]) for r in theirs]
                ranked = sorted(ours_ll, reverse=True)
                near_tie = len(ranked) > 1 and ranked[0] - ranked[1] < NEAR_TIE
                if not near_tie and int(np.argmax(ours_ll)) != int(np.argmax(theirs_ll)):
                    problems.append(f"{task} doc {doc}: the chosen answer differs")
                if [r[1] for r in resps] != [r[1] for r in theirs]:
                    problems.append(f"{task} doc {doc}: is_greedy differs")
            else:  # loglikelihood_rolling: one float
                ours_ll, theirs_ll = [float(resps[0])], [float(theirs[0])]
            for x, y in zip(ours_ll, theirs_ll):
                worst = max(worst, _relative(x, y))
                if _relative(x, y) > RELATIVE:
                    problems.append(f"{task} doc {doc}: log-likelihood {x!r} vs {y!r}")
    return worst, problems


def test_evaluating_one_checkpoint_agrees_across_isa_caps(local_tasks, tmp_path):
    assert load(FIXTURE).step == 40  # the committed fixture loads and its fingerprint verifies
    runs = {cap: _evaluate_under(flags, local_tasks, tmp_path / cap) for cap, flags in CAPS.items()}
    for cap, run in runs.items():
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, f"{cap}: {err[-2000:]}"
    reference = _samples(tmp_path / "SSE4_2")
    assert len(reference) == 3 and all(len(docs) == 6 for docs in reference.values())
    for cap in ("AVX2", "host"):
        worst, problems = _differences(reference, _samples(tmp_path / cap))
        assert problems == [], f"SSE4_2 vs {cap}"
        ours = json.loads((tmp_path / "SSE4_2" / "results.json").read_text())["results"]
        theirs = json.loads((tmp_path / cap / "results.json").read_text())["results"]
        worst_metric = 0.0
        for task, metrics in ours.items():
            for name, value in metrics.items():
                if not isinstance(value, float) or "stderr" in name or not math.isfinite(value):
                    continue
                if name.startswith("acc"):  # a mean of 0/1: equal, since no choice flipped above
                    assert theirs[task][name] == value, f"{cap}: {task} {name}"
                else:  # perplexities, bits per byte, mean token log-likelihood
                    worst_metric = max(worst_metric, _relative(value, theirs[task][name]))
                    assert _relative(value, theirs[task][name]) <= RELATIVE, f"{cap}: {task} {name} {value} vs {theirs[task][name]}"
        print(f"SSE4_2 vs {cap}: largest relative difference {worst:.2e} (a log-likelihood), {worst_metric:.2e} (a metric)")


# ---- dvc.lock: what a DVC stage writes holds content only ------------------------------------------


def _evaluate_as_stage(clone: Path, local_tasks, monkeypatch) -> Path:
    """Evaluate the committed checkpoint as the pipeline's evaluate stage does in a clone at ``clone``:
    run from its root (DVC_ROOT), the checkpoint inside it, no response cache shared with another."""
    from mlflow_lmeval import evaluate
    from mlflow_lmeval.config import EvalConfig

    directory, names = local_tasks
    checkpoint = clone / "checkpoints" / "step_40"
    shutil.copytree(FIXTURE, checkpoint)
    monkeypatch.chdir(clone)
    monkeypatch.setenv("DVC_ROOT", str(clone))
    monkeypatch.setenv("DVC_STAGE", "evaluate@step_40")
    tasks = [n for n in names if n.endswith("_rolling")]
    evaluate(checkpoint, EvalConfig(evaluation_tasks=tasks, include_path=str(directory), output_path="results/step_40",
                                    limit_requests=3, bootstrap_iters=10, response_cache=False), show_progress=False)
    return clone / "results" / "step_40"


def test_results_written_in_a_dvc_stage_are_the_same_bytes_in_two_clones(local_tasks, tmp_path, monkeypatch):
    first = _evaluate_as_stage(tmp_path / "a", local_tasks, monkeypatch)
    second = _evaluate_as_stage(tmp_path / "b", local_tasks, monkeypatch)
    results = json.loads((first / "results.json").read_text())
    assert "date" not in results  # lm-eval's wall clock
    assert results["checkpoint"]["path"] == "checkpoints/step_40"  # relative to DVC_ROOT
    assert results["checkpoint"]["fingerprint"] == load(FIXTURE).fingerprint
    assert tree_bytes(first) == tree_bytes(second)


def test_a_dateless_results_json_publishes_once_and_finds_its_training_run_by_fingerprint(store, tmp_path):
    from types import SimpleNamespace

    from mlflow import MlflowClient
    from test_tracking import make_checkpoint, make_results_dir

    from mlflow_lmeval.pipeline import stages
    from mlflow_lmeval.tracking import TrainingRun, publish_results

    with TrainingRun(tracking_uri=store) as run:  # as the train stage: the checkpoint names no run
        run.log_checkpoint(100, make_checkpoint(tmp_path, 100, None))
    directory = make_results_dir(tmp_path, 100)  # nor does its evaluation
    path = directory / "results.json"
    results = json.loads(path.read_text())
    del results["date"]  # as written in a DVC stage
    path.write_text(json.dumps(results))
    first = publish_results(directory, tracking_uri=store)
    os.utime(path, (path.stat().st_mtime + 3600,) * 2)  # a `dvc checkout` writes the file anew
    second = publish_results(directory, tracking_uri=store)
    assert first.created and not second.created and second.run_id == first.run_id

    client = MlflowClient(store)
    evaluation = client.get_run(first.run_id)
    assert evaluation.data.tags["mlflow.parentRunId"] == run.run_id
    # Timed by the evaluation run's start, which a second publish finds again: each point once.
    started = evaluation.info.start_time
    assert [(p.step, p.timestamp) for p in client.get_metric_history(first.run_id, "lmeval/pydoc_nextsentence/acc")] == [
        (100, started)]
    curve = client.get_metric_history(run.run_id, "lmeval/pydoc_nextsentence/acc")
    assert [(p.step, p.value, p.timestamp) for p in curve] == [(100, 0.2, started)]

    # The report stage finds the training run the same way.
    (tmp_path / "results").symlink_to(tmp_path / "out")  # the pipeline's results/<checkpoint>/; cwd is tmp_path
    (tmp_path / "reports").mkdir()
    for name in stages.REPORT_FILES:
        (tmp_path / "reports" / name).write_text(name)
    stages._log_report_to_training_runs({"tracking": SimpleNamespace(enabled=True, tracking_uri=store, experiment=None)})
    assert sorted(a.path for a in client.list_artifacts(run.run_id, "report")) == [
        f"report/{name}" for name in sorted(stages.REPORT_FILES)]
