"""B3 flat memory: one short and one very long document, each scored in its own process.

Each child builds a model with random weights (the tiny mLSTM reference model, or with
``--model xlstm`` a small transformers-layout xLSTM, ``models/xlstm.py``), compiles the engine's step with a
short warm-up document, then scores one ``loglikelihood_rolling``-shaped request (prefix token +
document) of N real WikiText-2 tokens (the article tokens repeated to length) at chunk size 256,
batch size 1, through ``Engine.score``. It reports ``ru_maxrss`` (peak resident memory of the
whole process, inputs included) and tokens/s.

    python -m benchmarks.memory --json OUT.json [--model xlstm] [--long-tokens N]   # both, standalone
    python -m benchmarks.memory --child --tokens N --tokens-file F   # one measurement, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import common

CHUNK_SIZE = 256
MODELS = ("mlstm", "xlstm")
# A small xLSTM of transformers' layout (pre-norm mLSTM + gated FFN, soft-capped gates and logits).
XLSTM_PRESETS = {"tiny": {"hidden_size": 128, "num_blocks": 2, "num_heads": 2}}


def status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM); Linux 4.0 and later."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build_model(model: str, preset: str, vocab_size: int = common.VOCAB_SIZE):
    """(LanguageModel, parameter count) with random weights."""
    if model == "mlstm":
        return common.reference_model(preset, vocab_size=vocab_size)
    from mlflow_lmeval.models import xlstm

    config = xlstm.XLSTMConfig(vocab_size=vocab_size, **XLSTM_PRESETS[preset])
    return xlstm.as_language_model(config, xlstm.init_params(config)), xlstm.count_params(config)


def child(num_tokens: int, tokens_file: str, preset: str, model_name: str = "mlstm") -> dict:
    from mlflow_lmeval.engine.loop import Engine

    phases = {"imports": maxrss_kb()}
    base = np.load(tokens_file)
    document = np.resize(base, num_tokens).tolist()
    phases["document"] = maxrss_kb()
    model, num_params = build_model(model_name, preset)
    settings, applied = common.engine_settings(batch_size=1, chunk_size=CHUNK_SIZE)
    engine = Engine(model, settings)
    phases["model"] = maxrss_kb()
    engine.score([([1], document[:300])])  # compile the step (same shapes as the real run)
    phases["warm_up"] = maxrss_kb()
    rss_before = status_kb("VmRSS")
    peak_before = maxrss_kb()
    reset = reset_peak()
    start = time.perf_counter()
    result = engine.score([([1], document)])
    seconds = time.perf_counter() - start
    peak = maxrss_kb()
    phases["score"] = peak
    return {
        "model": model_name,
        "num_params": num_params,
        "tokens": num_tokens,
        "scored_tokens": int(result.num_tokens[0]),
        "loglik": float(result.loglik[0]),
        "seconds": seconds,
        "tokens_per_s": num_tokens / seconds,
        "rss_before_score_kb": rss_before,
        "peak_rss_before_score_kb": peak_before,
        "peak_rss_kb": peak,
        "peak_rss_during_score_kb": status_kb("VmHWM") if reset else None,
        "ru_maxrss_kb_after_phase": phases,
        "compilations": engine.traces,
        "engine_settings": applied,
    }


def run_child(module: str, *args: str, timeout: int = 1800) -> dict:
    """``python -m <module> --child ARGS`` in a fresh process; its last stdout line is JSON."""
    # Linux carries a process's RSS high-water mark across exec, and a child forked from this
    # (large) process starts with a copy of its page tables: a direct child's ru_maxrss would
    # report this process's size. A small shell forks the real child instead (not exec: the
    # command is not its last), so the child's ru_maxrss starts from the shell's few MB.
    command = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-m", module, "--child", *args]
    env = dict(os.environ, PYTHONPATH=str(common.REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=common.REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{module} child {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def _run_child(num_tokens: int, tokens_file: Path, preset: str, model: str) -> dict:
    return run_child("benchmarks.memory", "--tokens", str(num_tokens), "--tokens-file", str(tokens_file),
                     "--preset", preset, "--model", model)


def run(tokenizer, directory: Path, quick: bool, long_tokens: int = 1_000_000, preset: str = "tiny",
        model: str = "mlstm") -> dict:
    text = "".join(page for _, page in common.wikitext_articles())
    tokens_file = directory / "wikitext_tokens.npy"
    np.save(tokens_file, np.asarray(tokenizer.encode(text), np.int32))
    common.log("B3: 1,000-token document")
    short = _run_child(1_000, tokens_file, preset, model)
    common.log(f"B3: {long_tokens:,}-token document")
    long = _run_child(long_tokens, tokens_file, preset, model)
    return {
        "model": model,
        "num_params": short["num_params"],
        "preset": preset,
        "chunk_size": CHUNK_SIZE,
        "batch_size": 1,
        "short_tokens": short["tokens"],
        "long_tokens": long["tokens"],
        "long_tokens_note": None if long_tokens >= 1_000_000 else f"{long_tokens:,} tokens instead of 1,000,000 to save time",
        "peak_rss_short_mb": short["peak_rss_kb"] / 1024,
        "peak_rss_long_mb": long["peak_rss_kb"] / 1024,
        "peak_rss_ratio": long["peak_rss_kb"] / short["peak_rss_kb"],
        "peak_rss_during_score_mb": {
            "short": short["peak_rss_during_score_kb"] / 1024 if short["peak_rss_during_score_kb"] else None,
            "long": long["peak_rss_during_score_kb"] / 1024 if long["peak_rss_during_score_kb"] else None,
        },
        "peak_rss_during_score_ratio": (long["peak_rss_during_score_kb"] / short["peak_rss_during_score_kb"])
        if short["peak_rss_during_score_kb"] and long["peak_rss_during_score_kb"] else None,
        "peak_set_before_scoring": {
            "short": short["peak_rss_before_score_kb"] >= short["peak_rss_kb"],
            "long": long["peak_rss_before_score_kb"] >= long["peak_rss_kb"],
        },
        "rss_growth_during_score_mb": {
            "short": (short["peak_rss_kb"] - short["rss_before_score_kb"]) / 1024 if short["rss_before_score_kb"] else None,
            "long": (long["peak_rss_kb"] - long["rss_before_score_kb"]) / 1024 if long["rss_before_score_kb"] else None,
        },
        "tokens_per_s_short": short["tokens_per_s"],
        "tokens_per_s_long": long["tokens_per_s"],
        "children": {"short": short, "long": long},
        "targets": {"peak_rss_ratio": "<= 1.2"},
        "definitions": {
            "peak_rss_ratio": "ru_maxrss of the long-document child / of the short-document child (whole process, "
            "the document's token list included); each child is started by a small shell so that its ru_maxrss "
            "does not inherit the benchmark process's RSS through fork+exec",
            "rss_growth_during_score_mb": "peak RSS minus RSS just before Engine.score (after warm-up)",
            "peak_rss_during_score_ratio": "the same ratio of the kernel's RSS high-water mark (VmHWM), reset "
            "(/proc/self/clear_refs) right before Engine.score: memory of the scoring alone",
            "peak_set_before_scoring": "true when ru_maxrss was already reached before scoring began (model "
            "building, compilation), so peak_rss_ratio says the scoring never went above it",
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help="one measurement (run by run())")
    parser.add_argument("--tokens", type=int, help="--child: tokens of the document")
    parser.add_argument("--tokens-file", help="--child: .npy of token ids to repeat to length")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", choices=MODELS, default="mlstm")
    parser.add_argument("--json", help="standalone: write both measurements here")
    parser.add_argument("--long-tokens", type=int, default=1_000_000, help="standalone: tokens of the long document")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.tokens, args.tokens_file, args.preset, args.model)))
        return
    if not args.json:
        parser.error("give --json OUT.json (or --child)")
    work = Path(tempfile.mkdtemp(prefix="mlflow_lmeval_b3_"))
    load_at_start = list(os.getloadavg())
    result = run(common.train_benchmark_tokenizer(work), work, quick=False, long_tokens=args.long_tokens,
                 preset=args.preset, model=args.model)
    report = {"command": " ".join(["python", "-m", "benchmarks.memory", *(argv if argv is not None else sys.argv[1:])]),
              "machine": {**common.machine_info(), "load_average_at_start": load_at_start,
                          "load_average_at_end": list(os.getloadavg())},
              "B3_flat_memory": result}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"peak_rss_ratio {result['peak_rss_ratio']:.3f} ({result['peak_rss_short_mb']:.0f} MB for "
          f"{result['short_tokens']:,} tokens, {result['peak_rss_long_mb']:.0f} MB for {result['long_tokens']:,})")


if __name__ == "__main__":
    main()
