"""Mistakes in task files, their data and templates, as one-line UserErrors that name the task and file.

lm-eval lets these escape as library exceptions (``DatasetGenerationError``, jinja2's
``UndefinedError``, ``ImportError`` for a ``!function``), which would read as our bugs. While
``named_task_errors`` is active, the two places where a task touches user input (building it from
its config and data, rendering its requests) translate them. lm-eval also lets a misspelt
``output_type``, metric or aggregation through with a log line and fails later, or never (an
unknown metric with an aggregation is dropped in silence): ``config_mistake`` names those first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

import jinja2
from lm_eval.api import samplers
from lm_eval.api.task import ALL_OUTPUT_TYPES, ConfigurableTask, Task

from .errors import UserError
from .task_names import close_names


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


def _where(manager, task_name) -> str:
    return f"task {task_name} ({_yaml_of(manager, task_name)})"


def _template_error(task, manager, error: jinja2.TemplateError) -> UserError:
    line = f" line {error.lineno}" if getattr(error, "lineno", None) else ""
    return UserError(f"task {task.config.task} ({_yaml_of(manager, task.config.task)}): a template cannot be "
                     f"rendered{line}: {type(error).__name__}: {_first_line(error)}")


def _not_one_of(where: str, field: str, value, known: Iterable[str], *, listed: bool = False,
                who: str = "lm-eval", of: str = "") -> UserError:
    """``field`` (of ``of``) is ``value``, which is none of ``known``; the closest of them suggested."""
    known = sorted(known) if not listed else list(known)
    close = close_names(str(value), known)
    choices = f" ({', '.join(known)})" if listed else ""
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return UserError(f"{where}: {field} {value!r}{of} is not one {who} knows{choices}{hint}")


def _resolves(metric: str, hf_evaluate: bool) -> bool:
    """Whether lm-eval's own lookup (``get_metric``) finds ``metric``, without its log lines about
    the search; where the ``evaluate`` package is installed that lookup tries it too."""
    from lm_eval.api.registry import get_metric

    logger = logging.getLogger("lm_eval.api.registry")
    disabled, logger.disabled = logger.disabled, True
    try:
        return get_metric(metric, hf_evaluate) is not None
    finally:
        logger.disabled = disabled


def config_mistake(config, where: str) -> UserError | None:
    """An ``output_type``, metric or aggregation lm-eval does not know, or a metric it cannot
    aggregate, in a task's config (the dict its YAML gives), as a UserError that begins ``where``.

    lm-eval itself raises on an unknown output_type, and resolves metrics through its registries
    (``get_metric``; the ``evaluate`` package, where installed, for the names it lacks): it logs an
    unknown one and then drops it when the entry names an aggregation, or fails on ``KeyError:
    None`` when it does not, as it does for any metric without a default aggregation."""
    import lm_eval.api.metrics  # noqa: F401  (registers lm-eval's metrics and aggregations)
    from lm_eval.api.registry import aggregation_registry, metric_agg_registry, metric_registry

    if not isinstance(config, dict):
        return None
    output_type = config.get("output_type")
    if output_type is not None and output_type not in ALL_OUTPUT_TYPES:
        return _not_one_of(where, "output_type", output_type, ALL_OUTPUT_TYPES, listed=True)
    own_results = config.get("process_results") is not None  # it computes its metrics itself
    for entry in config.get("metric_list") or ():
        metric = entry.get("metric") if isinstance(entry, dict) else None
        if not isinstance(metric, str):
            continue  # a missing `metric` is lm-eval's own clear error; a callable is its own
        hf_evaluate = entry.get("hf_evaluate") is True
        if not own_results and (metric not in metric_registry or hf_evaluate) and not _resolves(metric, hf_evaluate):
            who = "lm-eval or the evaluate library" if importlib.util.find_spec("evaluate") is not None else "lm-eval"
            return _not_one_of(where, "metric", metric, metric_registry.keys(), who=who)
        aggregation = entry.get("aggregation")
        if isinstance(aggregation, str) and aggregation not in aggregation_registry:
            return _not_one_of(where, "aggregation", aggregation, aggregation_registry.keys(), of=f" (of metric {metric!r})")
        if aggregation is None and metric not in metric_agg_registry:
            return UserError(f"{where}: metric {metric!r} has no default aggregation; give it one "
                             f"(aggregation: one of {', '.join(sorted(aggregation_registry.keys()))})")
    return None


def _raised_through(error: BaseException) -> list:
    """The code objects of the functions ``error`` passed through, outermost first."""
    return [frame.f_code for frame, _ in traceback.walk_tb(error.__traceback__)]


def _fewshot_pool(task) -> str:
    """Where lm-eval's ``fewshot_docs`` takes a task's few-shot examples from (its order of choice)."""
    config, fewshot = task.config, task.fewshot_cfg
    if fewshot.split is not None:
        return f"its {fewshot.split} split"
    if config.fewshot_config is not None and fewshot.samples is not None:
        return "its fewshot_config samples"
    if task.has_training_docs():
        return f"its {config.training_split} split"
    if task.has_validation_docs():
        return f"its {config.validation_split} split"
    return f"its {config.test_split} split"


def _fewshot_error(task, manager) -> UserError:
    """More few-shot examples asked for than the pool holds (lm-eval's sampler fails on it with
    ``random.sample``'s "Sample larger than population", or an assertion)."""
    # The sampler leaves the evaluated document out of its own examples when it draws from the
    # evaluated split (ConfigurableTask.fewshot_context): one document of the pool is not available.
    own = task.fewshot_cfg.split == task.config.test_split
    pool = len(task.sampler.fewshot_docs())
    most = max(pool - int(own), 0)
    return UserError(f"task {task.config.task} ({_yaml_of(manager, task.config.task)}): num_fewshot "
                     f"{task.config.num_fewshot} asks for more examples than its few-shot pool holds: {pool} "
                     f"document(s) from {_fewshot_pool(task)}{', less the one evaluated' if own else ''}; "
                     f"use num_fewshot {most} or less")


@contextlib.contextmanager
def named_task_errors(manager) -> Iterator[None]:
    """Translate user-input errors while lm-eval builds tasks (loading the data and checking a
    first document's templates, in ``ConfigurableTask.__init__``) and renders their requests."""
    init, build = ConfigurableTask.__init__, Task.build_all_requests

    def checked_init(task, *args, **kwargs):
        config = kwargs.get("config", args[3] if len(args) > 3 else None)  # the factory's dict from the YAML
        if isinstance(config, dict) and (mistake := config_mistake(config, _where(manager, config.get("task")))):
            raise mistake
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
            if not hasattr(task, "dataset") and not any(code.co_name == "download" for code in _raised_through(error)):
                # Raised before any data was read (``download`` sets ``dataset``): the config's mistake.
                raise UserError(f"{_where(manager, task.config.task)}: {type(cause).__name__}: {_first_line(cause)}") from None
            raise UserError(f"task {task.config.task}: cannot read its data {_data_files(task)}: "
                            f"{type(cause).__name__}: {_first_line(cause)}") from None

    def checked_build(task, **kwargs):
        try:
            return build(task, **kwargs)
        except jinja2.TemplateError as error:
            raise _template_error(task, manager, error) from None
        except (ValueError, AssertionError) as error:
            if any(code.co_filename == samplers.__file__ for code in _raised_through(error)):
                raise _fewshot_error(task, manager) from None
            raise

    ConfigurableTask.__init__, Task.build_all_requests = checked_init, checked_build
    try:
        yield
    finally:
        ConfigurableTask.__init__, Task.build_all_requests = init, build
