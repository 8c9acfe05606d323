"""Recurrent states kept on the device between batches: the state after each shared context, for
the continuations that start from it (models that cannot pack contexts with their continuations)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from ..models.protocol import LanguageModel
from . import step

# Fixed-shape reads and writes of a StateTable, so that they compile once.
_take_rows = jax.jit(step.take_rows)
_put_rows = jax.jit(step.put_rows, donate_argnums=(0,))


class StateTable:
    """States after shared context prefixes, on the device as one state of ``block + 2`` rows:
    row 0 is the fresh state, row k the state after the block's k-th prefix, the last row takes a
    batch's padding rows. The row count never changes, so reads and writes compile once."""

    def __init__(self, model: LanguageModel, block: int, place: Callable):
        self.scratch = block + 1
        self.states = place(model.init_state(block + 2))

    def put(self, document_idx: np.ndarray, state) -> None:
        """Batch row i ran prefix ``document_idx[i]`` (0: a padding row); keep its ``state``."""
        rows = np.where(document_idx > 0, document_idx, self.scratch).astype(np.int32)
        self.states = _put_rows(self.states, rows, state)

    def take(self, rows: np.ndarray):
        """The states of ``rows`` (int32 [B]), one per batch row."""
        return _take_rows(self.states, rows)
