"""Every benchmark of issues 6 and 7 in one process, one JSON file.

    python -m benchmarks.run [--quick] --json OUT.json [--only B1,B2,...]

B1 throughput (+ overlap), B2 shared prefixes, B3 flat memory (two child processes), B4
compilations, B5 several devices (runs tests/test_multidevice.py), B6 two processes
over jax.distributed (runs tests/test_multihost.py), B7 against lm-eval's ``hf``
backend on transformers' xLSTM with the same weights and tokenizer as our JAX xLSTM (a child
process in the ``bench-hf`` virtual environment; recorded as not measured, with the install
command, where none is found), the bootstrap figures of issue 6
(``benchmarks.bootstrap``) and the cost of ``bootstrap_iters=100000`` in an evaluation. Figures are medians over repeats; ratios are taken
within this run, the compared methods interleaved repeat by repeat. The JSON is rewritten after
every benchmark, so a failure keeps what came before; a failing benchmark records its error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import common

B7_PRESETS = ("tiny", "small", "100m")  # hf_backend.PRESETS' names (that module imports JAX, so not here)
ALL = ("B1", "B2", "B3", "B3_xlstm", "B4", "B5", "B6", "B7", "hf_load", "bootstrap", "bootstrap_eval")

NOT_MEASURED = {
}


def _write(path: Path, report: dict) -> None:
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    staging.replace(path)


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def _multidevice(quick: bool) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_multidevice.py", "-q", "-s", "-p", "no:cacheprovider"],
        cwd=common.REPO, capture_output=True, text=True, timeout=900,
    )
    figures = [
        {"share_prefixes": m[0], "requests": int(m[1]), "max_abs_loglik_diff": float(m[2]), "max_rel_loglik_diff": float(m[3])}
        for m in re.findall(r"MULTIDEVICE setting=(\S+) requests=(\d+) max_abs_loglik_diff=(\S+) max_rel_loglik_diff=(\S+)", done.stdout)
    ]
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return {
        "test": "tests/test_multidevice.py",
        "passed": done.returncode == 0,
        "pytest_summary": summary,
        "seconds": time.perf_counter() - start,
        "devices": "4 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4) vs 1, separate processes",
        "comparisons": figures,
        "tolerance": "|Δ loglik| <= 1e-5 * max(1, |loglik|); num_tokens, greedy and generated tokens equal",
        **({} if done.returncode == 0 else {"output_tail": (done.stdout + done.stderr)[-3000:]}),
    }


def _multihost(quick: bool) -> dict:
    """B6: 1 process, then 2 processes over jax.distributed (gloo on 127.0.0.1), on the same work."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_multihost.py", "-q", "-s", "-p", "no:cacheprovider",
         "-k", "not cli"],  # the end-to-end CLI test trains a checkpoint; its comparison adds no figure
        cwd=common.REPO, capture_output=True, text=True, timeout=900,
    )
    pattern = (r"MULTIHOST setting=(\S+) requests=(\d+) max_rel_loglik_diff=(\S+) "
               r"one_process_s=(\S+) two_processes_s=(\S+)")
    found = re.findall(pattern, done.stdout)
    figures = [{"setting": m[0], "requests": int(m[1]), "max_rel_loglik_diff": float(m[2])} for m in found]
    one, two = (float(found[0][3]), float(found[0][4])) if found else (None, None)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return {
        "test": "tests/test_multihost.py",
        "passed": done.returncode == 0,
        "identical_to_one_process": done.returncode == 0 and bool(figures),
        "pytest_summary": summary,
        "seconds": time.perf_counter() - start,
        "processes": "2 local processes, one CPU device each, gloo over 127.0.0.1, vs 1 process with one device",
        "comparisons": figures,
        "one_process_work_s": one,
        "two_processes_work_s": two,
        "two_over_one_time": None if not one else two / one,
        "work": "score 21 mixed requests and generate twice for 5 contexts, with shared prefixes, without, and in "
        "fixed-context windows (compilation included); both processes share this machine's cores, so two "
        "processes cannot be faster here: the figure shows the protocol's cost, not a multi-host speedup",
        "tolerance": "|Δ loglik| <= 1e-5 * max(1, |loglik|); num_tokens, greedy and generated tokens equal",
        **({} if done.returncode == 0 else {"output_tail": (done.stdout + done.stderr)[-3000:]}),
    }


def _summary(benchmarks: dict) -> dict:
    def get(*keys):
        value = benchmarks
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    def check(value, ok):
        return None if value is None else bool(ok(value))

    rows = {}
    for preset in ("tiny", "small"):
        speedup = get("B1_throughput", "speedup_vs_naive", preset)
        fraction = get("B1_throughput", "fraction_of_bound", preset)
        rows[f"B1 speedup_vs_naive ({preset}) >= 10"] = {"value": speedup, "holds": check(speedup, lambda v: v >= 10)}
        rows[f"B1 fraction_of_bound ({preset}) >= 0.7"] = {"value": fraction, "holds": check(fraction, lambda v: v >= 0.7)}
    ratio = get("B2_shared_prefixes", "model_tokens_ratio")
    speedup = get("B2_shared_prefixes", "speedup")
    diff = get("B2_shared_prefixes", "max_abs_loglik_diff")
    rows["B2 model_tokens_ratio >= 2.5"] = {"value": ratio, "holds": check(ratio, lambda v: v >= 2.5)}
    rows["B2 speedup >= 2"] = {"value": speedup, "holds": check(speedup, lambda v: v >= 2)}
    rows["B2 max_abs_loglik_diff <= 1e-4"] = {"value": diff, "holds": check(diff, lambda v: v <= 1e-4)}
    rss = get("B3_flat_memory", "peak_rss_ratio")
    rows["B3 peak_rss_ratio <= 1.2"] = {"value": rss, "holds": check(rss, lambda v: v <= 1.2)}
    rss = get("B3_flat_memory_xlstm", "peak_rss_ratio")
    rows["B3 (xLSTM, 100k tokens) peak_rss_ratio <= 1.2"] = {"value": rss, "holds": check(rss, lambda v: v <= 1.2)}
    load = get("hf_load", "peak_rss_over_param_bytes")
    rows["hf_load peak_rss_over_param_bytes <= 1.3"] = {"value": load, "holds": check(load, lambda v: v <= 1.3)}
    few, many = get("B4_compilations", "compilations_100"), get("B4_compilations", "compilations_2000")
    rows["B4 compilations equal and <= 8"] = {
        "value": [few, many], "holds": None if few is None or many is None else bool(few == many and many <= 8),
    }
    rolling = get("B4_compilations", "compilations_100_with_rolling_documents")
    rows["B4 compilations equal when the 100 requests hold rolling documents too"] = {
        "value": [rolling, many], "holds": None if rolling is None or many is None else bool(rolling == many),
    }
    rows["B5 sharded == one device"] = {"value": get("B5_multidevice", "passed"), "holds": get("B5_multidevice", "passed")}
    identical = get("B6_multihost", "identical_to_one_process")
    rows["B6 two processes == one process"] = {"value": identical, "holds": identical}
    for preset in B7_PRESETS:
        speedup = get("B7_lm_eval_hf", "speedup_vs_lm_eval_hf", preset)
        same = get("B7_lm_eval_hf", "same_weights", preset)
        diff = get("B7_lm_eval_hf", "max_rel_loglik_diff", preset)
        rows[f"B7 speedup_vs_lm_eval_hf ({preset}) >= 2"] = {"value": speedup, "holds": check(speedup, lambda v: v >= 2)}
        rows[f"B7 same weights and tokenizer ({preset})"] = {"value": same, "holds": same}
        rows[f"B7 max |Δ loglik| / max(1, |loglik|) ({preset}) <= 1e-5"] = {
            "value": {"relative": diff, "absolute": get("B7_lm_eval_hf", "max_abs_loglik_diff", preset)},
            "holds": check(diff, lambda v: v <= 1e-5),
        }
    iters = get("bootstrap", "ours_iters")
    for name in ("perplexity", "median", "word_perplexity"):
        seconds = get("bootstrap", "metrics", name, "ours_s")
        speed = get("bootstrap", "metrics", name, "speedup")
        if seconds is None:
            continue
        at_full = seconds * 100_000 / iters  # linear in the iterations
        rows[f"bootstrap {name}: 100,000 iters on 5,000 docs < 2 s and >= 50x lm-eval"] = {
            "value": {"seconds_100000": at_full, "measured_iters": iters, "measured_s": seconds, "speedup": speed},
            "holds": bool(at_full < 2 and speed >= 50),
        }
    added = get("bootstrap_in_evaluation", "seconds_added")
    rows["bootstrap_iters=100000 adds a few seconds at most"] = {"value": added, "holds": check(added, lambda v: v <= 5)}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads, fewer repeats (under 10 minutes)")
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--b3-tokens", type=int, default=None,
                        help="tokens of the long B3 document (default 1,000,000; 200,000 with --quick)")
    parser.add_argument("--b7-presets", default=",".join(B7_PRESETS),
                        help=f"comma-separated B7 presets (default: {','.join(B7_PRESETS)})")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(selected) - set(ALL)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    b7_presets = tuple(name.strip() for name in args.b7_presets.split(",") if name.strip())
    if not b7_presets or set(b7_presets) - set(B7_PRESETS):
        parser.error(f"--b7-presets takes {', '.join(B7_PRESETS)}, got {args.b7_presets!r}")

    started = time.perf_counter()
    load_at_start = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="mlflow_lmeval_bench_"))
    common.configure(work / "cache")
    out = Path(args.json)
    report = {
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**common.machine_info(), "load_average_at_start": load_at_start},
        "benchmarks": dict(NOT_MEASURED),
    }
    common.log(f"work directory {work}")
    tokenizer = common.train_benchmark_tokenizer(work)
    report["tokenizer"] = {"kind": "SentencePiece unigram", "vocab_size": tokenizer.vocab_size,
                           "trained_on": "tinyshakespeare.txt + wikitext2_valid.txt"}
    _write(out, report)

    def record(key: str, function):
        common.log(f"--- {key}")
        start = time.perf_counter()
        try:
            result = function()
        except Exception as error:  # a failing benchmark must not lose the others
            traceback.print_exc()
            result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
        result["benchmark_seconds"] = time.perf_counter() - start
        report["benchmarks"][key] = result
        _write(out, report)

    if "B1" in selected:
        from . import throughput

        record("B1_throughput", lambda: throughput.run(tokenizer, work, args.quick))
        presets = report["benchmarks"]["B1_throughput"].get("presets", {})
        report["benchmarks"]["overlap"] = {
            "figure": "device_idle_fraction",
            "device_idle_fraction": {p: r["overlap"]["device_idle_fraction_of_engine"] for p, r in presets.items()},
            "device_idle_fraction_of_evaluation": {p: r["overlap"]["device_idle_fraction_of_evaluation"] for p, r in presets.items()},
            "by_preset": {p: r["overlap"] for p, r in presets.items()},
            "method": "mlflow_lmeval.engine.loop.batch_stream wrapped from outside during the B1 engine runs: "
            "seconds the host loop is blocked waiting for the next batch / seconds inside Engine.score (an upper "
            "bound on device idle time); *_of_evaluation also counts the time outside Engine.score (lm-eval "
            "building requests and tokenizing, metrics), when the device has no work at all",
        }
    if "B2" in selected:
        from . import prefixes

        record("B2_shared_prefixes", lambda: prefixes.run(tokenizer, work, args.quick))
    if "B3" in selected:
        from . import memory

        record("B3_flat_memory", lambda: memory.run(tokenizer, work, args.quick, long_tokens=args.b3_tokens or (200_000 if args.quick else 1_000_000)))
    if "B3_xlstm" in selected:
        from . import memory

        record("B3_flat_memory_xlstm",
               lambda: memory.run(tokenizer, work, args.quick, long_tokens=100_000, model="xlstm"))
    if "hf_load" in selected:
        from . import hf_load

        record("hf_load", lambda: hf_load.run(work, args.quick))
    if "B4" in selected:
        from . import compilations

        record("B4_compilations", lambda: compilations.run(tokenizer, work, args.quick))
    if "B5" in selected:
        record("B5_multidevice", lambda: _multidevice(args.quick))
    if "B6" in selected:
        record("B6_multihost", lambda: _multihost(args.quick))
    if "B7" in selected:
        from . import hf_backend

        record("B7_lm_eval_hf", lambda: hf_backend.run(work, args.quick, b7_presets))
    if "bootstrap" in selected:
        from . import bootstrap

        record("bootstrap", lambda: bootstrap.run(args.quick))
    if "bootstrap_eval" in selected:
        from . import stderr_cost

        record("bootstrap_in_evaluation", lambda: stderr_cost.run(tokenizer, work, args.quick))

    report["summary"] = _summary(report["benchmarks"])
    report["runtime_s"] = time.perf_counter() - started
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    _write(out, report)
    common.log(f"done in {report['runtime_s']:.0f} s; wrote {out}")
    for name, row in report["summary"].items():
        print(f"{'  ok ' if row['holds'] else ('  -- ' if row['holds'] is None else 'FAIL ')} {name}: {row['value']}")


if __name__ == "__main__":
    main()
