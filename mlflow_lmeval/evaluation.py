"""``evaluate``: a checkpoint and an EvalConfig in, lm-eval's results out and on disk."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from . import config as config_module
from .config import EvalConfig
from .errors import UserError
from .lm_eval_stats import add_token_perplexity, fast_stderrs
from .lm_eval_templates import cached_templates
from .models.loading import load_any
from .paths import cache_root
from .response_cache import ResponseCache
from .results_file import add_checkpoint, check_results_dir, claim_output_dir, samples_file_name, write_evaluation
from .tokenizer import Tokenizer

# lm_eval, and our modules that import it, are imported inside functions: ``configure_environment``
# must run first (lm_eval reads its cache location at import), and ``import lm_eval.evaluator`` takes
# 2.2 s measured on this machine. JAX likewise (the engine, the LM, the multi-host server): 3.2 s.


def configure_environment(cache_dir: str | os.PathLike | None = None, *, offline: bool = False) -> None:
    """Keep lm-eval's files and MLflow's telemetry out of the way; go offline only when asked.

    The user's environment decides whether the Hugging Face hub is reached (a user with internet
    downloads lm-eval's benchmark datasets the first time); ``offline`` (``--offline``) forces it off.
    Must run before lm_eval is imported: it reads its cache location at import time.
    """
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("LM_HARNESS_CACHE_PATH", str(cache_dir / "lm_eval_requests"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap pool must not fork under JAX
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def task_manager(tasks: tuple[str, ...], include_path: str | None):
    """A TaskManager that knows every requested task, indexing lm-eval's own (14 s) only when
    needed: not for names the include path has, nor for a name that no lm-eval task YAML
    contains (task_names.py), which is unknown at once."""
    from lm_eval.tasks import TaskManager

    from .task_names import lm_eval_task_names, may_be_lm_eval_task

    if not tasks:
        raise UserError("no tasks given; name at least one with --tasks")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"include path not found: {include_path}")
    local: list[str] = []
    unknown = list(tasks)
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        unknown, local = _unknown_tasks(manager, tasks), manager.all_tasks
        if not unknown:
            return manager
    certain = [name for name in unknown if not may_be_lm_eval_task(name)]
    if certain:
        known = lm_eval_task_names()
    else:
        manager = TaskManager(include_path=include_path, include_defaults=True)
        certain, known = _unknown_tasks(manager, tasks), manager.all_tasks
        if not certain:
            return manager
    if include_path is not None:
        _check_task_yaml(Path(include_path))
    raise UserError(_unknown_tasks_message(certain, include_path, local, known))


def _unknown_tasks_message(unknown: list[str], include_path: str | None, local: list[str], known: list[str]) -> str:
    from .task_names import close_names

    where = f" in {include_path} or" if include_path else ""
    hints = []
    for name in unknown:
        close = close_names(name, local, known)  # the include path's names first
        if close:
            either = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else close[0]
            hints.append(either + (f" (for {name})" if len(unknown) > 1 else ""))
    hint = f"; did you mean {'; '.join(hints)}?" if hints else ""
    return f"unknown task(s): {', '.join(unknown)} (not found{where} among lm-eval's tasks){hint}"


def _check_task_yaml(directory: Path) -> None:
    """lm-eval skips a task file it cannot parse; name the broken file instead of the task."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # lm-eval's !function tags
    for path in sorted(directory.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            first = str(error).strip().splitlines()[0]
            raise UserError(f"malformed task YAML {path}: {first}") from None


def _unknown_tasks(manager, tasks) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known and not manager.match_tasks([t])]


def json_safe(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def git_describe() -> str | None:
    """``git describe --always`` of the working directory, or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def run_lm_eval(lm, config: EvalConfig) -> dict:
    """Run lm-eval's ``simple_evaluate`` on an LM with everything the config sets."""
    import lm_eval
    import lm_eval.evaluator

    from .request_cache import FEWSHOT_SEED, keyed_request_cache
    from .task_errors import function_error, named_task_errors

    try:
        manager = task_manager(config.evaluation_tasks, config.include_path)
    except ImportError as error:  # a !function naming a module that is not there
        raise function_error(error, config.include_path) from None
    keyed_requests = keyed_request_cache(
        cache_root() / "lm_eval_requests" if config.cache_requests else None, tokenizer=lm.tokenizer_name,
        chat_template=lm.chat_identity())
    try:
        # lm-eval runs `git describe` with its stderr on ours: outside a checkout that prints
        # "fatal: not a git repository". Ask git quietly instead.
        quiet_git = mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", git_describe)
        with fast_stderrs(), cached_templates(), keyed_requests as documents, quiet_git, named_task_errors(manager):
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(config.evaluation_tasks),
                num_fewshot=config.num_fewshot,
                limit=config.limit_requests,
                bootstrap_iters=config.bootstrap_iters,
                log_samples=config.log_samples,
                write_out=config.write_out,
                cache_requests=config.cache_requests,
                system_instruction=config.system_instruction,
                apply_chat_template=config.apply_chat_template,
                task_manager=manager,
                fewshot_random_seed=FEWSHOT_SEED,
            )
    except UserError:
        raise
    except ImportError as error:
        raise function_error(error, config.include_path) from None
    except StopIteration:  # lm-eval's way of meeting a task without documents
        raise UserError(f"a task has no documents to evaluate (an empty dataset or split?): {', '.join(config.evaluation_tasks)}") from None
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise UserError(f"lm-eval could not run the tasks: {type(error).__name__}: {error}") from error
    if output is None:
        raise UserError("lm-eval returned no results")
    output["task_documents"] = documents  # what was scored, for the evaluation's identity
    return output


def write_results(output: dict, output_path: str | os.PathLike) -> Path:
    """Write ``results.json`` (samples excluded) and ``samples_<task>.jsonl`` per task, replacing an
    earlier evaluation's files there and refusing to overwrite anything else (see ``write_evaluation``)."""
    directory = Path(output_path)
    try:
        samples = output.pop("samples", None) or {}
        return write_evaluation(directory, json_safe(output), {task: json_safe(r) for task, r in samples.items()})
    except OSError as error:
        raise UserError(f"cannot write results to {directory}: {error.strerror or error}") from None


def engine_settings(config: EvalConfig):
    from .engine.loop import EngineSettings

    return EngineSettings(**config_module.engine_values(config))


def run_evaluation(model, tokenizer, config: EvalConfig, checkpoint_info: dict | None = None, *,
                   show_progress: bool = True) -> dict:
    """Evaluate any model that follows the model contract; returns lm-eval's results, JSON-safe.

    ``checkpoint_info`` ({path, step, fingerprint, mlflow_run_id}) identifies what was evaluated.
    With ``config.output_path`` set, ``results.json`` (and samples) are written there.
    """
    configure_environment(offline=config.offline)
    if config.output_path:  # what writing the results would refuse, refused before the work
        check_results_dir(config.output_path)
        claim_output_dir(config.output_path, map(samples_file_name, config.evaluation_tasks) if config.log_samples else ())
    from .lm import JaxLM

    fingerprint = (checkpoint_info or {}).get("fingerprint")
    cache = ResponseCache(config.response_cache_path) if config.response_cache and fingerprint else None
    lm = JaxLM(model, tokenizer, engine_settings(config), chat_template=config.apply_chat_template, show_progress=show_progress,
               cache=cache, fingerprint=fingerprint)
    try:
        output = run_lm_eval(lm, config)
    finally:
        if cache is not None:
            cache.close()
    add_token_perplexity(output, lm.document_scores, config.bootstrap_iters)
    add_checkpoint(output, checkpoint_info)
    output["eval_config"] = config.to_dict()
    output["engine"] = {
        "compilations": lm.engine.traces,
        "scored_tokens": {task: sum(n for _, n in scores) for task, scores in lm.document_scores.items()},
    }
    # Per task, mean NLL per position bucket over every loglikelihood and rolling request (cached
    # responses included); windowed mode says why it has none.
    output["loss_by_position"] = lm.loss_by_position()
    if lm.chat_identity() is not None:  # the template text used keys the evaluation's identity
        output["chat_template"] = lm.chat_identity()
    if config.output_path:
        write_results(output, config.output_path)
    output.pop("samples", None)
    return json_safe(output)


def evaluate(checkpoint_dir: str | os.PathLike, config: EvalConfig | dict, *, step: int | None = None,
             show_progress: bool = True) -> dict:
    """Evaluate a checkpoint (ours or a Hugging Face directory) on lm-eval tasks; returns lm-eval's
    results dict, JSON-safe. ``step`` overrides the checkpoint's own (its metadata, or the
    directory's step_N / checkpoint-N name)."""
    config = config if isinstance(config, EvalConfig) else EvalConfig.from_dict(config)
    step = None if step is None else config_module.checked_step(step)
    if config.output_path:  # before the checkpoint loads, not after the evaluation has run
        check_results_dir(config.output_path)
    loaded = load_any(checkpoint_dir, dtype=config.dtype)
    tokenizer = Tokenizer.load(config.tokenizer_path) if config.tokenizer_path else loaded.tokenizer
    checkpoint_info = {
        "path": str(loaded.path),
        "step": loaded.step if step is None else step,
        "fingerprint": loaded.fingerprint,
        "mlflow_run_id": loaded.mlflow_run_id,
    }
    if getattr(loaded, "hf_config", None) is not None:
        checkpoint_info["hf_config"] = loaded.hf_config  # for the LoggedModel's params; not part of the identity
    return run_evaluation(loaded.model, tokenizer, config, checkpoint_info, show_progress=show_progress)


def serve_checkpoint(checkpoint_dir: str | os.PathLike) -> int:
    """A process other than 0 in a multi-host evaluation: run process 0's engine calls on this
    process's devices until it is done. Returns the number of calls served.

    The checkpoint is loaded at once, not when the first call arrives: orbax's restore holds a
    barrier across all processes, which process 0 enters as its evaluation starts."""
    from .engine.follower import serve

    return serve(load_any(checkpoint_dir).model)
