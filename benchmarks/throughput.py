"""B1 throughput and the overlap figure.

Scored tokens/s of a whole evaluation through lm-eval (requests built from task YAML, results and
metrics out) on three local tasks made from real text:

- ``wiki``: WikiText-2 validation articles, ``loglikelihood_rolling`` (the shape of ``wikitext``);
- ``lastword``: the last word of Tiny Shakespeare speeches, ``loglikelihood`` (lambada's shape);
- ``choice``: which line comes next, 4 choices, ``multiple_choice``, 0-shot.

Three ways to do the same work, interleaved repeat by repeat after a warm-up:

- ``engine``: ``JaxLM`` with the package's ``Engine`` (the product);
- ``naive``: the same ``JaxLM`` whose engine is ``benchmarks.naive.NaiveEngine`` (one request at a
  time, batch 1, a full pass each, padded to a multiple of 64, compiled ahead, compile time excluded);
- ``bound``: the jitted model forward over perfectly packed full ``[batch_size, chunk_size]``
  batches, the state carried chunk to chunk, of as many tokens as the engine's model processed;
  no tokenization, no lm-eval. ``bound_scoring`` adds the log-softmax and target gather.

Overlap: ``mlflow_lmeval.engine.loop.batch_stream`` is wrapped from outside; the time the host
spends blocked waiting for the next batch is an upper bound on the time the device sits idle for
want of input (the previous batch may still be running while the host waits).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mlflow_lmeval.engine.cached import CachedEngine

from . import common
from .naive import NaiveEngine

SIZES = {
    # preset: (wiki articles, shortest first; lastword docs; choice docs)
    "quick": {"tiny": (8, 400, 100), "small": (8, 100, 25)},
    "full": {"tiny": (60, 2000, 500), "small": (24, 400, 100)},
}
REPEATS = {"quick": 3, "full": 5}
# The packed bound runs at a steady rate per chunk, so it is timed on at most this many chunks and
# expressed as a rate (tokens/s); the batch-1 rate shows what batching can gain on this hardware.
BOUND_CHUNKS = {"quick": {"tiny": 48, "small": 12}, "full": {"tiny": 160, "small": 40}}


def packed_bound(model, batch_size: int, chunk_size: int, tokens: np.ndarray, scoring: bool | str):
    """A function that runs ``len(tokens)`` tokens as full ``[batch_size, chunk_size]`` chunks
    (the state carried) and returns the wall seconds; ``warm()`` compiles it.

    ``scoring``: False, the forward only; True, plus log-softmax and target gather; "argmax" or
    "max", plus the all-greedy flag computed as ``argmax == target`` or as ``target logit >= max``
    (a diagnostic of what the greedy flag costs).
    """
    rows = batch_size * chunk_size
    steps = max(1, -(-len(tokens) // rows))
    packed = np.resize(np.asarray(tokens, np.int32), steps * rows + 1)
    inputs = packed[:-1].reshape(steps, batch_size, chunk_size)
    targets = packed[1:].reshape(steps, batch_size, chunk_size)
    mask = np.ones((batch_size, chunk_size), bool)

    def step(params, state, total, inputs, targets):
        logits, state = model.apply(params, inputs, state, mask)
        logits = logits.astype(jnp.float32)
        if scoring:
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
            total = total + picked.sum(-1)
            if scoring == "argmax":
                total = total + jnp.all(jnp.argmax(logits, axis=-1) == targets, axis=-1)
            elif scoring == "max":
                target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
                total = total + jnp.all(target_logits >= logits.max(-1), axis=-1)
            return state, total
        # Every logit must be computed: reduce over the vocabulary, keep one number per row.
        return state, total + logits.max(-1).sum(-1)

    jitted = jax.jit(step, donate_argnums=(1, 2))

    def run() -> float:
        start = time.perf_counter()
        state = model.init_state(batch_size)
        total = jnp.zeros((batch_size,), jnp.float32)
        for index in range(steps):
            state, total = jitted(model.params, state, total, inputs[index], targets[index])
        jax.block_until_ready((state, total))
        return time.perf_counter() - start

    def warm() -> None:
        # Two steps: a fresh state and a carried one are placed differently, and each compiles once
        # (with one warm-up step the first timed repeat paid for the second compile).
        state, total = jitted(model.params, model.init_state(batch_size), jnp.zeros((batch_size,), jnp.float32), inputs[0], targets[0])
        state, total = jitted(model.params, state, total, inputs[0], targets[0])
        jax.block_until_ready((state, total))

    run.steps = steps
    run.tokens = steps * rows
    run.warm = warm
    return run


def _label_calls(lm, recorder):
    """Tag each engine call with the lm-eval request type that made it."""
    for kind in ("loglikelihood", "loglikelihood_rolling"):
        original = getattr(lm, kind)

        def tagged(requests, *args, _original=original, _kind=kind, **kwargs):
            recorder.kind = _kind
            return _original(requests, *args, **kwargs)

        setattr(lm, kind, tagged)
    recorder.kind = None
    score = recorder.__call__

    def call(requests):
        result = score(requests)
        recorder.calls[-1]["kind"] = recorder.kind
        return result

    recorder.engine.score = call


def _per_kind(recorder) -> dict:
    kinds = {}
    for call in recorder.calls:
        entry = kinds.setdefault(call.get("kind") or "unknown", {"seconds": 0.0, "scored_tokens": 0, "requests": 0})
        entry["seconds"] += call["seconds"]
        entry["scored_tokens"] += int(np.sum(call["results"].num_tokens))
        entry["requests"] += len(call["requests"])
    return kinds


def run_preset(preset: str, tokenizer, directory: Path, quick: bool, settings_values: dict) -> dict:
    mode = "quick" if quick else "full"
    repeats = REPEATS[mode]
    tasks = common.write_mixed_tasks(directory, f"b1_{preset}", SIZES[mode][preset])
    config = common.eval_config(tasks, directory)
    model, num_params = common.reference_model(preset)
    settings, applied = common.engine_settings(**settings_values)

    engine_lm = common.make_lm(model, tokenizer, settings)
    engine_rec = common.ScoreRecorder(engine_lm.engine)
    _label_calls(engine_lm, engine_rec)
    naive_lm = common.make_lm(model, tokenizer, settings)
    naive = NaiveEngine(model)
    naive_lm.engine = naive
    naive_lm.responses = CachedEngine(naive)  # no cache: every call goes to the naive engine
    naive_rec = common.ScoreRecorder(naive)
    _label_calls(naive_lm, naive_rec)

    def engine_run():
        engine_rec.reset()
        before = common.model_tokens(engine_lm.engine)
        computed_before = common.model_tokens(engine_lm.engine, "computed_tokens")
        with common.timed_batches() as timer:
            start = time.perf_counter()
            output = common.evaluate_lm(engine_lm, config)
            seconds = time.perf_counter() - start
        after = common.model_tokens(engine_lm.engine)
        # The positions the step really ran: a row-bucketed batch runs fewer rows than it holds.
        computed = common.model_tokens(engine_lm.engine, "computed_tokens") - computed_before if computed_before is not None else None
        return seconds, output, (after - before) if before is not None else None, timer, computed

    def naive_run():
        naive_rec.reset()
        compile_before = naive.compile_seconds
        start = time.perf_counter()
        output = common.evaluate_lm(naive_lm, config)
        seconds = time.perf_counter() - start
        return seconds - (naive.compile_seconds - compile_before), output

    # The whole evaluation once: a few requests per task left the row-bucket shapes of the long
    # batches to compile in the first timed repeat (10.3 s against 2.4-2.7 s for the others, tiny).
    # The naive side's compile time is excluded too.
    common.log(f"B1 {preset}: warm-up (the whole evaluation once: compiles every step shape)")
    start = time.perf_counter()
    common.evaluate_lm(engine_lm, config)
    engine_warmup = time.perf_counter() - start

    times = {"engine": [], "naive": [], "bound": [], "bound_scoring": [], "bound_batch1": [],
             "scoring_greedy_argmax": [], "scoring_greedy_max": []}
    engine_score_s, blocked, kinds_engine, kinds_naive, timers = [], [], [], [], []
    for repeat in range(repeats):
        common.log(f"B1 {preset}: repeat {repeat + 1}/{repeats}")
        seconds, output, tokens, timer, computed = engine_run()
        times["engine"].append(seconds)
        engine_score_s.append(engine_rec.seconds)
        blocked.append(timer.blocked)
        timers.append(timer)
        kinds_engine.append(_per_kind(engine_rec))
        if repeat == 0:
            engine_output, engine_model_tokens, engine_computed = output, tokens, computed
            requests = engine_rec.requests
            scored = engine_rec.scored_tokens()
            req_tokens = common.request_tokens(requests)
            sharing = bool(applied.get("share_prefixes", False)) and common.has_share_prefixes()
            expected_model_tokens = common.shared_model_tokens(requests) if sharing else req_tokens
            bound_tokens = engine_model_tokens if engine_model_tokens is not None else expected_model_tokens
            common.log(f"B1 {preset}: compiling the naive evaluator's shapes and the packed bound")
            naive.precompile(requests)
            stream = np.concatenate([np.asarray(c + x, np.int32) for c, x in requests])
            batch_size, chunk = engine_lm.engine.batch_size, settings.chunk_size
            timed_tokens = min(bound_tokens, BOUND_CHUNKS[mode][preset] * batch_size * chunk)
            bound = packed_bound(model, batch_size, chunk, stream[:timed_tokens], scoring=False)
            bound_scoring = packed_bound(model, batch_size, chunk, stream[:timed_tokens], scoring=True)
            batch1 = packed_bound(model, 1, chunk, stream[: timed_tokens // batch_size], scoring=False)
            greedy_argmax = packed_bound(model, batch_size, chunk, stream[:timed_tokens], scoring="argmax")
            greedy_max = packed_bound(model, batch_size, chunk, stream[:timed_tokens], scoring="max")
            for function in (bound, bound_scoring, batch1, greedy_argmax, greedy_max):
                function.warm()
        seconds, _ = naive_run()
        times["naive"].append(seconds)
        kinds_naive.append(_per_kind(naive_rec))
        if repeat == 0:
            loglik_diff = np.abs(engine_rec.loglik() - naive_rec.loglik())
            naive_max_diff = float(loglik_diff.max())
            naive_max_rel = float(np.max(loglik_diff / np.maximum(1.0, np.abs(naive_rec.loglik()))))
            greedy_equal = bool(np.array_equal(engine_rec.greedy(), naive_rec.greedy()))
        times["bound"].append(bound())
        times["bound_scoring"].append(bound_scoring())
        times["bound_batch1"].append(batch1())
        times["scoring_greedy_argmax"].append(greedy_argmax())
        times["scoring_greedy_max"].append(greedy_max())

    med = {name: common.median(values) for name, values in times.items()}
    engine_score = common.median(engine_score_s)
    rate = {name: run.tokens / med[name] for name, run in (
        ("bound", bound), ("bound_scoring", bound_scoring), ("bound_batch1", batch1),
        ("scoring_greedy_argmax", greedy_argmax), ("scoring_greedy_max", greedy_max))}
    computed_rate = engine_computed / engine_score if engine_computed else None
    per_kind = {}
    for kind in kinds_engine[0]:
        e = common.median([k[kind]["seconds"] for k in kinds_engine])
        n = common.median([k[kind]["seconds"] for k in kinds_naive if kind in k])
        per_kind[kind] = {
            "requests": kinds_engine[0][kind]["requests"],
            "scored_tokens": kinds_engine[0][kind]["scored_tokens"],
            "engine_score_s": e,
            "naive_score_s": n,
            "engine_score_speedup_vs_naive": n / e if n and e else None,
        }
    metrics = {task: {k: v for k, v in row.items() if not k.endswith("_stderr,none") and k != "alias"} for task, row in engine_output["results"].items()}
    return {
        "preset": preset,
        "num_params": num_params,
        "tasks": tasks,
        "documents": dict(zip(("wiki_articles", "lastword_docs", "choice_docs"), SIZES[mode][preset])),
        "wiki_selection": f"the {SIZES[mode][preset][0]} shortest of the 60 WikiText-2 validation articles",
        "engine_settings": applied,
        "requests": len(requests),
        "scored_tokens": scored,
        "request_tokens": req_tokens,
        "engine_model_tokens": engine_model_tokens,
        "expected_model_tokens": expected_model_tokens,
        "repeats": repeats,
        "seconds": med,
        "seconds_all": times,
        "engine_warmup_s": engine_warmup,
        "engine_padded_tokens": timers[0].padded_tokens,
        "engine_padding_efficiency": timers[0].real_tokens / timers[0].padded_tokens if timers[0].padded_tokens else None,
        "engine_computed_tokens": engine_computed,
        "engine_computed_efficiency": engine_model_tokens / engine_computed if engine_computed and engine_model_tokens else None,
        "naive_compilations": naive.compilations,
        "naive_compile_s": naive.compile_seconds,
        "naive_padded_tokens": naive.padded_tokens // repeats,
        "engine_compilations": engine_lm.engine.traces,
        "scored_tokens_per_s": scored / med["engine"],
        "naive_scored_tokens_per_s": scored / med["naive"],
        "speedup_vs_naive": med["naive"] / med["engine"],
        "speedup_vs_naive_per_repeat": [n / e for n, e in zip(times["naive"], times["engine"])],
        "bound_tokens_timed": bound.tokens,
        "bound_model_tokens_per_s": rate["bound"],
        "bound_scoring_tokens_per_s": rate["bound_scoring"],
        "bound_batch1_tokens_per_s": rate["bound_batch1"],
        "batching_headroom": rate["bound"] / rate["bound_batch1"],
        "engine_model_tokens_per_s": bound_tokens / med["engine"],
        "fraction_of_bound": (bound_tokens / med["engine"]) / rate["bound"],
        "fraction_of_bound_scoring": (bound_tokens / med["engine"]) / rate["bound_scoring"],
        "fraction_of_bound_request_tokens": (req_tokens / med["engine"]) / rate["bound"],
        "fraction_of_bound_engine_only": (bound_tokens / engine_score) / rate["bound"],
        "engine_score_s": engine_score,
        "outside_engine_fraction": 1.0 - engine_score / med["engine"],
        "per_request_type": per_kind,
        "diagnostics": {
            "engine_computed_tokens_per_s_in_score": computed_rate,
            "engine_step_efficiency_vs_bound_scoring": computed_rate / rate["bound_scoring"] if computed_rate else None,
            "packed_scoring_greedy_argmax_tokens_per_s": rate["scoring_greedy_argmax"],
            "packed_scoring_greedy_max_tokens_per_s": rate["scoring_greedy_max"],
            "greedy_argmax_cost": rate["bound_scoring"] / rate["scoring_greedy_argmax"],
            "greedy_max_cost": rate["bound_scoring"] / rate["scoring_greedy_max"],
            "reading": "fraction_of_bound ~= engine_computed_efficiency * engine_step_efficiency_vs_bound_scoring "
            "* (1 - outside_engine_fraction) * bound_scoring/bound rate; greedy_*_cost = time of a packed "
            "scoring step with the all-greedy flag / without it (argmax: as the engine computes it; max: "
            "target logit >= max logit)",
        },
        "overlap": {
            "input_wait_s": common.median(blocked),
            "engine_score_s": engine_score,
            "evaluation_s": med["engine"],
            "device_idle_fraction_of_engine": common.median([b / s for b, s in zip(blocked, engine_score_s)]),
            "device_idle_fraction_of_evaluation": common.median(
                [(b + (t - s)) / t for b, s, t in zip(blocked, engine_score_s, times["engine"])]
            ),
            "batches": timers[0].batches,
        },
        "naive_max_abs_loglik_diff": naive_max_diff,
        "naive_max_rel_loglik_diff": naive_max_rel,
        "naive_greedy_equal": greedy_equal,
        "metrics": metrics,
        "definitions": {
            "scored_tokens_per_s": "scored tokens (continuations; every token of a rolling document) / median wall "
            "seconds of the whole lm-eval evaluation (bootstrap_iters=0, cache_requests=False)",
            "speedup_vs_naive": "median naive evaluation seconds (compile excluded) / median engine evaluation seconds",
            "fraction_of_bound": "engine model tokens per evaluation second / packed-forward tokens per second "
            "(the same tokens as full [batch_size, chunk_size] chunks, forward only)",
            "batching_headroom": "packed-forward tokens/s at batch_size / at batch 1: the most any batching can gain "
            "over one-request-at-a-time on this hardware",
            "fraction_of_bound_scoring": "as fraction_of_bound, the packed run also computing log-softmax and target gather",
            "fraction_of_bound_request_tokens": "the bound over all request tokens (no prefix sharing), the engine "
            "credited with them: counts the savings of shared prefixes",
            "engine_padding_efficiency": "real / padded tokens over the batches the engine ran (one evaluation), "
            "rows x length of each batch",
            "engine_computed_efficiency": "model tokens / positions the engine's step ran (Engine.computed_tokens, one "
            "evaluation): below engine_padding_efficiency's count wherever a row-bucketed batch ran fewer rows",
            "fraction_of_bound_engine_only": "as fraction_of_bound, but only the seconds inside Engine.score",
            "outside_engine_fraction": "share of evaluation wall time spent outside Engine.score (lm-eval building "
            "requests, tokenization, metrics): the device is idle then",
            "device_idle_fraction_of_engine": "seconds blocked in the batch iterator / seconds inside Engine.score "
            "(an upper bound: the device may still run the previous batch meanwhile)",
            "device_idle_fraction_of_evaluation": "(blocked in the batch iterator + outside Engine.score) / evaluation wall",
        },
    }


def run(tokenizer, directory: Path, quick: bool, presets=("tiny", "small")) -> dict:
    settings = {"batch_size": 8, "chunk_size": 64, "share_prefixes": True}
    results = {preset: run_preset(preset, tokenizer, directory, quick, settings) for preset in presets}
    return {
        "presets": results,
        "speedup_vs_naive": {p: r["speedup_vs_naive"] for p, r in results.items()},
        "fraction_of_bound": {p: r["fraction_of_bound"] for p, r in results.items()},
        "scored_tokens_per_s": {p: r["scored_tokens_per_s"] for p, r in results.items()},
        "targets": {"speedup_vs_naive": ">= 10", "fraction_of_bound": ">= 0.7"},
    }
