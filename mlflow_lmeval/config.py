"""EvalConfig: every knob of an evaluation, with the seed's names, meanings and defaults."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    evaluation_tasks: tuple[str, ...] = ()
    tokenizer_path: str | None = None  # None: the tokenizer stored in the checkpoint
    cache_requests: bool = True  # lm-eval's cache of built requests (not of responses)
    limit_requests: int | float | None = None  # per task: a count, or a fraction below 1
    write_out: bool = False  # print a few prompts per task
    use_infinite_eval: bool = True  # recurrent mode: whole documents, state carried over chunks
    infinite_eval_chunksize: int = 64
    context_length: int | None = None  # overrides the model's window in fixed-context mode
    batch_size: int = 8
    worker_buffer_size: int = 1
    worker_count: int = 0
    debug: bool = False  # scale logits so a random model yields finite metrics
    system_instruction: str | None = None
    num_fewshot: int | None = None
    bootstrap_iters: int = 100_000  # lm-eval's standard; cheap with our vectorised bootstrap
    apply_chat_template: bool | str = False  # True: the default template; a string: a Jinja template
    include_path: str | None = None
    output_path: str | None = None
    log_samples: bool = False
    response_cache: bool = True  # resumable: finished batches are kept, keyed by checkpoint and request
    response_cache_path: str | None = None  # default: $MLFLOW_LMEVAL_CACHE/responses.sqlite

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
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise UserError(message)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        require(all(isinstance(t, str) and t for t in self.evaluation_tasks), "evaluation_tasks must be task names")
        for name in ("cache_requests", "write_out", "use_infinite_eval", "debug", "log_samples", "response_cache"):
            require(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        require(is_int(self.infinite_eval_chunksize) and self.infinite_eval_chunksize >= 1,
                f"infinite_eval_chunksize (chunk size) must be a positive integer, got {self.infinite_eval_chunksize!r}")
        require(is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size!r}")
        require(self.context_length is None or (is_int(self.context_length) and self.context_length >= 1),
                f"context_length must be a positive integer, got {self.context_length!r}")
        require(is_int(self.worker_count) and self.worker_count >= 0, f"worker_count must be 0 or more, got {self.worker_count!r}")
        require(is_int(self.worker_buffer_size) and self.worker_buffer_size >= 1,
                f"worker_buffer_size must be a positive integer, got {self.worker_buffer_size!r}")
        require(self.num_fewshot is None or (is_int(self.num_fewshot) and self.num_fewshot >= 0),
                f"num_fewshot must be 0 or more, got {self.num_fewshot!r}")
        require(is_int(self.bootstrap_iters) and self.bootstrap_iters >= 0,
                f"bootstrap_iters must be 0 or more, got {self.bootstrap_iters!r}")
        limit = self.limit_requests
        require(limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0),
                f"limit_requests must be a positive number, got {limit!r}")
        require(isinstance(self.apply_chat_template, (bool, str)),
                f"apply_chat_template must be true, false or a template string, got {self.apply_chat_template!r}")
        for name in ("tokenizer_path", "system_instruction", "include_path", "output_path", "response_cache_path"):
            value = getattr(self, name)
            require(value is None or isinstance(value, str), f"{name} must be a string, got {value!r}")
