"""The naive evaluator B1 compares against: one request at a time, unbatched, one full pass.

Each request's ``context + continuation`` runs through the model's ``apply`` as one sequence of
batch 1, padded at the end to a multiple of 64 (the model is causal, so the padding cannot change
earlier positions), with log-softmax and the target gather inside the same jitted function, and
the host reads the result before the next request starts. One executable is compiled ahead of
time per padded length; compile time is kept apart (``compile_seconds``) so a timed run after a
warm-up is not charged for it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mlflow_lmeval.engine.fuse import DocumentResults


class NaiveEngine:
    """Stands in for ``Engine`` inside ``JaxLM`` (``score`` only)."""

    mode = "recurrent"
    max_length = None

    def __init__(self, model, multiple: int = 64):
        self.model = model
        self.multiple = multiple
        self.params = model.params
        self.compilations = 0
        self.compile_seconds = 0.0
        self.model_tokens = 0  # real tokens
        self.padded_tokens = 0  # tokens including the padding to a multiple
        self._executables = {}

        def full_pass(params, inputs, targets):
            state = model.init_state(1)
            logits, _ = model.apply(params, inputs, state, jnp.ones(inputs.shape, bool))
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
            return target_log_probs[0], (jnp.argmax(logits, axis=-1) == targets)[0]

        self._jitted = jax.jit(full_pass)

    def _executable(self, length: int):
        executable = self._executables.get(length)
        if executable is None:
            start = time.perf_counter()
            shape = jax.ShapeDtypeStruct((1, length), jnp.int32)
            executable = self._jitted.lower(self.params, shape, shape).compile()
            self.compile_seconds += time.perf_counter() - start
            self.compilations += 1
            self._executables[length] = executable
        return executable

    def _padded(self, length: int) -> int:
        return -(-length // self.multiple) * self.multiple

    def precompile(self, requests) -> None:
        """Compile every padded length these requests need, without running them (the warm-up)."""
        for length in sorted({self._padded(len(c) + len(x) - 1) for c, x in requests}):
            self._executable(length)

    def score(self, requests) -> DocumentResults:
        loglik = np.zeros(len(requests), np.float64)
        num_tokens = np.zeros(len(requests), np.int64)
        greedy = np.zeros(len(requests), bool)
        for index, (context, continuation) in enumerate(requests):
            sequence = np.asarray(list(context) + list(continuation), np.int32)
            length = len(sequence) - 1
            padded = self._padded(length)
            inputs = np.zeros((1, padded), np.int32)
            targets = np.zeros((1, padded), np.int32)
            inputs[0, :length] = sequence[:-1]
            targets[0, :length] = sequence[1:]
            target_log_probs, hits = self._executable(padded)(self.params, inputs, targets)
            target_log_probs, hits = np.asarray(target_log_probs), np.asarray(hits)  # host sync per request
            first = length - len(continuation)
            loglik[index] = float(target_log_probs[first:length].astype(np.float64).sum())
            greedy[index] = bool(hits[first:length].all())
            num_tokens[index] = len(continuation)
            self.model_tokens += length
            self.padded_tokens += padded
        return DocumentResults(loglik, num_tokens, greedy)
