"""Mistakes in task files, their data and templates, as one-line UserErrors that name the task and file.

lm-eval lets these escape as library exceptions (``DatasetGenerationError``, jinja2's
``UndefinedError``, ``ImportError`` for a ``!function``), which would read as our bugs. While
``named_task_errors`` is active, the two places where a task touches user input (loading its
dataset, rendering its requests) translate them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import jinja2
from lm_eval.api.task import ConfigurableTask, Task

from .errors import UserError


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join((str(error).strip().splitlines() or [type(error).__name__])[:1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _data_files(task) -> str:
    """The task's local data files, else its dataset's name."""
    kwargs = getattr(task.config, "dataset_kwargs", None) or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if isinstance(files, dict):
        files = [f for value in files.values() for f in (value if isinstance(value, list) else [value])]
    if isinstance(files, str):
        files = [files]
    return ", ".join(map(str, files)) if files else str(getattr(task.config, "dataset_path", "?"))


def _yaml_of(manager, task_name: str) -> str:
    entry = (getattr(manager, "task_index", None) or {}).get(task_name)
    path = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
    return str(path or "its YAML")


def function_error(error: ImportError, include_path: str | None) -> UserError:
    """A ``!function`` whose module cannot be imported, with the YAML file that names it."""
    module = getattr(error, "name", None) or ""
    match = re.search(r"module '([^']+)'", str(error))
    module = module or (match.group(1) if match else "")
    for path in sorted(Path(include_path).rglob("*.yaml")) if include_path and module else ():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if "!function" in line and module in line:
                return UserError(f"task YAML {path}:{number}: !function {line.split('!function', 1)[1].strip()} "
                                 f"cannot be imported ({_first_line(_root_cause(error))})")
    return UserError(f"a task YAML's !function cannot be imported: {_first_line(error)}")


def unreachable_dataset(task) -> UserError:
    """A hub dataset that is neither cached nor reachable, with both ways out."""
    name, dataset = task.config.task, getattr(task.config, "dataset_path", "?")
    return UserError(
        f"task {name}: dataset {dataset} is neither cached nor reachable (offline or no network); go online "
        f"(without --offline or HF_DATASETS_OFFLINE), or evaluate a local copy: --include_path DIR holding a YAML "
        f"with `include:` of {name}'s YAML, `dataset_path: json` and `dataset_kwargs: {{data_files: ...}}`")


def _template_error(task, manager, error: jinja2.TemplateError) -> UserError:
    line = f" line {error.lineno}" if getattr(error, "lineno", None) else ""
    return UserError(f"task {task.config.task} ({_yaml_of(manager, task.config.task)}): a template cannot be "
                     f"rendered{line}: {type(error).__name__}: {_first_line(error)}")


@contextlib.contextmanager
def named_task_errors(manager) -> Iterator[None]:
    """Translate user-input errors while lm-eval builds tasks (loading the data and checking a
    first document's templates, in ``ConfigurableTask.__init__``) and renders their requests."""
    init, build = ConfigurableTask.__init__, Task.build_all_requests

    def checked_init(task, *args, **kwargs):
        try:
            return init(task, *args, **kwargs)
        except UserError:
            raise
        except jinja2.TemplateError as error:
            raise _template_error(task, manager, error) from None
        except Exception as error:
            if isinstance(error, (ImportError, StopIteration)) or getattr(task, "config", None) is None:
                raise  # a missing package, an empty dataset, a config lm-eval rejected: reported elsewhere
            cause = _root_cause(error)
            if isinstance(cause, ConnectionError) or "offline" in str(error).lower() or "couldn't reach" in str(error).lower():
                raise unreachable_dataset(task) from None
            raise UserError(f"task {task.config.task}: cannot read its data {_data_files(task)}: "
                            f"{type(cause).__name__}: {_first_line(cause)}") from None

    def checked_build(task, **kwargs):
        try:
            return build(task, **kwargs)
        except jinja2.TemplateError as error:
            raise _template_error(task, manager, error) from None

    ConfigurableTask.__init__, Task.build_all_requests = checked_init, checked_build
    try:
        yield
    finally:
        ConfigurableTask.__init__, Task.build_all_requests = init, build
