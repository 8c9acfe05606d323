"""The reference training loop: next-token cross-entropy with optax on random windows of a corpus."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .errors import UserError
from .models import mlstm
from .models.checkpoint import save_checkpoint
from .tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int
    save_steps: tuple[int, ...]
    batch_size: int = 16
    sequence_length: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 10

    def validate(self) -> TrainSettings:
        for name in ("steps", "batch_size", "sequence_length", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
        bad = [s for s in self.save_steps if not 1 <= s <= self.steps]
        if bad:
            raise UserError(f"checkpoint steps {bad} lie outside 1..{self.steps}")
        return self


def save_steps_every(steps: int, save_every: int) -> tuple[int, ...]:
    """Every ``save_every`` steps, and always the last one."""
    if save_every < 1:
        raise UserError(f"save_every must be positive, got {save_every}")
    return tuple(sorted({*range(save_every, steps + 1, save_every), steps}))


def encode_corpus(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """The whole corpus as one int32 token stream."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"corpus is empty: {path}")
    return np.asarray(tokenizer.encode(text), np.int32)


def make_train_step(config: mlstm.MLSTMConfig, optimizer: optax.GradientTransformation):
    model = mlstm.MLSTMLanguageModel(config)

    def loss_fn(params, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        state = mlstm.init_state(config, batch.shape[0])
        logits, _ = model.apply({"params": params}, inputs, state, jnp.ones(inputs.shape, bool))
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def train(
    tokens: np.ndarray,
    tokenizer: Tokenizer,
    config: mlstm.MLSTMConfig,
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    mlflow_run_id: str | None = None,
    on_log: Callable[[int, dict], None] | None = None,
    on_checkpoint: Callable[[int, Path, object], None] | None = None,
    on_step: Callable[[int, object], None] | None = None,
) -> list[Path]:
    """Train from a fresh init and write ``output_dir/step_<N>/`` at ``settings.save_steps``.

    ``on_log(step, {"loss", "tokens_per_s"})`` is called every ``log_every`` steps,
    ``on_checkpoint(step, path, params)`` after each checkpoint is written, and
    ``on_step(step, params)`` after every step (a training callback filters the steps itself).
    ``mlflow_run_id`` goes into each checkpoint's metadata: the training run's id, or its
    ``spooled:<identity>`` reference while MLflow has not got it (``TrainingRun.reference``).
    """
    settings.validate()
    window = settings.sequence_length + 1
    if len(tokens) < window:
        raise UserError(
            f"corpus has {len(tokens)} tokens, fewer than one training window of {window}"
        )
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, min(settings.warmup_steps, settings.steps - 1), settings.steps
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=settings.weight_decay)
    )
    params = mlstm.init_params(config, settings.seed)
    opt_state = optimizer.init(params)
    train_step = make_train_step(config, optimizer)
    rng = np.random.default_rng(settings.seed)
    offsets = np.arange(window)
    saved, save_steps = [], set(settings.save_steps)
    interval_start, interval_tokens, paused = time.perf_counter(), 0, 0.0
    for step in range(1, settings.steps + 1):
        starts = rng.integers(0, len(tokens) - window + 1, settings.batch_size)
        params, opt_state, loss = train_step(params, opt_state, tokens[starts[:, None] + offsets])
        interval_tokens += settings.batch_size * settings.sequence_length
        if step % settings.log_every == 0 or step == settings.steps:
            loss = float(loss)  # the only host sync, once per logging interval
            # Live evaluations ran inside this interval; their time is not training throughput.
            elapsed = time.perf_counter() - interval_start - paused
            if on_log:
                on_log(step, {"loss": loss, "tokens_per_s": interval_tokens / elapsed})
            interval_start, interval_tokens, paused = time.perf_counter(), 0, 0.0
        if step in save_steps:
            path = save_checkpoint(
                output_dir, step=step, config=config, params=params, tokenizer=tokenizer,
                mlflow_run_id=mlflow_run_id,
            )
            saved.append(path)
            if on_checkpoint:
                on_checkpoint(step, path, params)
        if on_step:
            started = time.perf_counter()
            on_step(step, params)
            paused += time.perf_counter() - started
    return saved


def print_progress(total_steps: int) -> Callable[[int, dict], None]:
    def report(step: int, metrics: dict) -> None:
        print(
            f"step {step}/{total_steps}  loss {metrics['loss']:.4f}  "
            f"{metrics['tokens_per_s']:,.0f} tokens/s",
            flush=True,
        )

    return report

