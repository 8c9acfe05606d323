"""Encoded requests become pieces: the unit the device loop scores.

A request is a token sequence ``context + continuation``; only continuation tokens are scored. In
recurrent mode a request is one piece of any length, run in chunks with the state carried. In
fixed-context mode it is cut into windows of at most ``max_length`` inputs with lm-eval's
rolling-window rule: targets are taken ``max_length`` at a time, and each window conditions on
the ``max_length`` tokens before its last target.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Piece:
    """Inputs and next-token targets of one row; the last ``num_scored`` targets are scored.

    ``document_idx`` is 1-based (0 marks a padding row); ``sequence_idx`` orders the pieces of
    one document. ``state_idx`` names the recurrent state the row starts from: 0 is a fresh
    state, k > 0 the state after the k-th shared context prefix. ``first_position`` is the index of
    ``targets[0]`` in the request's token sequence (for the loss by position).
    """

    document_idx: int
    sequence_idx: int
    inputs: np.ndarray  # int32 [L]
    targets: np.ndarray  # int32 [L]
    num_scored: int
    state_idx: int = 0
    first_position: int = 1

    @property
    def length(self) -> int:
        return len(self.inputs)


def whole_piece(document_idx: int, context: list[int], continuation: list[int]) -> Piece:
    sequence = np.asarray(context + continuation, np.int32)
    return Piece(document_idx, 0, sequence[:-1], sequence[1:], len(continuation))


def window_pieces(document_idx: int, context: list[int], continuation: list[int], max_length: int) -> list[Piece]:
    sequence = np.asarray(context + continuation, np.int32)
    pieces = []
    for index, start in enumerate(range(len(context), len(sequence), max_length)):
        end = min(start + max_length, len(sequence))
        first_input = max(0, end - 1 - max_length)
        pieces.append(
            Piece(document_idx, index, sequence[first_input : end - 1], sequence[first_input + 1 : end], end - start,
                  first_position=first_input + 1)
        )
    return pieces


def share_contexts(requests: list[tuple[list[int], list[int]]]) -> tuple[list[np.ndarray], list[Piece]]:
    """Recurrent mode with shared contexts: each context used by several requests runs once.

    Returns the prefixes to run (every shared context but its last token; prefix k is the k-th,
    1-based) and one piece per request. A request with a shared context starts from its prefix's
    state and feeds the context's last token, so its first target is predicted as in a whole run.
    """
    users: dict[tuple, int] = {}
    for context, _ in requests:
        users[tuple(context)] = users.get(tuple(context), 0) + 1
    prefix_of = {}
    prefixes = []
    for context, count in users.items():
        if count > 1 and len(context) > 1:
            prefixes.append(np.asarray(context[:-1], np.int32))
            prefix_of[context] = len(prefixes)
    pieces = []
    for document_idx, (context, continuation) in enumerate(requests, start=1):
        prefix = prefix_of.get(tuple(context))
        if prefix is None:
            pieces.append(whole_piece(document_idx, context, continuation))
        else:
            inputs = np.asarray(context[-1:] + continuation[:-1], np.int32)
            pieces.append(Piece(document_idx, 0, inputs, np.asarray(continuation, np.int32), len(continuation), prefix,
                                first_position=len(context)))
    return prefixes, pieces


def make_pieces(
    requests: list[tuple[list[int], list[int]]], max_length: int | None
) -> list[Piece]:
    """(context, continuation) token lists -> pieces. ``max_length=None`` is recurrent mode.

    Every context must hold at least one token (lm-eval's prefix token for an empty context) and
    every continuation at least one.
    """
    pieces = []
    for document_idx, (context, continuation) in enumerate(requests, start=1):
        if max_length is None:
            pieces.append(whole_piece(document_idx, context, continuation))
        else:
            pieces.extend(window_pieces(document_idx, context, continuation, max_length))
    return pieces


def piece_counts(requests: list[tuple[list[int], list[int]]], max_length: int | None) -> np.ndarray:
    """How many pieces ``make_pieces`` cuts each request into (int64 [D]): one in recurrent mode,
    else one window per ``max_length`` continuation tokens (see ``window_pieces``)."""
    if max_length is None:
        return np.ones(len(requests), np.int64)
    return np.array([-(-len(continuation) // max_length) for _, continuation in requests], np.int64)
