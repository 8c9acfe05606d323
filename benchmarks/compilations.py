"""B4 compilations: how many times the engine traces its step for 100 and for 2,000 requests.

Requests are a seeded mix of real WikiText-2 token spans in the shapes lm-eval sends: a few long
rolling documents, many short (context, continuation) pairs, and multiple-choice groups of four
that share a context. Each count comes from a fresh ``Engine`` (``engine.traces``: traces of
the jitted functions). ``xla_compilations`` counts every XLA backend compile in the same window,
eager operations included, from JAX's monitoring events.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import common


def _span(rng, tokens: np.ndarray, length: int) -> list[int]:
    start = int(rng.integers(0, len(tokens) - length - 1))
    return tokens[start : start + length].tolist()


def _rolling_document(rng, tokens: np.ndarray) -> tuple[list[int], list[int]]:
    """A prefix token and 300-2,000 tokens, as lm-eval sends a ``loglikelihood_rolling`` request."""
    return [1], _span(rng, tokens, int(rng.integers(300, 2000)))


def mixed_requests(tokens: np.ndarray, count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    requests = []
    while len(requests) < count:
        kind = rng.random()
        if kind < 0.02:  # rolling document
            requests.append(_rolling_document(rng, tokens))
        elif kind < 0.6:  # context + short continuation
            requests.append((_span(rng, tokens, int(rng.integers(1, 200))), _span(rng, tokens, int(rng.integers(1, 12)))))
        else:  # four choices sharing one context
            context = _span(rng, tokens, int(rng.integers(2, 200)))
            for _ in range(4):
                requests.append((context, _span(rng, tokens, int(rng.integers(1, 30)))))
    return requests[:count]


def with_rolling_documents(requests, tokens: np.ndarray, count: int, seed: int = 2):
    """``requests`` with its first ``count`` replaced by rolling documents, so that a small mix
    holds every kind of request the large one does."""
    rng = np.random.default_rng(seed)
    return [_rolling_document(rng, tokens) for _ in range(count)] + list(requests[count:])


def _count(model, requests, **settings) -> dict:
    from mlflow_lmeval.engine.loop import Engine

    engine_settings, applied = common.engine_settings(**settings)
    import jax

    jax.clear_caches()  # every count starts from a cold process-wide cache
    engine = Engine(model, engine_settings)
    counter = common.compile_counter()
    start = time.perf_counter()
    with counter.counting():
        result = engine.score(requests)
    return {
        "compilations": engine.traces,
        "xla_compilations": counter.count,
        "xla_compile_s": counter.seconds,
        "seconds": time.perf_counter() - start,
        "requests": len(requests),
        "request_tokens": common.request_tokens(requests),
        "model_tokens": common.model_tokens(engine),
        "scored_tokens": int(np.sum(result.num_tokens)),
        "engine_settings": applied,
    }


def run(tokenizer, directory: Path, quick: bool, preset: str = "tiny") -> dict:
    text = "".join(page for _, page in common.wikitext_articles())
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    model, _ = common.reference_model(preset)
    many = mixed_requests(tokens, 2_000, seed=0)
    few = mixed_requests(tokens, 100, seed=1)
    results = {}
    variants = [("share_prefixes", True)]
    if common.has_share_prefixes():  # the control: which compilations the shared-prefix path adds
        variants.append(("share_prefixes", False))
    for name, value in variants:
        key = f"{name}={value}"
        common.log(f"B4: 100 requests, {key}")
        small = _count(model, few, batch_size=8, chunk_size=64, **{name: value})
        common.log(f"B4: 2,000 requests, {key}")
        large = _count(model, many, batch_size=8, chunk_size=64, **{name: value})
        results[key] = {"100": small, "2000": large}
    default = results[f"{variants[0][0]}={variants[0][1]}"]
    # The step's shapes follow the mix's lengths, not the number of requests: 100 requests that
    # hold rolling documents, as the 2,000 do, against the same 2,000.
    common.log("B4: 100 requests with 2 rolling documents")
    long_few = _count(model, with_rolling_documents(few, tokens, 2), batch_size=8, chunk_size=64)
    return {
        "preset": preset,
        "compilations_100": default["100"]["compilations"],
        "compilations_2000": default["2000"]["compilations"],
        "equal": default["100"]["compilations"] == default["2000"]["compilations"],
        "compilations_100_with_rolling_documents": long_few["compilations"],
        "equal_with_rolling_documents": long_few["compilations"] == default["2000"]["compilations"],
        "with_rolling_documents": long_few,
        "xla_compilations_100": default["100"]["xla_compilations"],
        "xla_compilations_2000": default["2000"]["xla_compilations"],
        "by_setting": results,
        "mix": "2% rolling documents (300-2000 tokens), 58% context 1-200 + continuation 1-12, "
        "40% groups of 4 choices (1-30 tokens) sharing a 2-200-token context",
        "xla_note": "xla_compilations counts every XLA backend compile while the engine scores (its jitted step "
        "and every eager operation), each count after jax.clear_caches()",
        "targets": {"compilations": "equal for 100 and 2,000, and <= 8"},
        "rolling_note": "the 100 requests of seed 1 hold no piece over 202 tokens, so none of their batches "
        "uses a row bucket (fewer rows for a batch over 256 positions); compilations_100_with_rolling_documents "
        "replaces 2 of them by rolling documents of 300-2,000 tokens, as the 2,000 hold 22",
    }
