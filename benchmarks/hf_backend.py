"""B7: lm-eval's own ``hf`` backend on transformers' xLSTM against our evaluator on our JAX xLSTM,
with the same weights and the same tokenizer.

Per preset, one checkpoint is built once by the hf side (``benchmarks/hf_child.py``, in the
``bench-hf`` interpreter): a random float32 ``xLSTMForCausalLM`` and a byte-level BPE tokenizer
trained on the benchmark's own text, written with ``save_pretrained``. Both sides load that
directory: lm-eval's ``HFLM`` (``pretrained=DIR,tokenizer=DIR,dtype=float32,device=cpu,max_length=N``,
batch size 8) and ``mlflow_lmeval.load(DIR)`` (our Flax port of the model, the tokenizer.json
through ``HFTokenizer``), in float32 and in bfloat16. ``same_weights`` compares digests of the
safetensors files each side read and of the float32 parameters each side holds in memory.

The tasks are B1's (WikiText-2 articles as ``loglikelihood_rolling``, the Tiny Shakespeare
last-word task and the 4-choice next-line task) with fewer documents. ``max_length`` is the
longest request (context + continuation - 1 tokens), so lm-eval neither truncates a context nor
cuts an article into windows: both sides read every request whole and compute the same thing,
which ``max_abs_loglik_diff`` over every request checks.

The hf side is a child process driven line by line over stdin/stdout; while one side runs the
other waits, so they never share the CPU. Repeats interleave ours (float32), ours (bfloat16), hf.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import mlflow_lmeval
from mlflow_lmeval.models import xlstm

from . import common
from .hf_protocol import PROTOCOL, ResponseRecorder, metrics_of, requests_digest, weights_digest

PRESETS = {
    # transformers xLSTMConfig fields; tiny and small keep the sizes B7 compared before (the mLSTM
    # presets' width, depth and heads with the feed-forward width that matched their parameter count).
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "ffn_proj_factor": 5.0},  # 0.68 M
    "small": {"hidden_size": 256, "num_hidden_layers": 6, "num_heads": 4, "ffn_proj_factor": 4.75},  # 9.3 M
    "100m": {"hidden_size": 768, "num_hidden_layers": 13, "num_heads": 8},  # 98.5 M, the 7B's proportions
}
SIZES = {
    # preset: (wiki articles, shortest first; lastword docs; choice docs). The hf side runs a few
    # hundred to a few thousand tokens/s on 2 CPU cores; quick keeps B7 within a few minutes.
    "quick": {"tiny": (2, 50, 12), "small": (2, 25, 6), "100m": (1, 12, 4)},
    "full": {"tiny": (12, 400, 100), "small": (6, 100, 25), "100m": (4, 100, 25)},
}
# On a loaded 2-core machine torch's two OpenMP threads are preempted and single hf runs vary by
# several times, hence 5 repeats; past MIN_REPEATS no repeat starts once a preset's repeats have
# taken REPEAT_BUDGET_S seconds (None: no limit), so a loaded machine cannot stretch --quick.
REPEATS = {"quick": 5, "full": 5}
MIN_REPEATS = 3
REPEAT_BUDGET_S = {"quick": 60, "full": None}
BATCH_SIZE = 8  # as B1, both sides
CHUNK_SIZE = 64  # as B1; also the xLSTM's chunk (config.json's chunk_size, our segment length)
VOCAB_SIZE = common.VOCAB_SIZE
SEED = 0
HF_VENV = common.REPO / ".venv-hf"
INSTALL = "python3 -m venv .venv-hf && .venv-hf/bin/pip install -e '.[bench-hf]'"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ACCURACY_METRICS = ("acc,none", "acc_norm,none")


# ---- parent side (the runner's interpreter, JAX) -------------------------------------------
def find_interpreter() -> tuple[str | None, dict]:
    """A Python that imports torch, transformers and lm_eval: this one, $MLFLOW_LMEVAL_HF_PYTHON,
    or .venv-hf's. Returns (path, versions) or (None, {candidate: why not})."""
    probe = ("import json, torch, transformers, lm_eval; from transformers import xLSTMForCausalLM; "
             "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
             "'lm_eval': lm_eval.__version__}))")
    candidates = [sys.executable, os.environ.get("MLFLOW_LMEVAL_HF_PYTHON"), str(HF_VENV / "bin" / "python")]
    failures = {}
    for candidate in dict.fromkeys(c for c in candidates if c):
        if not Path(candidate).exists():
            failures[candidate] = "does not exist"
            continue
        try:
            done = subprocess.run([candidate, "-c", probe], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, **OFFLINE})
        except (OSError, subprocess.SubprocessError) as error:
            failures[candidate] = f"{type(error).__name__}: {error}"
            continue
        if done.returncode == 0:
            return candidate, json.loads(done.stdout.strip().splitlines()[-1])
        failures[candidate] = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return None, failures


class Child:
    """The hf side: ``python -m benchmarks.hf_child --serve SETTINGS`` answering one JSON line per command."""

    def __init__(self, python: str, settings: dict, log_path: Path):
        settings_path = log_path.with_suffix(".json")
        settings_path.write_text(json.dumps(settings), encoding="utf-8")
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (the child writes to it until close())
        self.process = subprocess.Popen(
            [python, "-m", "benchmarks.hf_child", "--serve", str(settings_path)],
            cwd=common.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **OFFLINE},
        )
        self.ready = self._answer()

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                answer = json.loads(line[len(PROTOCOL):])
                if "error" in answer:
                    raise RuntimeError(f"hf child: {answer['error']} (log: {self.log_path})")
                return answer
        self._log.flush()
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"hf child exited with {self.process.wait()}: {tail}")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log.close()


def params_digest(checkpoint) -> str:
    """The child's ``loaded_params_digest`` computed over our parameter tree: transformers' names,
    sorted, each with its float32 bytes in torch's layout (which our tree keeps)."""
    digest = hashlib.sha256()
    for name in sorted(xlstm.hf_parameter_shapes(checkpoint.model_config)):
        value = checkpoint.model.params
        for key in xlstm.param_path(name):
            value = value[key]
        digest.update(name.encode() + b"\0" + np.asarray(value, np.float32).tobytes())
    return "sha256:" + digest.hexdigest()


class OurSide:
    """Our evaluator on a loaded checkpoint. The package's engine API is used here only (and in
    ``common``), so that its renames touch one place."""

    def __init__(self, checkpoint):
        settings, self.engine_settings = common.engine_settings(
            batch_size=BATCH_SIZE, chunk_size=CHUNK_SIZE, share_prefixes=True)
        self.lm = common.make_lm(checkpoint.model, checkpoint.tokenizer, settings)
        self.engine_calls = common.ScoreRecorder(self.lm.engine)
        self.responses = ResponseRecorder(self.lm)

    def run(self, config) -> dict:
        self.engine_calls.reset()
        self.responses.reset()
        start = time.perf_counter()
        output = common.evaluate_lm(self.lm, config)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "engine_seconds": self.engine_calls.seconds,
                "scored_tokens": self.engine_calls.scored_tokens(), "metrics": metrics_of(output),
                "seconds_by_request_type": dict(self.responses.seconds),
                "requests_digest": requests_digest(self.engine_calls.requests)}


def compare_responses(ours: dict, theirs: dict) -> dict:
    """Per-request agreement of two {request: [loglik, is_greedy]} maps."""
    keys = sorted(ours.keys() & theirs.keys())
    diffs = np.array([abs(ours[k][0] - theirs[k][0]) for k in keys])
    scale = np.array([max(1.0, abs(theirs[k][0])) for k in keys])
    return {
        "requests": len(keys),
        "unmatched_requests": len(ours.keys() ^ theirs.keys()),
        "max_abs_loglik_diff": float(diffs.max()) if keys else None,
        "max_rel_loglik_diff": float((diffs / scale).max()) if keys else None,
        "greedy_mismatches": sum(ours[k][1] != theirs[k][1] for k in keys),
    }


def compare_metrics(ours: dict, theirs: dict, rel_tolerance: float) -> dict:
    """Task metrics side by side; they agree when every accuracy is equal and every other metric
    is within ``rel_tolerance``."""
    rows, accuracies_equal, worst = {}, True, 0.0
    for task, row in theirs.items():
        for key in sorted(row.keys() & ours.get(task, {}).keys()):
            a, b = ours[task][key], row[key]
            if not isinstance(b, (int, float)) or key == "sample_len":
                continue
            if key in ACCURACY_METRICS:
                accuracies_equal &= a == b
            else:
                worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
            rows[f"{task}/{key}"] = [a, b]
    return {"agree": bool(accuracies_equal and worst <= rel_tolerance), "accuracies_equal": bool(accuracies_equal),
            "max_rel_diff_other_metrics": worst,
            "rule": f"accuracies equal, other metrics within {rel_tolerance:g} relative", "values": rows}


def _interleaved_repeats(sides: dict, mode: str, preset: str, done: dict) -> tuple[dict, dict]:
    """Runs each side once per repeat, in the order of ``sides``; the first repeat records responses and
    takes the runs in ``done`` as already made. Returns (runs by side, load averages by repeat)."""
    runs, loads = {name: [] for name in sides}, []
    start = time.perf_counter()
    for repeat in range(REPEATS[mode]):
        budget = REPEAT_BUDGET_S[mode]
        if repeat >= MIN_REPEATS and budget is not None and time.perf_counter() - start > budget:
            common.log(f"B7 {preset}: {repeat} repeats took over {budget} s; stopping there")
            break
        for name, side in sides.items():
            if repeat == 0 and name in done:
                runs[name].append(done[name])
                continue
            common.log(f"B7 {preset}: repeat {repeat + 1}/{REPEATS[mode]}, {name}")
            runs[name].append(side(repeat == 0))
        loads.append(list(os.getloadavg()))
    return runs, loads


def run_preset(preset: str, python: str, work: Path, quick: bool) -> dict:
    mode = "quick" if quick else "full"
    load_at_start = list(os.getloadavg())
    directory = work / f"b7_{preset}"
    model_dir = directory / "checkpoint"
    directory.mkdir(parents=True, exist_ok=True)
    tasks = common.write_mixed_tasks(directory, f"b7_{preset}", SIZES[mode][preset])
    config = common.eval_config(tasks, directory)
    child_settings = {
        "model_dir": str(model_dir), "tokenizer_dir": str(work / "b7_tokenizer"),
        "corpus": [str(common.SHAKESPEARE), str(common.WIKITEXT)], "vocab_size": VOCAB_SIZE,
        "xlstm": PRESETS[preset], "chunk_size": CHUNK_SIZE, "seed": SEED,
        "include_path": str(directory), "tasks": tasks, "batch_size": BATCH_SIZE,
    }
    common.log(f"B7 {preset}: the hf child ({python}) builds the checkpoint")
    start = time.perf_counter()
    child = Child(python, child_settings, directory / "hf_child.log")
    child_start_s = time.perf_counter() - start
    built = child.ready
    try:
        ours, load_s, warmup_s = {}, {}, {}
        for name, dtype in (("ours", "float32"), ("ours_bf16", "bfloat16")):
            start = time.perf_counter()
            checkpoint = mlflow_lmeval.load(model_dir, dtype=dtype)
            load_s[name] = time.perf_counter() - start
            if dtype == "float32":
                ours_digests = {**weights_digest(model_dir), "loaded_params": params_digest(checkpoint)}
            ours[name] = OurSide(checkpoint)
            common.log(f"B7 {preset}: warm-up of {name} (compiles the engine's step)")
            start = time.perf_counter()
            ours[name].run(common.eval_config(tasks, directory, limit_requests=1))
            warmup_s[name] = time.perf_counter() - start
        def our_run(name):
            def run(record):
                result = ours[name].run(config)
                return {**result, "responses": dict(ours[name].responses.responses)} if record else result
            return run

        # Ours runs first in repeat 1: its requests give max_length before HFLM is made.
        common.log(f"B7 {preset}: repeat 1/{REPEATS[mode]}, ours")
        with common.timed_batches() as batches:
            first_ours = our_run("ours")(True)
        requests = ours["ours"].engine_calls.requests
        padding = {"real_tokens": batches.real_tokens, "padded_tokens": batches.padded_tokens,
                   "batches": batches.batches, "model_tokens": common.model_tokens(ours["ours"].lm.engine)}
        max_length = max(len(c) + len(x) - 1 for c, x in requests)
        common.log(f"B7 {preset}: HFLM with max_length={max_length}, then its warm-up")
        loaded = child.ask(f"load {max_length}")
        hf_warmup_s = child.ask("warm")["seconds"]
        sides = {"ours": our_run("ours"), "ours_bf16": our_run("ours_bf16"),
                 "hf": lambda record: child.ask("run record" if record else "run")}
        runs, loads = _interleaved_repeats(sides, mode, preset, {"ours": first_ours})
    finally:
        child.close()
    return summarize(preset, mode, tasks, built, loaded, ours_digests, runs, loads, load_at_start, {
        "child_start_and_build_s": child_start_s, "ours_load_s": load_s, "ours_warmup_s": warmup_s,
        "hf_load_s": loaded["load_s"], "hf_warmup_s": hf_warmup_s,
    }, max_length, padding, ours["ours"].engine_settings)


def summarize(preset, mode, tasks, built, loaded, ours_digests, runs, loads, load_at_start, setup, max_length,
              padding, engine_settings) -> dict:
    first = {name: values[0] for name, values in runs.items()}
    seconds = {name: [r["seconds"] for r in values] for name, values in runs.items()}
    med = {name: common.median(values) for name, values in seconds.items()}
    scored = {name: first[name]["scored_tokens"] for name in runs}
    rate = {name: scored[name] / med[name] for name in runs}
    hf_digests = {**loaded["weights_digest"], "loaded_params": loaded["loaded_params_digest"]}
    same_weights = (built["weights_digest"]["safetensors"] == hf_digests["safetensors"] == ours_digests["safetensors"]
                    and hf_digests["loaded_params"] == ours_digests["loaded_params"])
    same_tokenizer = (built["weights_digest"]["tokenizer"] == hf_digests["tokenizer"] == ours_digests["tokenizer"]
                      and first["hf"]["requests_digest"] == first["ours"]["requests_digest"])
    hf_vs_ours = compare_responses(first["ours"]["responses"], first["hf"]["responses"])
    bf16_vs_f32 = compare_responses(first["ours_bf16"]["responses"], first["ours"]["responses"])
    per_repeat = [h / o for o, h in zip(seconds["ours"], seconds["hf"])]

    def median_of(name, key):
        return common.median([r[key] for r in runs[name]])

    return {
        "preset": preset,
        "tasks": tasks,
        "documents": dict(zip(("wiki_articles", "lastword_docs", "choice_docs"), SIZES[mode][preset])),
        "num_params": built["num_params"],
        "xlstm_config": built["xlstm_config"],
        "checkpoint": f"random float32 xLSTMForCausalLM (seed {SEED}, weights spread wider than transformers' init) and "
        f"a byte-level BPE tokenizer ({built['tokenizer_vocab_size']} pieces) trained on the benchmark's text, written "
        "with save_pretrained; both sides load that one directory",
        "same_weights": same_weights,
        "same_tokenizer": same_tokenizer,
        "digests": {"built": built["weights_digest"], "hf": hf_digests, "ours": ours_digests,
                    "requests": {"hf": first["hf"]["requests_digest"], "ours": first["ours"]["requests_digest"]}},
        "requests": hf_vs_ours["requests"],
        "scored_tokens": scored,
        "max_length": max_length,
        "max_length_rule": "longest request in tokens (len(context) + len(continuation) - 1): no truncation, "
        "no rolling windows, every request read whole on both sides",
        "max_abs_loglik_diff": hf_vs_ours["max_abs_loglik_diff"],
        "agreement_hf_vs_ours": hf_vs_ours,
        "metrics_hf_vs_ours": compare_metrics(first["ours"]["metrics"], first["hf"]["metrics"], 1e-4),
        "bfloat16": {
            "speed_ratio_over_float32": med["ours"] / med["ours_bf16"],
            "agreement_vs_float32": bf16_vs_f32,
            "max_abs_loglik_diff_vs_float32": bf16_vs_f32["max_abs_loglik_diff"],
            "metrics_vs_float32": compare_metrics(first["ours_bf16"]["metrics"], first["ours"]["metrics"], 1e-2),
        },
        "repeats": len(seconds["hf"]),
        "seconds": med,
        "seconds_all": seconds,
        "scored_tokens_per_s": rate,
        "speedup_vs_lm_eval_hf": rate["ours"] / rate["hf"],
        "speedup_per_repeat": per_repeat,
        "speedup_median_of_per_repeat": common.median(per_repeat),
        # The fastest run of each side is the one least slowed by other jobs.
        "speedup_best_of_repeats": (scored["ours"] / min(seconds["ours"])) / (scored["hf"] / min(seconds["hf"])),
        "time_breakdown": {
            "ours": {"engine_s": median_of("ours", "engine_seconds"),
                     "outside_engine_s": common.median([r["seconds"] - r["engine_seconds"] for r in runs["ours"]]),
                     "engine_settings": engine_settings, **padding},
            "ours_by_request_type_s": _median_by_type(runs["ours"]),
            "hf_by_request_type_s": _median_by_type(runs["hf"]),
            "ours_bf16": {"engine_s": median_of("ours_bf16", "engine_seconds")},
            "hf": {"inside_loglikelihood_tokens_s": median_of("hf", "model_seconds"),
                   "forward_s": median_of("hf", "forward_seconds"),
                   "outside_loglikelihood_tokens_s": common.median([r["seconds"] - r["model_seconds"] for r in runs["hf"]]),
                   "model_input_tokens": first["hf"]["model_input_tokens"],
                   "model_padded_tokens": first["hf"]["model_padded_tokens"], "model_calls": first["hf"]["model_calls"]},
        },
        "metrics": {name: first[name]["metrics"] for name in runs},
        "setup_s": setup,
        "hf_model_args": loaded["model_args"] + f" (batch_size={loaded['batch_size']})",
        "torch_threads": built["torch_threads"],
        "load_average": {"start": load_at_start, "after_each_repeat": loads, "end": list(os.getloadavg())},
    }


def _median_by_type(runs: list[dict]) -> dict:
    """Median seconds inside each lm-eval method (tokenizing and scoring one request type)."""
    return {name: common.median([r["seconds_by_request_type"][name] for r in runs])
            for name in runs[0]["seconds_by_request_type"]}


def run(work: Path, quick: bool, presets=tuple(PRESETS)) -> dict:
    python, found = find_interpreter()
    if python is None:
        return {
            "status": "not measured",
            "reason": "no Python with torch, transformers (with xLSTM) and lm_eval was found; the hf side "
            f"needs the bench-hf extra. Install it with: {INSTALL}",
            "interpreters_tried": found,
        }
    results = {preset: run_preset(preset, python, work, quick) for preset in presets}
    return {
        "hf_interpreter": python,
        "hf_versions": found,
        "presets": results,
        "speedup_vs_lm_eval_hf": {p: r["speedup_vs_lm_eval_hf"] for p, r in results.items()},
        "same_weights": {p: r["same_weights"] and r["same_tokenizer"] for p, r in results.items()},
        "max_abs_loglik_diff": {p: r["max_abs_loglik_diff"] for p, r in results.items()},
        "max_rel_loglik_diff": {p: r["agreement_hf_vs_ours"]["max_rel_loglik_diff"] for p, r in results.items()},
        "bfloat16_speed_ratio_over_float32": {p: r["bfloat16"]["speed_ratio_over_float32"] for p, r in results.items()},
        "bfloat16_max_abs_loglik_diff": {p: r["bfloat16"]["max_abs_loglik_diff_vs_float32"] for p, r in results.items()},
        "bfloat16_metrics_agree": {p: r["bfloat16"]["metrics_vs_float32"]["agree"] for p, r in results.items()},
        "num_params": {p: r["num_params"] for p, r in results.items()},
        "targets": {"speedup_vs_lm_eval_hf": ">= 2"},
        "definitions": {
            "speedup_vs_lm_eval_hf": "ours (float32) scored tokens/s / hf scored tokens/s, each over the median wall "
            "seconds of the interleaved repeats of a whole lm-eval evaluation (simple_evaluate on a built LM, "
            "bootstrap_iters=0, cache_requests=False, task manager included); speedup_median_of_per_repeat pairs "
            "each repeat's two runs instead; speedup_best_of_repeats takes each side's fastest run",
            "same_weights": "sha256 of the safetensors files equal as built, as read by HFLM and by our loader, and "
            "sha256 of every parameter in memory (transformers' names, float32 bytes) equal on both sides; "
            "same_tokenizer: tokenizer files equal and the (context, continuation) token pairs scored equal",
            "max_abs_loglik_diff": "over every distinct request of the three tasks: |ours float32 - hf| of the "
            "log-likelihood lm-eval receives (a rolling document's whole sum); max_rel divides by max(1, |hf|)",
            "bfloat16": "ours with the weights loaded in bfloat16 (mlflow_lmeval.load(DIR, dtype='bfloat16'); state "
            "and log-likelihood sums stay float32) against ours in float32; speed_ratio_over_float32 = median "
            "float32 seconds / median bfloat16 seconds",
            "time_breakdown": "medians over repeats: ours' seconds inside Engine.score and outside it (lm-eval "
            "building requests, tokenizing, metrics); hf's seconds inside HFLM._loglikelihood_tokens (batching, "
            "padding, forward) and inside _model_call (the forward alone); padded_tokens/model_padded_tokens "
            "count every [batch, length] cell the model ran",
        },
    }
