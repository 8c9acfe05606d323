"""``results.json``: what an evaluation leaves on disk, and the source of truth MLflow is made to agree with.

This module alone knows the file's name, how it is written (whole or not at all), how it is read,
and what its ``checkpoint`` and ``live`` sections say. A results dir is a directory holding one.

It also owns the results dir's other files: the ``samples_<task>.jsonl`` an evaluation writes are
the ones its results.json lists (``samples_files``), and only those are read, published or, when
the directory is used again, replaced or removed. Any other file there is the user's: left alone.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .dvc_context import in_dvc_stage
from .errors import UserError
from .paths import writable_directory_problem

RESULTS_FILE = "results.json"
STAGING_FILE = RESULTS_FILE + ".partial"  # results.json before its rename: whole or not at all
SAMPLES_FILES = "samples_files"  # results.json's {task: samples file name} of the files written with it


def _json_text(results: Mapping[str, Any], default: Callable[[Any], Any] | None = None) -> str:
    return json.dumps(results, indent=2, ensure_ascii=False, default=default) + "\n"


def write_results_file(results_dir: str | os.PathLike, results: Mapping[str, Any],
                       default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``results`` as ``results_dir/results.json``; ``default`` as in ``json.dumps``.

    Written under a ``.partial`` name first and then renamed, so a crash never leaves half a
    results.json for a publisher to read. Raises OSError; callers decide what that means.
    """
    directory = Path(results_dir)
    staging = directory / STAGING_FILE
    staging.write_text(_json_text(results, default), encoding="utf-8")
    staging.replace(directory / RESULTS_FILE)
    return directory / RESULTS_FILE


# ---- the samples files, and which of a directory's files are an evaluation's -------------------


def safe_name(name: str) -> str:
    """A file-name fragment that cannot leave its directory."""
    cleaned = re.sub(r"[^\w.\-]", "_", name).lstrip(".")
    return cleaned or "_"


def samples_file_name(task: str) -> str:
    """``samples_<task>.jsonl``: the name of a task's per-document samples file."""
    return f"samples_{safe_name(task)}.jsonl"


def _is_samples_name(name: Any) -> bool:
    """A plain ``samples_*.jsonl`` name in the directory itself: a listing read from a file must not
    make us publish or delete anything elsewhere."""
    return (isinstance(name, str) and name == Path(name).name and name not in (".", "..")
            and name.startswith("samples_") and name.endswith(".jsonl"))


def listed_samples(results: Mapping[str, Any]) -> dict[str, str]:
    """{task: samples file name} that belong to ``results``.

    What results.json lists; for one written before the listing was recorded (or by another
    tool), ``samples_<task>.jsonl`` of each of its tasks, unless its eval_config says it was
    evaluated without ``log_samples`` (then none is its own).
    """
    listed = results.get(SAMPLES_FILES)
    if isinstance(listed, Mapping):
        return {str(task): name for task, name in listed.items() if _is_samples_name(name)}
    if (results.get("eval_config") or {}).get("log_samples") is False:
        return {}
    return {str(task): samples_file_name(str(task)) for task in results.get("results") or {}}


def samples_files(results_dir: str | os.PathLike, results: Mapping[str, Any]) -> dict[str, Path]:
    """{task: path} of the samples files of ``results`` that ``results_dir`` holds."""
    paths = {task: Path(results_dir) / name for task, name in listed_samples(results).items()}
    return {task: path for task, path in paths.items() if path.is_file()}


def _evaluation_results(path: Path) -> dict[str, Any] | None:
    """The contents of an evaluation's results.json at ``path``; None if no evaluation wrote it."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ours = isinstance(results, dict) and all(isinstance(results.get(k), Mapping) for k in ("results", "eval_config"))
    return results if ours else None


def claim_output_dir(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Check that writing an evaluation's results.json and the files ``names`` into ``directory``
    replaces no file but an earlier evaluation's; return that evaluation's files the new one does
    not replace (stale now, to remove).

    An earlier evaluation's files: its results.json and the samples files it lists (also those of a
    results.json.partial a crashed write left). A results.json no evaluation wrote, or a file of
    ``names`` no evaluation there wrote, is refused (UserError naming it): nothing of the user's is
    overwritten. Other files are not touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    owned = {STAGING_FILE}  # ours by its name, readable or not
    for name in (RESULTS_FILE, STAGING_FILE):
        path = directory / name
        if not os.path.lexists(path):
            continue
        earlier = _evaluation_results(path)
        if earlier is None and name == RESULTS_FILE:
            raise UserError(f"{path} was not written by an evaluation; not overwriting it: "
                            "choose another --output_path, or move it")
        if earlier is not None:
            owned |= {name, *listed_samples(earlier).values()}
    names = set(names)
    for name in sorted(names - owned):
        if os.path.lexists(directory / name):
            raise UserError(f"{directory / name} was not written by the evaluation in {directory}; not "
                            "overwriting it: choose another --output_path, or move it")
    return [directory / name for name in sorted(owned - names - {RESULTS_FILE, STAGING_FILE})
            if (directory / name).is_file() and not (directory / name).is_symlink()]


def write_evaluation(results_dir: str | os.PathLike, results: Mapping[str, Any],
                     samples: Mapping[str, Iterable[Any]]) -> Path:
    """Write an evaluation into ``results_dir``: ``samples_<task>.jsonl`` per task of ``samples``
    ({task: JSON-safe records}) and results.json listing them; an earlier evaluation's files that
    are not replaced are removed (see ``claim_output_dir``, which refuses anything else). Inside a
    DVC stage results.json holds no wall-clock date and a relative checkpoint path (``_as_stage_output``).

    The new results.json goes to its ``.partial`` name first: a crash midway leaves every file
    written so far listed by one of the two, so the next evaluation there still knows them as
    its own. Raises UserError (a file not ours in the way) or OSError.
    """
    directory = Path(results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    names = {task: samples_file_name(task) for task in samples}
    stale = claim_output_dir(directory, names.values())
    staging = directory / STAGING_FILE
    staging.write_text(_json_text({**_as_stage_output(results), SAMPLES_FILES: names}), encoding="utf-8")
    for task, records in samples.items():
        with open(directory / names[task], "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    for path in stale:
        path.unlink(missing_ok=True)
    staging.replace(directory / RESULTS_FILE)
    return directory / RESULTS_FILE


def _as_stage_output(results: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Mapping[str, Any]:
    """``results`` as a DVC stage records them (outside one, unchanged).

    Inside a DVC stage results.json is a stage output, hashed into dvc.lock: it holds only what the
    evaluation computed, so that two clones running the same stage lock the same bytes. lm-eval's
    wall-clock ``date`` is left out (publishing then times metrics by the evaluation's MLflow run,
    see ``evaluation_timestamp_ms``), and the checkpoint's path is recorded relative to DVC_ROOT
    when it lies inside it (the clone's own location is no part of the result).
    """
    env = os.environ if environ is None else environ
    if not in_dvc_stage(env):
        return results
    results = {key: value for key, value in results.items() if key != "date"}
    checkpoint = checkpoint_section(results)
    root = env.get("DVC_ROOT")
    if root and checkpoint.get("path"):
        path, root = Path(checkpoint["path"]).resolve(), Path(root).resolve()
        if path.is_relative_to(root):
            results["checkpoint"] = {**checkpoint, "path": path.relative_to(root).as_posix()}
    return results


def check_results_dir(directory: str | os.PathLike) -> None:
    """A one-line UserError when results cannot be written into ``directory``: found before an
    evaluation starts, not after it has run. Leaves nothing behind (``writable_directory_problem``)."""
    problem = writable_directory_problem(directory)
    if problem:
        raise UserError(f"cannot write results to {directory}: {problem}")


def holds_results(directory: str | os.PathLike) -> bool:
    """Is ``directory`` a results dir (it holds a results.json)?"""
    return (Path(directory) / RESULTS_FILE).is_file()


def read_results(results_dir: str | os.PathLike) -> dict[str, Any]:
    """The results.json of a results dir; a one-line UserError if it is missing or broken."""
    path = Path(results_dir) / RESULTS_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no {RESULTS_FILE} in {results_dir}; evaluate first, then publish") from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise UserError(f"{path} is not an lm-eval results file (no 'results' mapping)")
    return results


def find_results_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Results dirs named or lying anywhere under the given paths (sorted, each once)."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if holds_results(path):
            found[path] = None
        elif path.is_dir():
            found.update(dict.fromkeys(sorted(p.parent for p in path.rglob(RESULTS_FILE))))
        else:
            raise UserError(f"not a results directory: {path}")
    return list(found)


# ---- the checkpoint and live sections ---------------------------------------------------------


def add_checkpoint(results: dict[str, Any], checkpoint_info: Mapping[str, Any] | None) -> None:
    """Record what was evaluated: ``{path, step, fingerprint, mlflow_run_id}`` ({} for bare params)."""
    results["checkpoint"] = checkpoint_info or {}


def checkpoint_section(results: Mapping[str, Any]) -> Mapping[str, Any]:
    """The evaluated checkpoint's ``{path, step, fingerprint, mlflow_run_id}``; {} when not recorded."""
    return results.get("checkpoint") or {}


def live_results(results: Mapping[str, Any], *, run_id: str | None, step: int, timestamp_ms: int) -> dict[str, Any]:
    """A live evaluation (training params, no checkpoint on disk) as results.json contents.

    ``live`` says where its metrics belong: the training run ``run_id`` at ``step``, logged with
    ``timestamp_ms``. The checkpoint section has no path and no fingerprint.
    """
    return {
        **results,
        "live": {"run_id": run_id, "step": int(step), "timestamp_ms": int(timestamp_ms)},
        "checkpoint": {"path": None, "step": int(step), "fingerprint": None, "mlflow_run_id": run_id},
    }


def live_section(results: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``live`` section of a live evaluation (see ``live_results``); None for a checkpoint's."""
    return results.get("live")


def live_target(results: Mapping[str, Any]) -> tuple[str, int] | None:
    """(training run id, step) a live evaluation's metrics go back into; None if it names no run."""
    live = live_section(results) or {}
    if not live.get("run_id"):
        return None
    return live["run_id"], int(live.get("step") or 0)


def evaluated_step(results: Mapping[str, Any]) -> int:
    """The training step of what was evaluated: the checkpoint's, else the live evaluation's, else 0."""
    return int(checkpoint_section(results).get("step") or (live_section(results) or {}).get("step") or 0)


def recorded_training_run_id(results: Mapping[str, Any]) -> str | None:
    """The MLflow run that trained what was evaluated, if results.json knows it."""
    return checkpoint_section(results).get("mlflow_run_id") or (live_section(results) or {}).get("run_id")


def loss_by_position(results: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per task, the ``{start, end, tokens, mean_nll}`` rows of the loss by position (recurrent
    mode); {} where results.json has none (windowed mode, or written before it was recorded)."""
    section = results.get("loss_by_position") or {}
    return {task: rows for task, rows in section.items() if isinstance(rows, list)}
