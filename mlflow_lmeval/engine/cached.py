"""The response cache in front of an Engine: stored results are reused, new ones stored per batch.

Scoring is cached per piece (a request's window in windowed mode), generation per request, both
under a namespace of everything outside the request that decides its result (see
``response_cache``). A stored piece carries its loss by position, so a cached response gives
results.json the same table as a fresh one. Without a cache or a checkpoint fingerprint every call goes straight to the
engine: live params have no identity.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..response_cache import ResponseCache, namespace, request_key
from . import positions
from .fuse import DocumentResults, PieceResults, fuse_document_results
from .loop import Engine
from .requests import piece_counts


def scoring_mode(engine: Engine) -> str:
    """The engine's effective mode as the namespace has always named it: ``recurrent`` or
    ``fixed:<window length>`` (a new spelling would orphan every stored response)."""
    return "recurrent" if engine.mode == "recurrent" else f"fixed:{engine.max_length}"


class CachedEngine:
    """``score`` and ``generate`` of ``engine``, through ``cache`` when there is a ``fingerprint``."""

    def __init__(self, engine: Engine, cache: ResponseCache | None = None, fingerprint: str | None = None):
        self.engine = engine
        self.cache = cache if fingerprint else None
        self.namespace = (namespace(fingerprint, scoring_mode(engine), engine.settings.scale_logits,
                                     engine.dtype)
                          if self.cache is not None else None)

    def score(self, requests: list[tuple[list[int], list[int]]]) -> DocumentResults:
        """``Engine.score``, computing only the pieces the cache lacks."""
        if self.cache is None:
            return self.engine.score(requests)
        counts = piece_counts(requests, self.engine.max_length)
        slots = [(d, q) for d, count in enumerate(counts, start=1) for q in range(count)]
        keys = [request_key(self.namespace, context, continuation) for context, continuation in requests]
        stored = self.cache.get_pieces((keys[d - 1], q) for d, q in slots)
        found = []
        for d, q in slots:
            if (keys[d - 1], q) in stored:
                loglik, num_tokens, greedy, by_position = stored[keys[d - 1], q]
                found.append((d, q, loglik, num_tokens, greedy, *positions.decode(by_position)))
        parts = [PieceResults(*(np.array(column) for column in zip(*found)))] if found else []
        done = {(d, q) for d, q, *_ in found}
        # None (everything) keeps the command that process 0 broadcasts small on a cold cache.
        missing = [(d, q) for d, q in slots if (d, q) not in done] if done else None

        def store(part: PieceResults) -> None:
            """One transaction per batch: a crash loses at most the batch in flight."""
            self.cache.put_pieces(self.namespace, [
                (keys[part.document_idx[i] - 1], part.sequence_idx[i], part.loglik[i], part.num_tokens[i], part.greedy[i],
                 positions.encode(part.position_nll[i], part.position_tokens[i]))
                for i in np.flatnonzero(part.document_idx > 0)
            ])

        parts.extend(self.engine.score_slots(requests, missing, on_batch=store))
        return fuse_document_results(PieceResults.concatenate(parts), counts)

    def generate(self, contexts: list[list[int]], max_new_tokens: int, finished: Callable[[list[int]], bool],
                 until: list[str]) -> list[list[int]]:
        """``Engine.generate`` where the cache lacks a context's generation; ``until`` (the stop
        strings that ``finished`` checks) is part of every key."""
        generated: dict[int, list[int]] = {}
        if self.cache is not None:
            keys = [request_key(self.namespace, "generate", c, "\x1f".join(until), max_new_tokens) for c in contexts]
            stored = self.cache.get_generations(keys)
            generated = {p: stored[key] for p, key in enumerate(keys) if key in stored}
        missing = [p for p in range(len(contexts)) if p not in generated]

        def store(done: list[tuple[int, list[int]]]) -> None:
            generated.update((missing[local], tokens) for local, tokens in done)
            if self.cache is not None:
                self.cache.put_generations(self.namespace, [(keys[missing[local]], tokens) for local, tokens in done])

        self.engine.generate([contexts[p] for p in missing], max_new_tokens, finished, on_done=store)
        return [generated[p] for p in range(len(contexts))]
