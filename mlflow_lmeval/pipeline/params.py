"""params.yaml: the pipeline's knobs, validated so a mistake names the param that is wrong."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .. import config as config_module
from ..config import ConfigError, EvalConfig
from ..errors import UserError

PARAMS_FILE = "params.yaml"


@dataclasses.dataclass(frozen=True)
class PrepareParams:
    source: str = "builtin"  # "builtin", a local UTF-8 text file, or "hf:<dataset>[:<config>]"
    hf_split: str = "train"
    hf_text_field: str = "text"
    document_words: int = 1000  # documents cut from a plain text source
    heldout_fraction: float = 0.1
    vocab_size: int = 1024
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainParams:
    model_size: str = "tiny"
    steps: int = 300
    checkpoint_steps: tuple[int, ...] = (100, 200, 300)
    batch_size: int = 16
    sequence_length: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    eval_every: int = 0  # 0: no in-training evaluation
    eval_tasks: tuple[str, ...] = ()
    eval_limit: int = 20


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """``evaluate:``: the checkpoints to evaluate, and the EvalConfig fields that have a params name
    (config.Setting.param); their defaults are EvalConfig's own."""

    checkpoints: dict = dataclasses.field(default_factory=dict)  # stage name -> checkpoint directory
    settings: EvalConfig = EvalConfig(include_path="data/tasks")  # noqa: RUF009 (frozen, so one shared default is safe)

    @classmethod
    def from_params(cls, values: dict) -> EvaluateParams:
        """From the ``evaluate:`` mapping; the older names of renamed params (config.ALIASES, e.g.
        ``use_infinite_eval`` for ``mode``) are accepted in users' files."""
        names = config_module.param_names()
        aliases = config_module.param_aliases()
        unknown = sorted(set(values) - set(names) - set(aliases) - {"checkpoints"})
        if unknown:
            raise UserError(f"params.yaml: unknown param evaluate.{unknown[0]} (known: checkpoints, {', '.join(names)})")
        fields = {names.get(k, k): (tuple(v) if isinstance(v, list) else v) for k, v in values.items()
                  if k in names or k in aliases}
        try:
            settings = cls().settings.replace(**fields)
        except ConfigError as error:
            setting = config_module.settings().get(error.name)
            param = setting.param if setting else error.name  # not a field: an older name (config.ALIASES)
            raise UserError(f"params.yaml: evaluate.{param} {error.problem}") from None
        return cls(values.get("checkpoints") or {}, settings)

    def __getattr__(self, name: str):
        """A param by its params.yaml name (``params["evaluate"].include_path``)."""
        field = config_module.param_names().get(name)
        if field is None:
            raise AttributeError(name)
        return getattr(self.settings, field)

    def eval_config(self, output_path: str) -> EvalConfig:
        return self.settings.replace(output_path=output_path)


@dataclasses.dataclass(frozen=True)
class TrackingParams:
    tracking_uri: str = ""  # empty: sqlite:///<repo root>/mlflow.db
    experiment: str = "mlflow_lmeval"
    enabled: bool = True


SECTIONS = {"prepare": PrepareParams, "train": TrainParams, "evaluate": EvaluateParams, "tracking": TrackingParams}


def _build(section: str, values: Any):
    cls = SECTIONS[section]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"params.yaml: '{section}' must be a mapping")
    if cls is EvaluateParams:
        return EvaluateParams.from_params(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"params.yaml: unknown param {section}.{unknown[0]} (known: {', '.join(fields)})")
    converted = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise UserError(f"params.yaml: {section}.{name} must be a list")
            value = tuple(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"params.yaml: {section}.{name} must be true or false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"params.yaml: {section}.{name} must be an integer, got {value!r}")
        converted[name] = value
    return cls(**converted)


def _check(params: dict) -> None:
    train, evaluate, prepare = params["train"], params["evaluate"], params["prepare"]

    def positive(section, name):
        value = getattr(params[section], name)
        if value is not None and value <= 0:
            raise UserError(f"params.yaml: {section}.{name} must be positive, got {value}")

    for section, name in [("train", "steps"), ("train", "batch_size"), ("train", "sequence_length"), ("train", "learning_rate"),
                          ("prepare", "vocab_size"), ("prepare", "document_words")]:
        positive(section, name)
    for step in train.checkpoint_steps:
        if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= train.steps:
            raise UserError(f"params.yaml: train.checkpoint_steps has {step!r}; each must be an integer in 1..{train.steps}")
    if not 0 < prepare.heldout_fraction < 1:
        raise UserError(f"params.yaml: prepare.heldout_fraction must lie in (0, 1), got {prepare.heldout_fraction}")
    if not isinstance(evaluate.checkpoints, dict):
        raise UserError("params.yaml: evaluate.checkpoints must map stage names to checkpoint directories")
    if not evaluate.tasks:
        raise UserError("params.yaml: evaluate.tasks names no task")


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    """{"prepare": PrepareParams, "train": ..., "evaluate": ..., "tracking": ...}."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"params file not found: {path}") from None
    except yaml.YAMLError as error:
        raise UserError(f"params.yaml is not valid YAML: {str(error).splitlines()[0]}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"params.yaml: unknown section '{unknown[0]}' (known: {', '.join(SECTIONS)})")
    params = {section: _build(section, raw.get(section)) for section in SECTIONS}
    _check(params)
    return params
