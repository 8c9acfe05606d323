"""EvalConfig: every knob of an evaluation, with the seed's meanings and defaults.

Each field carries its metadata in one place (``Setting``): what it affects, its CLI flag, its
``params.yaml`` name and its engine setting. The argparse flags, the pipeline's params mapping,
the engine settings, the evaluation identity and the request and response cache keys are all
derived from it, so a field added here is keyed everywhere it changes a result.

Two fields have new names; the seed's are still accepted (``ALIASES``): ``use_infinite_eval``
(true/false, CLI ``--no_infinite_eval``) for ``mode`` ("recurrent"/"windowed"), and ``debug``
(which scales logits, unlike the CLI's ``--debug`` that shows tracebacks) for ``scale_logits``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import operator
from typing import Any

from .errors import UserError

# What a field can change. A field that changes nothing a result holds has ``affects=None``.
RESPONSES = "responses"  # what the model returns for a given request (the response-cache namespace)
REQUESTS = "requests"  # which requests lm-eval builds from the documents (the request-cache key)
STATISTICS = "statistics"  # how per-document results become reported numbers (stderrs)
SCORE_EFFECTS = (RESPONSES, REQUESTS, STATISTICS)

# Recurrent: whole documents, the model's state carried over chunks; windowed: fixed-context windows.
MODES = ("recurrent", "windowed")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Setting:
    affects: str | None  # one of SCORE_EFFECTS, or None
    flag: str | None = None  # the ``mlflow-lmeval evaluate`` flag
    param: str | None = None  # the name under ``evaluate:`` in params.yaml
    engine: str | None = None  # the EngineSettings field it sets
    help: str = ""
    negated: bool = False  # a default-true field whose flag turns it off (``--no_...``)
    cli_required: bool = False
    choices: tuple[str, ...] = ()  # the values a string field may take


@dataclasses.dataclass(frozen=True)
class Alias:
    """An older true/false name of a field, still accepted by ``EvalConfig(...)``, ``from_dict``,
    ``replace``, the CLI (``flag``) and, where the field has a params name, params.yaml."""

    field: str
    when_true: Any  # the field's value for ``alias=True``
    when_false: Any
    flag: str | None = None  # the older CLI flag
    flag_means: bool = True  # the alias value the older flag stands for

    def value(self, name: str, given: Any) -> Any:
        if not isinstance(given, bool):
            raise ConfigError(name, f"must be true or false, got {given!r}")
        return self.when_true if given else self.when_false


ALIASES = {
    "use_infinite_eval": Alias("mode", "recurrent", "windowed", "--no_infinite_eval", flag_means=False),
    "debug": Alias("scale_logits", True, False, "--debug_logits"),
}


def resolve_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every alias replaced by its field; an alias given with its field must agree."""
    resolved = {k: v for k, v in values.items() if k not in ALIASES}
    for name, alias in ALIASES.items():
        if name not in values:
            continue
        value = alias.value(name, values[name])
        if alias.field in resolved and resolved[alias.field] != value:
            raise ConfigError(alias.field, f"{resolved[alias.field]!r} conflicts with {name}={values[name]!r} "
                                           f"(its older name); give only {alias.field}")
        resolved[alias.field] = value
    return resolved


def _field(default, setting: Setting):
    return dataclasses.field(default=default, metadata={"setting": setting})


def _accepting_aliases(cls):
    """``cls(...)`` also takes the ALIASES' names as keywords (they are not fields)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **values):
        init(self, *args, **resolve_aliases(values))

    cls.__init__ = __init__
    return cls


@_accepting_aliases
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
    mode: str = _field("recurrent", Setting(
        RESPONSES, "--mode", "mode", "mode", choices=MODES,
        help="recurrent: whole documents, the state carried over chunks; windowed: fixed-context windows"))
    # The weights' dtype in memory; the recurrent state keeps the model's own (xLSTM: inference_state_dtype).
    dtype: str = _field("float32", Setting(
        RESPONSES, "--dtype", "dtype", "dtype", choices=DTYPES,
        help="the weights' dtype while evaluating (the recurrent state keeps its own)"))
    infinite_eval_chunksize: int = _field(64, Setting(
        None, "--chunk_size", "chunk_size", "chunk_size",
        help="tokens per recurrent step (a long batch running fewer rows takes proportionally more, "
             "so a step never exceeds batch_size x chunk_size tokens); at most the longest piece, "
             "rounded up to a power of two"))
    context_length: int | None = _field(None, Setting(
        RESPONSES, "--context_length", "context_length", "context_length",
        help="window length in fixed-context mode (default: the model's)"))
    batch_size: int = _field(8, Setting(None, "--batch_size", "batch_size", "batch_size"))
    worker_buffer_size: int = _field(1, Setting(None, "--worker_buffer_size", "worker_buffer_size", "worker_buffer_size"))
    worker_count: int = _field(0, Setting(None, "--worker_count", "worker_count", "worker_count"))
    # The seed's ``debug``: scale logits so a random model yields finite metrics.
    scale_logits: bool = _field(False, Setting(
        RESPONSES, "--scale_logits", engine="scale_logits", help="scale logits so a random model gives finite metrics"))
    system_instruction: str | None = _field(None, Setting(REQUESTS, "--system_instruction", "system_instruction"))
    num_fewshot: int | None = _field(None, Setting(REQUESTS, "--num_fewshot", "num_fewshot"))
    # lm-eval's standard; cheap with our vectorised bootstrap.
    bootstrap_iters: int = _field(100_000, Setting(STATISTICS, "--bootstrap_iters", "bootstrap_iters"))
    # True: the tokenizer's template; a string: a template's name, or Jinja text (chat_template.py).
    apply_chat_template: bool | str = _field(False, Setting(
        REQUESTS, "--apply_chat_template", "apply_chat_template",
        help="render prompts with a chat template: the tokenizer's own; NAME: the tokenizer's template of that "
             "name, or a built-in one (roles, chatml) for a tokenizer without templates; or this Jinja text"))
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
        None, "--cache_path", help="response cache file, or a directory to hold responses.sqlite (default: "
                                   "$MLFLOW_LMEVAL_CACHE/responses.sqlite); a file that is not a response cache is refused"))
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
    def from_dict(cls, values: dict[str, Any]) -> EvalConfig:
        """From a dict of field names (the ALIASES' names too)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(ALIASES))
        if unknown:
            raise UserError(f"unknown config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **changes) -> EvalConfig:
        """A copy with ``changes`` (field names, or the ALIASES' names)."""
        return dataclasses.replace(self, **resolve_aliases(changes))

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
        require(self.mode in MODES, "mode", f"must be {' or '.join(MODES)}")
        require(self.dtype in DTYPES, "dtype", f"must be {' or '.join(DTYPES)}")
        for f in dataclasses.fields(self):
            if f.type == "bool":
                require(isinstance(getattr(self, f.name), bool), f.name, "must be true or false")
            elif f.type == "str | None":
                require(getattr(self, f.name) is None or isinstance(getattr(self, f.name), str), f.name, "must be a string")
        for name in ("infinite_eval_chunksize", "batch_size", "worker_buffer_size"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "must be a positive integer")
        require(self.context_length is None or (is_int(self.context_length) and self.context_length >= 1),
                "context_length", "must be a positive integer")
        # Recurrent mode has no window: a length given there would change nothing but the identity.
        require(self.context_length is None or self.mode == "windowed", "context_length",
                "applies only in windowed mode (recurrent evaluation has no window)")
        for name in ("worker_count", "bootstrap_iters"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "must be 0 or more (an integer)")
        require(self.num_fewshot is None or (is_int(self.num_fewshot) and self.num_fewshot >= 0),
                "num_fewshot", "must be 0 or more (an integer)")
        limit = self.limit_requests
        # lm-eval takes a float below 1 as a fraction of the documents and any other as int(limit).
        require(limit is None or (is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit < 1),
                "limit_requests", "must be a count (a whole number from 1) or a fraction below 1")
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
    identity, which errs on the side of two runs rather than one wrong one. A renamed field keeps
    its older name and value here (ALIASES), so evaluations published before the rename keep
    their identity."""
    known = settings()
    kept = {k: v for k, v in values.items() if k not in known or known[k].affects is not None}
    for name, alias in ALIASES.items():
        if alias.field in kept and kept[alias.field] in (alias.when_true, alias.when_false):
            kept[name] = kept.pop(alias.field) == alias.when_true
    return kept


def engine_values(config: EvalConfig) -> dict[str, Any]:
    """Keyword arguments for EngineSettings."""
    return {s.engine: getattr(config, name) for name, s in settings().items() if s.engine}


def param_names() -> dict[str, str]:
    """params.yaml name -> EvalConfig field, for the fields the pipeline exposes."""
    return {s.param: name for name, s in settings().items() if s.param}


def param_aliases() -> list[str]:
    """The ALIASES' names that params.yaml accepts: those of fields with a params name."""
    return [name for name, alias in ALIASES.items() if settings()[alias.field].param]


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def checked_step(step: Any) -> int:
    """A checkpoint's training step as given to the Python API: an integer of 0 or more (numpy's too)."""
    try:
        value = operator.index(step)
    except TypeError:
        value = -1
    if value < 0 or isinstance(step, bool):
        raise UserError(f"step must be an integer of 0 or more, got {step!r}")
    return value


def parse_number(text: str) -> int | float:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field that has one, and the ALIASES' older flags; each stores into the field's
    own name (of two flags for one field, the later wins, as argparse does for any repeat)."""
    defaults = EvalConfig()
    for name, s in settings().items():
        if not s.flag:
            continue
        default = getattr(defaults, name)
        kwargs: dict[str, Any] = {"dest": name, "help": s.help or None}
        if name == "apply_chat_template":
            kwargs.update(nargs="?", const=True, default=False, metavar="TEMPLATE")
        elif s.choices:
            kwargs.update(choices=s.choices, default=default)
        elif isinstance(default, bool):
            kwargs.update(action="store_false" if s.negated else "store_true", default=default)
        elif name == "limit_requests":
            kwargs.update(type=parse_number, default=default)
        elif isinstance(default, int) or name in ("num_fewshot", "context_length"):
            kwargs.update(type=int, default=default)
        else:
            kwargs.update(default=default, required=s.cli_required)
        parser.add_argument(s.flag, **kwargs)
    for name, alias in ALIASES.items():
        if alias.flag:
            const = alias.when_true if alias.flag_means else alias.when_false
            flag = settings()[alias.field].flag
            parser.add_argument(alias.flag, dest=alias.field, action="store_const", const=const,
                                help=f"the same as {flag}" + ("" if isinstance(const, bool) else f" {const}"))


def from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig that ``add_arguments``' flags describe; a bad value names its flag."""
    values = {name: getattr(args, name) for name, s in settings().items() if s.flag}
    try:
        return EvalConfig(**values)
    except ConfigError as error:
        raise UserError(f"{settings()[error.name].flag} {error.problem}") from None
