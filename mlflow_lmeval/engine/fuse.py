"""Piece-level results fused back into one result per request."""

from __future__ import annotations

import dataclasses

import numpy as np

from .positions import NUM_BUCKETS, bucket_of


@dataclasses.dataclass(frozen=True)
class PieceResults:
    """One entry per scored row, in any order. Padding rows have ``document_idx == 0``."""

    document_idx: np.ndarray  # int [N]
    sequence_idx: np.ndarray  # int [N]
    loglik: np.ndarray  # float [N], sum of scored target log-probabilities
    num_tokens: np.ndarray  # int [N], scored targets
    greedy: np.ndarray  # bool [N], every scored target was the argmax
    position_nll: np.ndarray  # float [N, K], sum of scored target NLL per position bucket (positions.py)
    position_tokens: np.ndarray  # int [N, K], scored targets per position bucket

    @staticmethod
    def concatenate(parts: list[PieceResults]) -> PieceResults:
        empty = PieceResults(*(np.zeros(0, dtype) for dtype in (np.int64, np.int64, np.float64, np.int64, bool)),
                             np.zeros((0, NUM_BUCKETS), np.float64), np.zeros((0, NUM_BUCKETS), np.int64))
        fields = [f.name for f in dataclasses.fields(PieceResults)]
        return PieceResults(*(np.concatenate([getattr(p, name) for p in [empty, *parts]]) for name in fields))


def sum_positions(batch: dict[str, np.ndarray], log_probs: np.ndarray, greedy: np.ndarray) -> tuple[PieceResults, np.ndarray]:
    """A packed batch's per-position results (float [B, L] target log-probabilities, bool [B, L]
    greedy flags; see ``MaterializeBatch.packed``) summed per piece: its PieceResults, and bool
    [P], whether a piece had a NaN or infinite scored log-probability."""
    scored = batch["scored"]
    piece = batch["piece"][scored].astype(np.int64)
    values = log_probs[scored].astype(np.float64)
    count = len(batch["document_idx"])

    def per_piece(weights=None):
        return np.bincount(piece, weights=weights, minlength=count)

    by_bucket = piece * NUM_BUCKETS + bucket_of(batch["position"][scored])
    size = count * NUM_BUCKETS
    results = PieceResults(
        batch["document_idx"], batch["sequence_idx"], per_piece(values), per_piece().astype(np.int64),
        per_piece(~greedy[scored]) == 0,
        np.bincount(by_bucket, weights=-values, minlength=size).reshape(count, NUM_BUCKETS),
        np.bincount(by_bucket, minlength=size).reshape(count, NUM_BUCKETS).astype(np.int64),
    )
    return results, per_piece(~np.isfinite(values)) > 0


@dataclasses.dataclass(frozen=True)
class DocumentResults:
    loglik: np.ndarray  # float64 [D]
    num_tokens: np.ndarray  # int64 [D]
    greedy: np.ndarray  # bool [D]
    # The loss by position (positions.py); None from a scorer that does not record it.
    position_nll: np.ndarray | None = None  # float64 [D, K]
    position_tokens: np.ndarray | None = None  # int64 [D, K]


def fuse_document_results(results: PieceResults, pieces_per_document: np.ndarray) -> DocumentResults:
    """Sum log-likelihoods, token counts and the loss by position per document; greedy only if
    every piece was greedy.

    ``pieces_per_document[d]`` is how many pieces document ``d + 1`` was cut into. Raises
    ValueError when a piece is missing or appears twice.
    """
    pieces_per_document = np.asarray(pieces_per_document, np.int64)
    num_documents = len(pieces_per_document)
    real = results.document_idx > 0
    document = results.document_idx[real].astype(np.int64) - 1
    sequence = results.sequence_idx[real].astype(np.int64)
    if np.any(document >= num_documents) or np.any(sequence < 0) or np.any(sequence >= pieces_per_document[document]):
        raise ValueError("piece results refer to a document or piece that does not exist")
    offsets = np.concatenate([[0], np.cumsum(pieces_per_document)])
    slot = offsets[document] + sequence
    seen = np.bincount(slot, minlength=offsets[-1])
    if np.any(seen > 1):
        doc = np.searchsorted(offsets, np.argmax(seen > 1), side="right")
        raise ValueError(f"duplicated piece for document {doc}")
    if np.any(seen == 0):
        doc = np.searchsorted(offsets, np.argmax(seen == 0), side="right")
        raise ValueError(f"missing piece for document {doc}")
    loglik = np.bincount(document, weights=results.loglik[real].astype(np.float64), minlength=num_documents)
    num_tokens = np.bincount(document, weights=results.num_tokens[real], minlength=num_documents).astype(np.int64)
    not_greedy = np.bincount(document, weights=~results.greedy[real], minlength=num_documents)
    position_nll = np.zeros((num_documents, NUM_BUCKETS), np.float64)
    position_tokens = np.zeros((num_documents, NUM_BUCKETS), np.int64)
    np.add.at(position_nll, document, results.position_nll[real])
    np.add.at(position_tokens, document, results.position_tokens[real])
    return DocumentResults(loglik, num_tokens, not_greedy == 0, position_nll, position_tokens)
