"""B2 shared prefixes: a 5-shot, 4-choice task evaluated with and without ``share_prefixes``.

The task is the Tiny Shakespeare "which line comes next" multiple choice, with five examples from a
separate few-shot split in front of every question, so all four choices of a question share a
long context. Both settings run the same whole lm-eval evaluation, interleaved after a warm-up.
Per-request log-likelihoods are compared between them (they must agree within 1e-4).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import common

SIZES = {"quick": 120, "full": 400}  # questions
REPEATS = {"quick": 3, "full": 5}
DIAGNOSTIC_CHUNK = 16
DIAGNOSTIC_REPEATS = {"quick": 1, "full": 3}
NUM_FEWSHOT = 5


def _chunk_diagnostic(model, tokenizer, directory: Path, task: str, config, repeats: int) -> dict:
    """The same comparison at a small chunk size: a continuation piece of ~13 tokens is padded to
    the chunk, so at chunk 64 most of the branch compute is padding. Shows what the padding costs."""
    common.log(f"B2: diagnostic at chunk size {DIAGNOSTIC_CHUNK}")
    lms, recorders = {}, {}
    for share in (True, False):
        settings, _ = common.engine_settings(batch_size=8, chunk_size=DIAGNOSTIC_CHUNK, share_prefixes=share)
        lms[share] = common.make_lm(model, tokenizer, settings)
        recorders[share] = common.ScoreRecorder(lms[share].engine)
        common.evaluate_lm(lms[share], common.eval_config([task], directory, num_fewshot=NUM_FEWSHOT, limit_requests=4))
    seconds = {True: [], False: []}
    engine_seconds = {True: [], False: []}
    padded = {}
    for _ in range(repeats):
        for share in (False, True):
            recorder = recorders[share]
            recorder.reset()
            with common.timed_batches() as timer:
                start = time.perf_counter()
                common.evaluate_lm(lms[share], config)
                seconds[share].append(time.perf_counter() - start)
            engine_seconds[share].append(recorder.seconds)
            padded[share] = timer.padded_tokens
    return {
        "chunk_size": DIAGNOSTIC_CHUNK,
        "repeats": repeats,
        "seconds_with_sharing": common.median(seconds[True]),
        "seconds_without_sharing": common.median(seconds[False]),
        "speedup": common.median(seconds[False]) / common.median(seconds[True]),
        "engine_speedup": common.median(engine_seconds[False]) / common.median(engine_seconds[True]),
        "padded_tokens_ratio": padded[False] / padded[True] if padded[True] else None,
    }


def run(tokenizer, directory: Path, quick: bool, preset: str = "tiny") -> dict:
    mode = "quick" if quick else "full"
    if not common.has_share_prefixes():
        return {"status": "not measured", "reason": "EngineSettings has no share_prefixes field in this version of the package"}
    docs = common.choice_docs(seed=2)
    questions = SIZES[mode]
    task = common.write_choice_task(directory, "b2_choice_5shot", docs[:questions], train=docs[questions : questions + 400])
    config = common.eval_config([task], directory, num_fewshot=NUM_FEWSHOT)
    model, num_params = common.reference_model(preset)

    runs = {}
    for share in (True, False):
        settings, applied = common.engine_settings(batch_size=8, chunk_size=64, share_prefixes=share)
        lm = common.make_lm(model, tokenizer, settings)
        runs[share] = (lm, common.ScoreRecorder(lm.engine), applied)

    def evaluate(share: bool):
        lm, recorder, _ = runs[share]
        recorder.reset()
        before = common.model_tokens(lm.engine)
        with common.timed_batches() as timer:
            start = time.perf_counter()
            output = common.evaluate_lm(lm, config)
            seconds = time.perf_counter() - start
        after = common.model_tokens(lm.engine)
        return seconds, recorder.seconds, (after - before) if before is not None else None, output, timer

    common.log("B2: warm-up (compiles each engine's step on a few questions)")
    warm = common.eval_config([task], directory, num_fewshot=NUM_FEWSHOT, limit_requests=4)
    for share in (True, False):
        common.evaluate_lm(runs[share][0], warm)
    times = {True: [], False: []}
    engine_times = {True: [], False: []}
    first, snapshot = {}, {}
    for repeat in range(REPEATS[mode]):
        common.log(f"B2: repeat {repeat + 1}/{REPEATS[mode]}")
        for share in (False, True):
            result = evaluate(share)
            first.setdefault(share, result)
            times[share].append(result[0])
            engine_times[share].append(result[1])
            if repeat == 0:
                recorder = runs[share][1]
                snapshot[share] = (recorder.requests, recorder.loglik(), recorder.greedy())

    diagnostic = _chunk_diagnostic(model, tokenizer, directory, task, config, DIAGNOSTIC_REPEATS[mode])
    requests = snapshot[True][0]
    assert requests == snapshot[False][0], "both settings must see the same requests"
    diff = np.abs(snapshot[True][1] - snapshot[False][1])
    tokens_with = first[True][2]
    tokens_without = first[False][2]
    padded = {share: first[share][4].padded_tokens for share in (True, False)}
    expected_with = common.shared_model_tokens(requests)
    expected_without = common.request_tokens(requests)
    contexts = {tuple(c) for c, _ in requests}
    med = {share: common.median(values) for share, values in times.items()}
    med_engine = {share: common.median(values) for share, values in engine_times.items()}
    acc = {
        share: first[share][3]["results"][task].get("acc,none") for share in (True, False)
    }
    return {
        "preset": preset,
        "num_params": num_params,
        "task": task,
        "questions": questions,
        "num_fewshot": NUM_FEWSHOT,
        "choices": 4,
        "requests": len(requests),
        "distinct_contexts": len(contexts),
        "mean_context_tokens": float(np.mean([len(c) for c, _ in requests])),
        "mean_continuation_tokens": float(np.mean([len(x) for _, x in requests])),
        "model_tokens_without_sharing": tokens_without,
        "model_tokens_with_sharing": tokens_with,
        "expected_model_tokens_without_sharing": expected_without,
        "expected_model_tokens_with_sharing": expected_with,
        "model_tokens_ratio": (tokens_without / tokens_with) if tokens_with else None,
        "repeats": REPEATS[mode],
        "seconds_with_sharing": med[True],
        "seconds_without_sharing": med[False],
        "seconds_all": {"with_sharing": times[True], "without_sharing": times[False]},
        "padded_tokens_without_sharing": padded[False],
        "padded_tokens_with_sharing": padded[True],
        "padded_tokens_ratio": padded[False] / padded[True] if padded[True] else None,
        "speedup": med[False] / med[True],
        "engine_score_seconds": {"with_sharing": med_engine[True], "without_sharing": med_engine[False]},
        "engine_speedup": med_engine[False] / med_engine[True],
        "max_abs_loglik_diff": float(diff.max()) if len(diff) else None,
        "greedy_identical": bool(np.array_equal(snapshot[True][2], snapshot[False][2])),
        "acc": {"with_sharing": acc[True], "without_sharing": acc[False]},
        "compilations": {"with_sharing": runs[True][0].engine.traces, "without_sharing": runs[False][0].engine.traces},
        "diagnostic_chunk_size_16": diagnostic,
        "targets": {"model_tokens_ratio": ">= 2.5", "speedup": ">= 2", "max_abs_loglik_diff": "<= 1e-4"},
        "definitions": {
            "model_tokens_ratio": "engine.model_tokens (real tokens through the model) without / with share_prefixes, one evaluation each",
            "speedup": "median whole-evaluation seconds without / with share_prefixes (lm-eval in, results out)",
            "engine_speedup": "the same, counting only the seconds inside Engine.score",
            "padded_tokens_ratio": "positions the device computes (real + padding, all batches) without / with "
            "sharing: the compute ratio, which bounds the speedup; short continuation pieces are padded to a chunk",
        },
    }
