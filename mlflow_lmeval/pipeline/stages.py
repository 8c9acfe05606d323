"""The DVC stage entry points: prepare -> train -> evaluate@<checkpoint> -> publish -> report.

Each stage reads params.yaml from the working directory (DVC runs stages from the repo root) and
writes only its declared outputs.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

from ..compare_report import write_consecutive_comparisons
from ..config import EvalConfig
from ..errors import UserError
from ..results_file import RESULTS_FILE, evaluated_step, loss_by_position, read_results
from ..tokenizer import Tokenizer, train_tokenizer
from ..tracking import http_limits, resolve_tracking_uri, sync
from ..tracking.position_loss import draw_curves
from ..tracking.redact import redact_uri, scrub_text
from ..workflows import LiveEvaluation, Tracking, evaluate_and_publish, tracked_training
from .corpus import builtin_documents, chunk_words, is_heldout, text_file_documents
from .tasks import write_tasks

PREPARED = Path("data/prepared")
TASKS = Path("data/tasks")
CHECKPOINTS = Path("checkpoints")
RESULTS = Path("results")
METRICS = Path("metrics")
REPORTS = Path("reports")
# What the report stage writes under REPORTS and attaches to each training run.
REPORT_FILES = ("metrics_by_step.png", "metrics_by_step.csv", "loss_by_position.png", "loss_by_position.csv")
TASK_PREFIX = "heldout"
# Imported inside the stage that needs them, measured on this machine: the reference model and the
# training loop (JAX, 3.2 s), MLflow (2.0-2.8 s), matplotlib and Hugging Face datasets (each about
# 1 s); the prepare, evaluate and publish stages need none of them.


# ---- prepare ----------------------------------------------------------------------------------
def load_documents(params) -> list[tuple[str, str]]:
    """(name, text) documents from the configured source."""
    source = params.source
    if source == "builtin":
        return builtin_documents()
    if source.startswith("hf:"):
        return _hf_documents(source[3:], params.hf_split, params.hf_text_field, params.document_words)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"params.yaml: prepare.source: no such text file: {source}")
    return text_file_documents(path, params.document_words)


def _hf_documents(spec: str, split: str, field: str, document_words: int) -> list[tuple[str, str]]:
    name, _, config = spec.partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # offline, unknown dataset, or missing split: all one answer
        raise UserError(f"params.yaml: prepare.source: cannot load dataset {spec!r}: {str(error).splitlines()[0]}") from None
    if field not in dataset.column_names:
        raise UserError(f"params.yaml: prepare.hf_text_field: dataset has no column {field!r}")
    text = "\n".join(str(row) for row in dataset[field])
    return chunk_words(text, document_words, prefix=name)


def prepare(params) -> None:
    p = params["prepare"]
    documents = load_documents(p)
    heldout = [d for d in documents if is_heldout(d[0], p.heldout_fraction, p.seed)]
    train = [d for d in documents if not is_heldout(d[0], p.heldout_fraction, p.seed)]
    if not heldout or not train:
        raise UserError(f"params.yaml: prepare.heldout_fraction {p.heldout_fraction} leaves an empty split of {len(documents)} documents")
    PREPARED.mkdir(parents=True, exist_ok=True)
    (PREPARED / "train.txt").write_text("\n\n".join(text for _, text in train) + "\n", encoding="utf-8")
    with open(PREPARED / "heldout.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n" for name, text in heldout)
    tokenizer = train_tokenizer(PREPARED / "train.txt", p.vocab_size, PREPARED / "tokenizer.model")
    names = write_tasks(TASKS, heldout, prefix=TASK_PREFIX, seed=p.seed, data_root=Path.cwd())
    print(f"prepared {len(train)} training and {len(heldout)} held-out documents, "
          f"tokenizer of {tokenizer.vocab_size} pieces, tasks {', '.join(names)}")


def tracking(params):
    t = params["tracking"]
    return Tracking(enabled=t.enabled, tracking_uri=t.tracking_uri or None, experiment=t.experiment)


# ---- train --------------------------------------------------------------------------------------
def train(params) -> None:
    from ..models import mlstm
    from ..training import TrainSettings, encode_corpus, print_progress

    t = params["train"]
    tokenizer = Tokenizer.load(PREPARED / "tokenizer.model")
    config = mlstm.preset_config(t.model_size, tokenizer.vocab_size)
    settings = TrainSettings(
        steps=t.steps, save_steps=tuple(sorted(set(t.checkpoint_steps))), batch_size=t.batch_size,
        sequence_length=t.sequence_length, learning_rate=t.learning_rate, seed=t.seed,
    ).validate()
    tokens = encode_corpus(PREPARED / "train.txt", tokenizer)
    print(f"training {t.model_size} mLSTM ({mlstm.count_params(mlstm.init_params(config)):,} params) on {len(tokens):,} tokens", flush=True)
    live = LiveEvaluation()
    if t.eval_every:
        include = params["evaluate"].include_path
        live = LiveEvaluation(t.eval_every, EvalConfig(evaluation_tasks=t.eval_tasks, include_path=include,
                                                        limit_requests=t.eval_limit, bootstrap_iters=1000))
    # DVC hashes the checkpoints into dvc.lock, so they hold content only, not the training run's
    # random id: the link is the LoggedModel the run logs for each checkpoint, found by fingerprint.
    for path in tracked_training(tokens, tokenizer, config, settings, CHECKPOINTS, tracking=tracking(params), live=live,
                                 on_log=print_progress(t.steps), link_checkpoints=False):
        print(f"wrote {path}")


# ---- evaluate -------------------------------------------------------------------------------------
def flat_metrics(results: dict) -> dict:
    """{task: {metric: value}} of the numeric results, for `dvc metrics`."""
    flat = {}
    for task, values in results.get("results", {}).items():
        numbers = {
            key.replace(",none", "").replace(",", "/"): value
            for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("sample_len",)
        }
        flat[task] = numbers
    return flat


def evaluate(params, name: str) -> None:
    e = params["evaluate"]
    if name not in e.checkpoints:
        raise UserError(f"params.yaml: evaluate.checkpoints has no entry {name!r}")
    checkpoint = Path(str(e.checkpoints[name]))
    if not checkpoint.is_dir():
        raise UserError(f"params.yaml: evaluate.checkpoints.{name}: checkpoint directory not found: {checkpoint}")
    output = RESULTS / name
    # Publishing is best effort here: the always-run publish stage catches up, even after a
    # run-cache restore that skips this command entirely.
    results, _ = evaluate_and_publish(checkpoint, e.eval_config(str(output)), tracking(params), strict=False)
    METRICS.mkdir(exist_ok=True)
    (METRICS / f"{name}.json").write_text(json.dumps(flat_metrics(results), indent=2) + "\n")


# ---- publish ----------------------------------------------------------------------------------------
def publish(params) -> None:
    if not params["tracking"].enabled:
        print("tracking is disabled (tracking.enabled: false); nothing to publish")
        return
    t = tracking(params)
    outcomes = sync([RESULTS], tracking_uri=t.tracking_uri, experiment=t.experiment)
    created = sum(o.created for o in outcomes)
    print(f"{created} evaluation(s) published, {len(outcomes) - created} already in MLflow")


# ---- report -----------------------------------------------------------------------------------------
def collect_results(directory: Path = RESULTS) -> list[dict]:
    """One row per results dir: checkpoint (the dir's name), step, and ``<task>/<metric>`` values."""
    rows = []
    for path in sorted(directory.glob(f"*/{RESULTS_FILE}")):
        results = read_results(path.parent)
        row = {"checkpoint": path.parent.name, "step": evaluated_step(results)}
        for task, metrics in flat_metrics(results).items():
            row.update({f"{task}/{metric}": value for metric, value in metrics.items()})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["step"], r["checkpoint"]))


def write_loss_by_position(rows: list[dict], directory: Path = RESULTS) -> tuple[Path, Path]:
    """reports/loss_by_position.csv (checkpoint, step, task and one position bucket per line) and
    its chart, one line per checkpoint in each task's panel. ``rows`` are ``collect_results``'s,
    in step order. Both are written even when no evaluation has a table (windowed mode): DVC
    expects every declared output."""
    table, panels = [], {}
    for row in rows:
        for task, buckets in loss_by_position(read_results(directory / row["checkpoint"])).items():
            panels.setdefault(task, {})[f"step {row['step']}"] = buckets
            table.extend({"checkpoint": row["checkpoint"], "step": row["step"], "task": task, **b} for b in buckets)
    csv_path, png_path = REPORTS / "loss_by_position.csv", REPORTS / "loss_by_position.png"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["checkpoint", "step", "task", "start", "end", "tokens", "mean_nll"])
        writer.writeheader()
        writer.writerows(table)
    draw_curves(panels, png_path)
    return csv_path, png_path


def report(params) -> None:
    rows = collect_results()
    if not rows:
        raise UserError(f"no results to report under {RESULTS}/")
    REPORTS.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(REPORTS / "metrics_by_step.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, columns, REPORTS / "metrics_by_step.png")
    print(f"wrote {REPORTS / 'metrics_by_step.csv'} and {REPORTS / 'metrics_by_step.png'} ({len(rows)} checkpoints)")
    print("wrote {} and {}".format(*write_loss_by_position(rows)))
    # Is each checkpoint better than the one before, on the same documents? (paired tests)
    by_step = {row["step"]: RESULTS / row["checkpoint"] for row in rows}
    written = write_consecutive_comparisons(by_step, REPORTS / "comparisons", strict=False)
    if written:
        print(f"wrote {len(written)} comparison file(s) under {REPORTS / 'comparisons'}")
    if params["tracking"].enabled:
        _log_report_to_training_runs(params)


def _log_report_to_training_runs(params) -> None:
    """Attach the charts and tables to each training run that produced an evaluated checkpoint,
    found as publishing finds it (``find_training_run``: the run results.json names, else the one
    that logged the checkpoint's model, as for the pipeline's own checkpoints)."""
    evaluations = [read_results(p.parent) for p in sorted(RESULTS.glob(f"*/{RESULTS_FILE}"))]
    if not evaluations:
        return
    from mlflow import MlflowClient

    from ..tracking.publish import find_training_run

    t = tracking(params)
    uri = resolve_tracking_uri(t.tracking_uri)
    shown = redact_uri(uri)  # a warning prints no credentials
    try:
        with http_limits():
            client = MlflowClient(uri)
            runs, missing = {}, set()
            for results in evaluations:
                run, reference, _ = find_training_run(client, uri, results, t.experiment)
                if run is not None:
                    runs[run.info.run_id] = run
                elif reference:
                    missing.add(reference)
            for reference in sorted(missing):
                # A training run spooled in an outage is recorded as ``spooled:<identity>`` until
                # ``sync`` creates it; the reference finds that run once it exists.
                warnings.warn(f"training run {reference} is not in {shown} (yet: `mlflow-lmeval sync` publishes "
                              "a spooled one); the report stays on disk")
            for run_id in sorted(runs):
                for name in REPORT_FILES:
                    client.log_artifact(run_id, str(REPORTS / name), "report")
    except Exception as error:  # the report on disk is the deliverable; MLflow is a copy
        warnings.warn(f"could not attach the report to the training run in {shown}: {scrub_text(str(error).splitlines()[0])}")


def main_metrics(columns: list[str]) -> list[str]:
    """The headline metric of each task: accuracy, else bits per byte, else the first one."""
    by_task: dict[str, list[str]] = {}
    for column in columns:
        if "/" in column and "stderr" not in column:
            by_task.setdefault(column.split("/")[0], []).append(column)
    chosen = []
    for task, names in by_task.items():
        for preferred in ("acc", "bits_per_byte", "exact_match", "perplexity"):
            if f"{task}/{preferred}" in names:
                chosen.append(f"{task}/{preferred}")
                break
        else:
            chosen.append(names[0])
    return chosen


def _plot(rows: list[dict], columns: list[str], path: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    metrics = main_metrics(columns)
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        points = [(row["step"], row[metric]) for row in rows if metric in row]
        stderr = [row.get(metric + "_stderr") for row in rows if metric in row]
        steps, values = zip(*points)
        if all(isinstance(s, (int, float)) for s in stderr):
            axis.errorbar(steps, values, yerr=stderr, marker="o", capsize=3)
        else:
            axis.plot(steps, values, marker="o")
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
