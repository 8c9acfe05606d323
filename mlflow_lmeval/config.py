"""EvalConfig: every knob of an evaluation, with the seed's names, meanings and defaults.

Each field carries its metadata in one place (``Setting``): what it affects, its CLI flag, its
``params.yaml`` name and its engine setting. The argparse flags, the pipeline's params mapping,
the engine settings, the evaluation identity and the request and response cache keys are all
derived from it, so a field added here is keyed everywhere it changes a result.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .errors import UserError

# What a field can change. A field that changes nothing a result holds has ``affects=None``.
RESPONSES = "responses"  # what the model returns for a given request (the response-cache namespace)
REQUESTS = "requests"  # which requests lm-eval builds from the documents (the request-cache key)
STATISTICS = "statistics"  # how per-document results become reported numbers (stderrs)
SCORE_EFFECTS = (RESPONSES, REQUESTS, STATISTICS)


@dataclasses.dataclass(frozen=True)
class Setting:
    affects: str | None  # one of SCORE_EFFECTS, or None
    flag: str | None = None  # the ``mlflow-lmeval evaluate`` flag
    param: str | None = None  # the name under ``evaluate:`` in params.yaml
    engine: str | None = None  # the EngineSettings field it sets
    help: str = ""
    negated: bool = False  # a default-true field whose flag turns it off (``--no_...``)
    cli_required: bool = False


def _field(default, setting: Setting):
    return dataclasses.field(default=default, metadata={"setting": setting})


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    evaluation_tasks: tuple[str, ...] = _field((), Setting(
        REQUESTS, "--tasks", "tasks", help="comma-separated task names", cli_required=True))
    tokenizer_path: str | None = _field(None, Setting(
        REQUESTS, "--tokenizer", help="tokenizer file (default: the checkpoint's own)"))
    cache_requests: bool = _field(True, Setting(
        None, "--no_cache_requests", "cache_requests", negated=True,
        help="rebuild lm-eval's requests every time (they are cached, keyed by task config and data)"))
    limit_requests: int | float | None = _field(None, Setting(
        REQUESTS, "--limit", "limit", help="examples per task: a count, or a fraction below 1"))
    write_out: bool = _field(False, Setting(None, "--write_out", help="print example prompts"))
    # Recurrent mode: whole documents, state carried over chunks; off: fixed-context windows.
    use_infinite_eval: bool = _field(True, Setting(
        RESPONSES, "--no_infinite_eval", "use_infinite_eval", "mode", negated=True,
        help="fixed-context windows instead of the recurrent loop"))
    infinite_eval_chunksize: int = _field(64, Setting(
        None, "--chunk_size", "chunk_size", "chunk_size", help="tokens per recurrent step"))
    context_length: int | None = _field(None, Setting(
        RESPONSES, "--context_length", "context_length", "context_length",
        help="window length in fixed-context mode (default: the model's)"))
    batch_size: int = _field(8, Setting(None, "--batch_size", "batch_size", "batch_size"))
    worker_buffer_size: int = _field(1, Setting(None, "--worker_buffer_size", "worker_buffer_size", "worker_buffer_size"))
    worker_count: int = _field(0, Setting(None, "--worker_count", "worker_count", "worker_count"))
    # The seed's ``debug``: scale logits so a random model yields finite metrics (not tracebacks).
    debug: bool = _field(False, Setting(
        RESPONSES, "--debug_logits", engine="scale_logits", help="scale logits so a random model gives finite metrics"))
    system_instruction: str | None = _field(None, Setting(REQUESTS, "--system_instruction", "system_instruction"))
    num_fewshot: int | None = _field(None, Setting(REQUESTS, "--num_fewshot", "num_fewshot"))
    # lm-eval's standard; cheap with our vectorised bootstrap.
    bootstrap_iters: int = _field(100_000, Setting(STATISTICS, "--bootstrap_iters", "bootstrap_iters"))
    # True: the default template; a string: a Jinja template.
    apply_chat_template: bool | str = _field(False, Setting(
        REQUESTS, "--apply_chat_template", "apply_chat_template",
        help="render prompts with a chat template: the default one, or this Jinja string"))
    # Where task files live; what they say is keyed through the tasks' configs and data.
    include_path: str | None = _field(None, Setting(
        None, "--include_path", "include_path", help="directory of local task YAML files"))
    output_path: str | None = _field(None, Setting(
        None, "--output_path", help="directory for results.json and samples", cli_required=True))
    log_samples: bool = _field(False, Setting(
        None, "--log_samples", "log_samples", help="also write samples_<task>.jsonl"))
    # Resumable: finished batches are kept, keyed by checkpoint, scoring mode and request.
    response_cache: bool = _field(True, Setting(
        None, "--no_cache", "response_cache", negated=True, help="neither read nor write the resumable response cache"))
    response_cache_path: str | None = _field(None, Setting(
        None, "--cache_path", help="response cache file (default: $MLFLOW_LMEVAL_CACHE/responses.sqlite)"))
    # Hugging Face hub access for lm-eval's datasets: the user's environment decides unless this is set.
    offline: bool = _field(False, Setting(
        None, "--offline", "offline", help="never reach the Hugging Face hub (sets HF_HUB_OFFLINE, HF_DATASETS_OFFLINE)"))

    def __post_init__(self):
        tasks = self.evaluation_tasks
        if isinstance(tasks, str):
            tasks = tuple(t.strip() for t in tasks.split(",") if t.strip())
        object.__setattr__(self, "evaluation_tasks", tuple(tasks))
        self._validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EvalConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **changes) -> "EvalConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["evaluation_tasks"] = list(self.evaluation_tasks)
        return values

    def _validate(self) -> None:
        def require(condition: bool, name: str, problem: str) -> None:
            if not condition:
                raise ConfigError(name, f"{problem}, got {getattr(self, name)!r}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        require(all(isinstance(t, str) and t for t in self.evaluation_tasks), "evaluation_tasks", "must be task names")
        for f in dataclasses.fields(self):
            if f.type == "bool":
                require(isinstance(getattr(self, f.name), bool), f.name, "must be true or false")
            elif f.type == "str | None":
                require(getattr(self, f.name) is None or isinstance(getattr(self, f.name), str), f.name, "must be a string")
        for name in ("infinite_eval_chunksize", "batch_size", "worker_buffer_size"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "must be a positive integer")
        require(self.context_length is None or (is_int(self.context_length) and self.context_length >= 1),
                "context_length", "must be a positive integer")
        for name in ("worker_count", "bootstrap_iters"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "must be 0 or more (an integer)")
        require(self.num_fewshot is None or (is_int(self.num_fewshot) and self.num_fewshot >= 0),
                "num_fewshot", "must be 0 or more (an integer)")
        limit = self.limit_requests
        require(limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0),
                "limit_requests", "must be a positive number")
        require(isinstance(self.apply_chat_template, (bool, str)), "apply_chat_template",
                "must be true, false or a template string")


class ConfigError(UserError):
    """A field with a bad value; ``problem`` reads after the field's name in whichever spelling
    the user wrote it in (a CLI flag, a params.yaml key, an EvalConfig field)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


# ---- what is derived from the metadata ---------------------------------------------------------


def settings() -> dict[str, Setting]:
    """Every EvalConfig field's Setting, by field name, in declaration order."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(EvalConfig)}


def affecting(config: EvalConfig, *effects: str) -> dict[str, Any]:
    """The config's values of the fields that affect any of ``effects`` (JSON-ready)."""
    values = config.to_dict()
    return {name: values[name] for name, s in settings().items() if s.affects in effects}


def score_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Of a stored ``eval_config`` dict, the entries that can change a score.

    Keys this version does not know are kept: a setting from another version counts towards the
    identity, which errs on the side of two runs rather than one wrong one."""
    known = settings()
    return {k: v for k, v in values.items() if k not in known or known[k].affects is not None}


def engine_values(config: EvalConfig) -> dict[str, Any]:
    """Keyword arguments for EngineSettings."""
    values = {s.engine: getattr(config, name) for name, s in settings().items() if s.engine}
    return {**values, "mode": "recurrent" if values["mode"] else "windowed"}


def param_names() -> dict[str, str]:
    """params.yaml name -> EvalConfig field, for the fields the pipeline exposes."""
    return {s.param: name for name, s in settings().items() if s.param}


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_number(text: str) -> int | float:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field that has one; each stores into the field's own name."""
    defaults = EvalConfig()
    for name, s in settings().items():
        if not s.flag:
            continue
        default = getattr(defaults, name)
        kwargs: dict[str, Any] = {"dest": name, "help": s.help or None}
        if name == "apply_chat_template":
            kwargs.update(nargs="?", const=True, default=False, metavar="TEMPLATE")
        elif isinstance(default, bool):
            kwargs.update(action="store_false" if s.negated else "store_true", default=default)
        elif name == "limit_requests":
            kwargs.update(type=parse_number, default=default)
        elif isinstance(default, int) or name in ("num_fewshot", "context_length"):
            kwargs.update(type=int, default=default)
        else:
            kwargs.update(default=default, required=s.cli_required)
        parser.add_argument(s.flag, **kwargs)


def from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig that ``add_arguments``' flags describe; a bad value names its flag."""
    values = {name: getattr(args, name) for name, s in settings().items() if s.flag}
    try:
        return EvalConfig(**values)
    except ConfigError as error:
        raise UserError(f"{settings()[error.name].flag} {error.problem}") from None
