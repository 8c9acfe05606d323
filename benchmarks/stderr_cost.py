"""Issue 6: what ``bootstrap_iters=100000`` adds to a whole evaluation, against 0.

One lm-eval evaluation of the Tiny Shakespeare last-word task (a few thousand documents; metrics
perplexity and acc, plus our token perplexity) with the tiny model, run with 0 and with 100,000
bootstrap iterations, interleaved. ``seconds_added`` is the difference of the medians;
``stderr_seconds`` times the stderr functions themselves (``mlflow_lmeval.stats.stderr_for`` and
``token_perplexity``, wrapped from outside), which is less exposed to the machine's noise.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlflow_lmeval import stats

from . import common

REPEATS = {"quick": 2, "full": 3}
DOCUMENTS = {"quick": 2_000, "full": None}  # None: every eligible speech (about 3,700)
# The bootstrap's cost depends on the number of documents, not their length: quick mode keeps every
# document but only the last 24 words of its context, so the model part stays short.
CONTEXT_WORDS = {"quick": 24, "full": None}


def run(tokenizer, directory: Path, quick: bool, preset: str = "tiny") -> dict:
    mode = "quick" if quick else "full"
    docs = common.lastword_docs(DOCUMENTS[mode])
    if CONTEXT_WORDS[mode]:
        docs = [{**d, "context": " ".join(d["context"].split()[-CONTEXT_WORDS[mode]:])} for d in docs]
    task = common.write_lastword_task(directory, "bootstrap_lastword", docs)
    model, _ = common.reference_model(preset)
    settings, _ = common.engine_settings(batch_size=8, chunk_size=64)
    lm = common.make_lm(model, tokenizer, settings)
    watch = common.Stopwatch()

    def timed(function):
        def wrapper(*args, **kwargs):
            with watch():
                return function(*args, **kwargs)

        return wrapper

    def evaluate(iters: int):
        config = common.eval_config([task], directory, bootstrap_iters=iters)
        watch.seconds = 0.0
        with common.patched(stats, "stderr_for", timed(stats.stderr_for)), \
                common.patched(stats, "token_perplexity", timed(stats.token_perplexity)):
            start = time.perf_counter()
            output = common.evaluate_lm(lm, config)
            seconds = time.perf_counter() - start
        return seconds, watch.seconds, output

    common.log("B-stats: warm-up")
    warm = common.eval_config([task], directory, bootstrap_iters=0, limit_requests=4)
    common.evaluate_lm(lm, warm)  # compiles the engine step
    times = {0: [], 100_000: []}
    stderr_seconds = []
    output = None
    for repeat in range(REPEATS[mode]):
        common.log(f"B-stats: repeat {repeat + 1}/{REPEATS[mode]}")
        seconds, _, _ = evaluate(0)
        times[0].append(seconds)
        seconds, inside, output = evaluate(100_000)
        times[100_000].append(seconds)
        stderr_seconds.append(inside)
    row = output["results"][task]
    return {
        "task": task,
        "documents": len(docs),
        "context_words": CONTEXT_WORDS[mode] or "up to 79",
        "preset": preset,
        "repeats": REPEATS[mode],
        "seconds_iters_0": common.median(times[0]),
        "seconds_iters_100000": common.median(times[100_000]),
        "seconds_all": {"0": times[0], "100000": times[100_000]},
        "seconds_added": common.median(times[100_000]) - common.median(times[0]),
        "stderr_seconds": common.median(stderr_seconds),
        "stderrs": {k: v for k, v in row.items() if "_stderr," in k},
        "target": "a few seconds at most",
    }
