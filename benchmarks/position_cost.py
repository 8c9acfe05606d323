"""The cost of the loss by position: ``Engine.score`` with and without its per-bucket sums.

B1's workloads (``throughput.py``'s three tasks at the ``--quick`` sizes, batch 8, chunk 64,
shared prefixes) go through lm-eval once to capture the engine's calls; then two engines in this
process score exactly those calls, repeat after repeat, in alternating order: the product's
(recurrent mode, so the buckets on) and the same engine whose step leaves the buckets out. Both
are compiled before timing. A loaded machine slows both alike, so the ratio of the medians is the
figure: 1.0 means the buckets are free.

    python -m benchmarks.position_cost --json position_cost.json [--repeats 7] [--presets tiny small]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import jax

from mlflow_lmeval.engine import step
from mlflow_lmeval.engine.loop import Engine

from . import common
from .throughput import SIZES


def without_buckets(engine):
    """``engine`` with its step rebuilt to skip the loss by position (the benchmark's control;
    it reaches into the engine, which the product never does)."""
    engine.by_position = False
    score = functools.partial(step.score_chunk, engine.model.apply, engine.settings.scale_logits, False)
    engine._step = jax.jit(engine._counted(score), donate_argnums=(1, 2))
    return engine


def run_preset(preset: str, tokenizer, directory: Path, repeats: int) -> dict:
    tasks = common.write_mixed_tasks(directory, f"pos_{preset}", SIZES["quick"][preset])
    model, _ = common.reference_model(preset)
    settings, _ = common.engine_settings(batch_size=8, chunk_size=64, share_prefixes=True)
    lm = common.make_lm(model, tokenizer, settings)
    recorder = common.ScoreRecorder(lm.engine)
    common.log(f"{preset}: capturing B1's engine calls through lm-eval")
    common.evaluate_lm(lm, common.eval_config(tasks, directory))
    calls = [call["requests"] for call in recorder.calls]
    engines = {"with_buckets": Engine(model, settings), "without_buckets": without_buckets(Engine(model, settings))}
    for engine in engines.values():  # compiles every shape
        for requests in calls:
            engine.score(requests)
    seconds = {name: [] for name in engines}
    for repeat in range(repeats):
        order = list(engines) if repeat % 2 == 0 else list(engines)[::-1]
        for name in order:
            start = time.perf_counter()
            for requests in calls:
                engines[name].score(requests)
            seconds[name].append(time.perf_counter() - start)
        common.log(f"{preset}: repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()))
    medians = {name: common.median(values) for name, values in seconds.items()}
    return {
        "seconds": seconds,
        "median_seconds": medians,
        "with_over_without": medians["with_buckets"] / medians["without_buckets"],
        "per_repeat_ratio": [w / o for w, o in zip(seconds["with_buckets"], seconds["without_buckets"])],
        "requests": sum(len(c) for c in calls),
        "scored_tokens": recorder.scored_tokens(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlflow_lmeval_bench_"))
    common.configure(work / "cache")
    tokenizer = common.train_benchmark_tokenizer(work)
    report = {"machine": common.machine_info(), "repeats": args.repeats,
              "presets": {p: run_preset(p, tokenizer, work, args.repeats) for p in args.presets}}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for preset, result in report["presets"].items():
        print(f"{preset}: with/without buckets = {result['with_over_without']:.3f} "
              f"(medians {result['median_seconds']['with_buckets']:.2f} s / {result['median_seconds']['without_buckets']:.2f} s)")


if __name__ == "__main__":
    main()
