"""Benchmark: mlflow_lmeval.bootstrap vs lm-eval's own bootstrap_stderr.

    python -m benchmarks.bootstrap --json OUT.json [--quick]

Same synthetic per-document data for both.  Ours runs the full iteration
count; lm-eval's pure-Python loop is timed at fewer iterations (pool disabled
with DISABLE_MULTIPROC=1, so one process) and scaled linearly, which is exact
for its loop up to a constant start-up cost.  Times are medians over repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import time
from importlib.metadata import version

import numpy as np

from mlflow_lmeval import stats
from mlflow_lmeval.bootstrap import bootstrap_stderr, default_workers

N_DOCS = 5_000


def _data(n: int):
    rng = np.random.default_rng(0)
    logliks = rng.normal(-2.0, 0.8, size=n)
    words = rng.integers(20, 400, size=n).astype(float)
    pairs = np.stack([-words * rng.gamma(4.0, 0.4, size=n), words], axis=1)
    return logliks, pairs


def _timed(fn, repeats: int):
    """Median wall seconds, all wall seconds, median process CPU seconds, value."""
    times, cpu, value = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), times, statistics.median(cpu), value


def _lm_eval_stderr(lm, aggregate, items, iters):
    # Its no-pool path prints a banner and a tqdm bar; keep them off the report.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return lm.bootstrap_stderr(aggregate, items, iters)


def run(quick: bool) -> dict:
    os.environ["DISABLE_MULTIPROC"] = "1"
    from lm_eval.api import metrics as lm

    ours_iters = 10_000 if quick else 100_000
    lm_iters = 200 if quick else 2_000
    repeats = 1 if quick else 3
    scale = ours_iters / lm_iters
    logliks, pairs = _data(N_DOCS)
    cases = {
        "perplexity": (stats.perplexity, logliks, lm.perplexity, list(logliks)),
        "median": (stats.median, logliks, lm.median, list(logliks)),
        "word_perplexity": (
            stats.word_perplexity,
            pairs,
            lm.weighted_perplexity,
            [tuple(p) for p in pairs.tolist()],
        ),
    }
    bootstrap_stderr(stats.perplexity, logliks, 100)  # warm-up: BLAS, thread pool

    results = {}
    for name, (ours_agg, ours_x, lm_agg, lm_items) in cases.items():
        ours_s, ours_all, ours_cpu, ours_se = _timed(
            lambda agg=ours_agg, x=ours_x: bootstrap_stderr(agg, x, ours_iters, seed=1234), repeats
        )
        single_s, _, _, _ = _timed(
            lambda agg=ours_agg, x=ours_x: bootstrap_stderr(agg, x, ours_iters, seed=1234, workers=1),
            repeats,
        )
        lm_s, lm_all, lm_cpu, lm_se = _timed(
            lambda agg=lm_agg, items=lm_items: _lm_eval_stderr(lm, agg, items, lm_iters), repeats
        )
        results[name] = {
            "ours_s": ours_s,
            "ours_all_s": ours_all,
            "ours_cpu_s": ours_cpu,
            "ours_single_thread_s": single_s,
            "lm_eval_timed_s": lm_s,
            "lm_eval_timed_all_s": lm_all,
            "lm_eval_extrapolated_s": lm_s * scale,
            "lm_eval_extrapolated_cpu_s": lm_cpu * scale,
            "speedup": lm_s * scale / ours_s,
            "speedup_single_thread": lm_s * scale / single_s,
            "speedup_cpu_time": lm_cpu * scale / ours_cpu,
            "ours_stderr": ours_se,
            "lm_eval_stderr": lm_se,
            "stderr_rel_diff": abs(ours_se - lm_se) / lm_se,
        }
        print(
            f"{name:16s} ours {ours_s:7.3f} s ({single_s:.3f} s 1 thread)  "
            f"lm-eval {lm_s * scale:8.1f} s (extrapolated)  speedup {lm_s * scale / ours_s:6.1f}x "
            f"(CPU time {lm_cpu / ours_cpu * scale:6.1f}x)  "
            f"stderr {ours_se:.5g} vs {lm_se:.5g}"
        )

    return {
        "n_docs": N_DOCS,
        "ours_iters": ours_iters,
        "lm_eval_iters_timed": lm_iters,
        "lm_eval_extrapolated_to_iters": ours_iters,
        "lm_eval_note": (
            f"lm-eval bootstrap_stderr timed at {lm_iters} iterations with DISABLE_MULTIPROC=1 "
            f"(single process) and scaled linearly by {scale:g} to {ours_iters} iterations; "
            "its stderr is from the timed iterations only"
        ),
        "repeats": repeats,
        "statistic": (
            "median wall-clock seconds over repeats; *_cpu_s: median process CPU seconds "
            "(all threads), less sensitive to other load on the machine"
        ),
        "quick": quick,
        "workers": default_workers(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "lm_eval": version("lm_eval"),
        "metrics": results,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write results here")
    parser.add_argument("--quick", action="store_true", help="10x fewer iterations, 1 repeat")
    args = parser.parse_args(argv)
    report = run(args.quick)
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
