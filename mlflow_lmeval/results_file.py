"""``results.json``: what an evaluation leaves on disk, and the source of truth MLflow is made to agree with.

This module alone knows the file's name, how it is written (whole or not at all), how it is read,
and what its ``checkpoint`` and ``live`` sections say. A results dir is a directory holding one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

RESULTS_FILE = "results.json"


def write_results_file(results_dir: str | os.PathLike, results: Mapping[str, Any],
                       default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``results`` as ``results_dir/results.json``; ``default`` as in ``json.dumps``.

    Written under a ``.partial`` name first and then renamed, so a crash never leaves half a
    results.json for a publisher to read. Raises OSError; callers decide what that means.
    """
    directory = Path(results_dir)
    staging = directory / (RESULTS_FILE + ".partial")
    staging.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=default) + "\n", encoding="utf-8")
    staging.replace(directory / RESULTS_FILE)
    return directory / RESULTS_FILE


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
