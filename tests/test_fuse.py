"""fuse_document_results: piece results back to one result per request."""

import numpy as np
import pytest

from mlflow_lmeval.engine.fuse import PieceResults, fuse_document_results
from mlflow_lmeval.engine.positions import NUM_BUCKETS


def pieces(rows):
    """rows: (document_idx, sequence_idx, loglik, num_tokens, greedy); each piece's tokens and NLL
    lie in position bucket ``sequence_idx``."""
    columns = list(zip(*rows))
    buckets = np.eye(NUM_BUCKETS)[list(columns[1])]
    return PieceResults(*(np.array(c) for c in columns), buckets * -np.array(columns[2])[:, None],
                        (buckets * np.array(columns[3])[:, None]).astype(np.int64))


def test_multi_piece_documents_sum_and_need_every_piece_greedy():
    result = fuse_document_results(
        pieces([(1, 0, -1.5, 3, True), (1, 1, -2.0, 4, True), (2, 0, -0.5, 1, True), (2, 1, -0.25, 2, False), (3, 0, -4.0, 5, True)]),
        [2, 2, 1],
    )
    # Exact: halves and quarters add without rounding in any order.
    np.testing.assert_array_equal(result.loglik, [-3.5, -0.75, -4.0])
    np.testing.assert_array_equal(result.num_tokens, [7, 3, 5])
    np.testing.assert_array_equal(result.greedy, [True, False, True])
    np.testing.assert_array_equal(result.position_tokens[:, :3], [[3, 4, 0], [1, 2, 0], [5, 0, 0]])
    np.testing.assert_array_equal(result.position_nll[:, :2], [[1.5, 2.0], [0.5, 0.25], [4.0, 0.0]])
    assert result.position_tokens[:, 2:].sum() == 0


def test_order_does_not_matter():
    rows = [(1, 0, -1.0, 1, True), (2, 0, -2.0, 2, False), (1, 1, -3.0, 3, True), (2, 1, -4.0, 4, True)]
    forward = fuse_document_results(pieces(rows), [2, 2])
    backward = fuse_document_results(pieces(rows[::-1]), [2, 2])
    for name in ("loglik", "num_tokens", "greedy", "position_nll", "position_tokens"):
        np.testing.assert_array_equal(getattr(forward, name), getattr(backward, name))


def test_padding_rows_are_ignored():
    result = fuse_document_results(pieces([(0, 0, -99.0, 9, False), (1, 0, -1.0, 1, True), (0, 0, float("nan"), 0, False)]), [1])
    np.testing.assert_array_equal(result.loglik, [-1.0])
    np.testing.assert_array_equal(result.greedy, [True])


def test_missing_piece_fails_loudly():
    with pytest.raises(ValueError, match="missing piece for document 2"):
        fuse_document_results(pieces([(1, 0, -1.0, 1, True), (2, 0, -1.0, 1, True)]), [1, 2])


def test_duplicated_piece_fails_loudly():
    with pytest.raises(ValueError, match="duplicated piece for document 1"):
        fuse_document_results(pieces([(1, 0, -1.0, 1, True), (1, 0, -1.0, 1, True)]), [1])


def test_piece_of_an_unknown_document_fails():
    with pytest.raises(ValueError, match="does not exist"):
        fuse_document_results(pieces([(1, 0, -1.0, 1, True), (3, 0, -1.0, 1, True)]), [1])
