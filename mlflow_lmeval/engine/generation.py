"""Greedy generation through the engine: a prefill batch, then blocks of decoded tokens with the
stop conditions checked on the host between blocks (recurrent), or one full pass per token over a
fixed-context window (windowed)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import distributed
from .batching import BatchPlan, MaterializeBatch
from .requests import Piece


class Generation:
    """``Engine``'s generation, apart from its scoring. It uses the engine's ``settings``,
    ``mode``, ``max_length``, ``batch_size``, ``params``, ``_cap_chunk``, ``_run_batch``, ``_bucket``,
    ``_decode``, ``_fetch``, ``_agree`` and ``_leads``."""

    def generate(self, contexts: list[list[int]], max_new_tokens: int, finished: Callable[[list[int]], bool],
                 on_done: Callable[[list[tuple[int, list[int]]]], None] | None = None) -> list[list[int]]:
        """Greedy continuation of each context until ``finished(tokens)`` or ``max_new_tokens``.

        ``on_done([(index, tokens), ...])`` gets each batch of contexts as it finishes."""
        if max_new_tokens < 1 or not contexts:
            return [[] for _ in contexts]
        if self._leads:
            distributed.send("generate", contexts, max_new_tokens)
        return self._generate_all(contexts, max_new_tokens, finished, on_done)

    def _generate_all(self, contexts, max_new_tokens, finished, on_done):
        """``finished`` is None on the processes that follow process 0: they take its decisions."""
        generate = self._generate_recurrent if self.mode == "recurrent" else self._generate_windowed
        # The prefill's rows: the contexts (windowed: also the tokens generated, within the window).
        longest = max(len(c) for c in contexts) + (max_new_tokens if self.mode == "windowed" else 0)
        self._cap_chunk(longest)
        results: list[list[int]] = [None] * len(contexts)  # type: ignore[list-item]
        order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
        for start in range(0, len(order), self.batch_size):
            group = order[start : start + self.batch_size]
            done = list(zip(group, generate([contexts[i] for i in group], max_new_tokens, finished)))
            for index, tokens in done:
                results[index] = tokens
            if on_done:
                on_done(done)
        return results

    def _prefill_batch(self, contexts: list[list[int]]) -> dict[str, np.ndarray]:
        """One batch that feeds every context whole, scoring nothing."""
        pieces = [Piece(i + 1, 0, np.asarray(c, np.int32), np.zeros(len(c), np.int32), 0) for i, c in enumerate(contexts)]
        plan = BatchPlan(tuple(range(len(pieces))), self._bucket(max(p.length for p in pieces)))
        return MaterializeBatch(pieces, self.batch_size)(plan)

    def _generate_recurrent(self, contexts, max_new_tokens, finished):
        state, [totals] = self._run_batch(self._prefill_batch(contexts))
        token = totals.next_token
        outputs = [[int(t)] for t in self._fetch(token)[: len(contexts)]]
        done = self._agree([max_new_tokens <= 1 or (finished is not None and finished(o)) for o in outputs])
        produced = 1
        while not all(done) and produced < max_new_tokens:
            steps = self.settings.generation_block
            state, token, block = self._decode(self.params, state, token, steps)
            block = self._fetch(block)
            for row, output in enumerate(outputs):
                for value in block[row][: max_new_tokens - produced]:
                    if done[row]:
                        break
                    output.append(int(value))
                    if finished is not None:
                        done[row] = finished(output)
            done = self._agree(done)
            produced += steps
        return [o[:max_new_tokens] for o in outputs]

    def _generate_windowed(self, contexts, max_new_tokens, finished):
        """One full pass over the last ``max_length`` tokens per new token."""
        sequences = [list(c) for c in contexts]
        outputs = [[] for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(max_new_tokens):
            active = [i for i in range(len(contexts)) if not done[i]]
            if not active:
                break
            _, [totals] = self._run_batch(self._prefill_batch([sequences[i][-self.max_length :] for i in active]))
            for i, value in zip(active, self._fetch(totals.next_token)):
                sequences[i].append(int(value))
                outputs[i].append(int(value))
                done[i] = finished is not None and finished(outputs[i])
            done = self._agree(done)
        return outputs
