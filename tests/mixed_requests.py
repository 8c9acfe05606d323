"""The mixed requests that the multi-device and multi-host tests score in child processes: a long
document, short pairs, two multiple-choice contexts with four continuations each, one-token
edge cases, with the reference model at small random weights. Importable from those children."""

import numpy as np

VOCAB = 300


def reference_model():
    from mlflow_lmeval.models import mlstm

    config = mlstm.MLSTMConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=2).validate()
    return mlstm.as_language_model(config, mlstm.init_params(config, seed=0))


def mixed_requests(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)

    def tokens(n):
        return rng.integers(4, VOCAB, n).tolist()

    requests = [([1], tokens(333)), ([1], tokens(90))]
    requests += [(tokens(int(n)), tokens(int(m))) for n, m in zip(rng.integers(1, 60, 9), rng.integers(1, 9, 9))]
    for _ in range(2):  # multiple choice: four continuations of one context
        context = tokens(int(rng.integers(20, 70)))
        requests += [(context, tokens(int(m))) for m in rng.integers(1, 6, 4)]
    requests += [([1], tokens(1)), ([7], tokens(5))]
    return requests


def assert_same_results(expected: dict, actual: dict, label: str) -> float:
    """One run's scores and generations equal another's; returns the largest |Δ loglik| relative
    to max(1, |loglik|). Another device or host count is our other path, in another order (XLA
    partitions the step, and a batch is split differently): each scored token within the
    reference model's MLSTM_LOGPROB (tests/conftest.py), added up by token_errors_bound; packed
    rows are summed in float64 on the host."""
    from conftest import MLSTM_LOGPROB, token_errors_bound  # the parent test's; children never call this

    want, got = np.asarray(expected["loglik"]), np.asarray(actual["loglik"])
    bound = token_errors_bound(expected["num_tokens"], MLSTM_LOGPROB)
    assert (np.abs(got - want) <= bound).all(), f"{label}: max |Δ loglik| / bound = {(np.abs(got - want) / bound).max()}"
    relative = float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max())
    for field in ("num_tokens", "greedy", "generated", "stopped"):
        assert expected.get(field) == actual.get(field), f"{label}: {field} differs"
    return relative
