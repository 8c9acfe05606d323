"""The lm-eval model: lm-eval's requests in, the engine's results out, with lm-eval's semantics."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .chat_template import ChatTemplate, special_tokens
from .chat_template import resolve as resolve_chat_template
from .engine import positions
from .engine.cached import CachedEngine
from .engine.fuse import DocumentResults
from .engine.loop import Engine, EngineSettings, NonFiniteLogits
from .errors import UserError
from .models.protocol import LanguageModel
from .tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256


@register_model("mlflow_lmeval", "jax-recurrent")
class JaxLM(TemplateLM):
    """Serves ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` from a JAX model.

    ``document_scores`` records, per task, the (log-likelihood, scored tokens) of every
    loglikelihood and rolling request, for token-level statistics afterwards; ``position_sums``,
    per task, their summed loss by position (engine/positions.py; recurrent mode only).
    """

    backend = "causal"

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        settings: EngineSettings = EngineSettings(),  # noqa: B008 (frozen: one shared default is safe)
        chat_template: bool | str = False,
        show_progress: bool = True,
        cache=None,
        fingerprint: str | None = None,
    ):
        """``cache`` (a ResponseCache) and the checkpoint's ``fingerprint`` make the evaluation
        resumable; without a fingerprint nothing is cached (live params have no identity)."""
        super().__init__()
        if tokenizer.vocab_size > model.vocab_size:
            raise UserError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's ({model.vocab_size})")
        self.tokenizer = tokenizer
        self.engine = Engine(model, settings, progress=_ProgressBar() if show_progress else None)
        self.responses = CachedEngine(self.engine, cache, fingerprint)
        # Chosen now, so a missing template fails before any work.
        self._chat = resolve_chat_template(chat_template, tokenizer) if chat_template else None
        self.document_scores: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        self.position_sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # task -> (nll float64 [K], tokens int64 [K])
        self._last_results: DocumentResults | None = None

    # ---- tokenization -----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """lm-eval's ``hf`` rule: BOS where the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None and bos >= 0 else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's identity (lm-eval puts it into its request-cache key). A tokenizer
        without a ``name`` is named by its class: requests are strings, and what chat-template
        rendering takes from the tokenizer is keyed apart (``chat_identity``)."""
        name = getattr(self.tokenizer, "name", None)
        return name or f"{type(self.tokenizer).__module__}.{type(self.tokenizer).__qualname__}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring ------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        for request in requests:
            context, continuation = request.args
            # TemplateLM indexes the encoded continuation of an empty context before we see it;
            # every other empty continuation is caught in _loglikelihood_tokens without encoding twice.
            if context == "" and not self.tok_encode(continuation):
                raise UserError(f"request {_describe(request)} has a continuation that tokenizes to nothing: {continuation!r}")
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._record(requests, [loglik for loglik, _ in results])
        return results

    def _record(self, requests, logliks) -> None:
        """Keep per task what ``_last_results`` (the engine's results for ``requests``) adds up to."""
        results = self._last_results
        for request, loglik, count in zip(requests, logliks, results.num_tokens):
            self.document_scores[request.task_name].append((loglik, int(count)))
        if results.position_nll is None or not self.engine.by_position:
            return
        for index, request in enumerate(requests):
            nll, tokens = self.position_sums.get(request.task_name) or (0.0, 0)
            self.position_sums[request.task_name] = (nll + results.position_nll[index],
                                                     tokens + results.position_tokens[index])

    def loss_by_position(self) -> dict:
        """results.json's ``loss_by_position``: per task, ``positions.table``'s rows; in windowed
        mode a note saying why there is none."""
        if not self.engine.by_position:
            return {"mode": "windowed",
                    "reason": "fixed-context windows: a target sees at most one window of context, whatever its position"}
        return {task: positions.table(nll, tokens) for task, (nll, tokens) in sorted(self.position_sums.items())}

    def _score(self, encoded, described):
        """engine.score, with a non-finite result named by the lm-eval request that produced it."""
        try:
            return self.responses.score(encoded)
        except NonFiniteLogits as error:
            raise UserError(f"the model produced NaN or inf log-probabilities for {described(error.document_idx - 1)}") from None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        for (context, continuation), _, continuation_tokens in requests:
            if not continuation_tokens:
                raise UserError(f"the request with context {context[-60:]!r} has a continuation that tokenizes to nothing: {continuation!r}")
        encoded = [(context, continuation) for _, context, continuation in requests]
        results = self._score(encoded, lambda i: f"context {requests[i][0][0][-60:]!r} + continuation {requests[i][0][1][:60]!r}")
        self._last_results = results
        return [(float(loglik), bool(greedy)) for loglik, greedy in zip(results.loglik, results.greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # lm-eval's hf backend scores a document as the sum over its rolling windows
        # (utils.get_rolling_token_windows), and a document that tokenizes to nothing has none: it
        # scores 0.0 over 0 tokens, which adds nothing to a perplexity's sums. So here; only the
        # other documents reach the engine.
        tokens = [self.tok_encode(request.args[0]) for request in requests]
        scored = [index for index, document in enumerate(tokens) if document]
        results = self._score([([self.prefix_token_id], tokens[i]) for i in scored],
                              lambda k: f"request {_describe(requests[scored[k]])}") if scored else None
        self._last_results = _among_empty_documents(results, scored, len(requests))
        logliks = [float(loglik) for loglik in self._last_results.loglik]
        self._record(requests, logliks)
        return logliks

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs: list[str] = [""] * len(requests)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for index, request in enumerate(requests):
            until, max_gen_toks = self._generation_settings(request.args[1])
            groups[(tuple(until), max_gen_toks)].append(index)
        for (until, max_gen_toks), indices in groups.items():
            contexts = []
            for i in indices:
                tokens = self.tok_encode(requests[i].args[0])
                contexts.append(tokens if tokens else [self.prefix_token_id])
            if self.engine.max_length is not None:
                contexts = [c[-self.engine.max_length :] for c in contexts]
            generated = self.responses.generate(contexts, max_gen_toks, _stop_checker(self, until), list(until))
            for i, tokens in zip(indices, generated):
                outputs[i] = _cut_at_stop(self.tok_decode([t for t in tokens if t != self.eot_token_id]), until)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_gen_toks = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if max_gen_toks < 1:
            raise UserError(f"max_gen_toks must be positive, got {max_gen_toks}")
        return list(until), max_gen_toks

    # ---- chat ------------------------------------------------------------------------------------
    def chat_identity(self) -> dict | None:
        """What the chat prompts depend on: the template (its text and where it came from) and the
        special tokens it sees. results.json's ``chat_template`` section and the request cache's
        key; None without a template."""
        if self._chat is None:
            return None
        return {**self._chat.describe(), "special_tokens": special_tokens(self.tokenizer)}

    def _chat_for(self, requested: bool | str) -> ChatTemplate:
        if self._chat is None:  # lm-eval's own CLI asks here first, not in __init__
            self._chat = resolve_chat_template(requested, self.tokenizer)
        return self._chat

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template text in use (lm-eval keys its requests on it); None when ``chat_template``
        is false, lm-eval's way of saying there is none."""
        return self._chat_for(chat_template).text if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._chat_for(True).render(chat_history, add_generation_prompt=add_generation_prompt,
                                           special_tokens=special_tokens(self.tokenizer))


def _among_empty_documents(results: DocumentResults | None, at: list[int], count: int) -> DocumentResults:
    """``results`` (None for none) of the documents ``at`` among ``count``; the others have no tokens:
    log-likelihood 0.0, 0 tokens, greedy (every one of their no tokens was), no loss by position."""
    if results is None:
        return DocumentResults(np.zeros(count), np.zeros(count, np.int64), np.ones(count, bool))

    def place(values, fill):
        if values is None:
            return None
        full = np.full((count, *values.shape[1:]), fill, values.dtype)
        full[at] = values
        return full

    return DocumentResults(place(results.loglik, 0.0), place(results.num_tokens, 0), place(results.greedy, True),
                           place(results.position_nll, 0.0), place(results.position_tokens, 0))


def _describe(request) -> str:
    return f"{request.task_name}#{request.doc_id}" if getattr(request, "task_name", None) else str(request.args)[:80]


def _cut_at_stop(text: str, until) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def _stop_checker(lm: JaxLM, until):
    def finished(tokens: list[int]) -> bool:
        if tokens and tokens[-1] == lm.eot_token_id:
            return True
        if not until:
            return False
        # A stop string can straddle tokens, so check the decoded tail.
        text = lm.tok_decode(tokens)
        return any(stop and stop in text for stop in until)

    return finished


class _ProgressBar:
    """tqdm over the scored tokens of one engine call, showing tokens/s."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None or done < self.bar.n:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="evaluating", leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None
