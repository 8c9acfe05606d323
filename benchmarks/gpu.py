"""The GPU check: our engine against the packed bound, the naive evaluator and transformers' torch
forward on random-weight xLSTMs in bfloat16, and xLSTM-7b on LAMBADA-length requests.

    python -m benchmarks.gpu [--json OUT] [--tiny] [--sections a,b]

It needs only what a bare accelerator image holds: jax, flax and numpy; torch and transformers
when present (without them the torch comparison is reported as not measured, with the reason).
Each section runs in a child process with its own deadline, so a section that runs out of memory
or time is recorded and the others still run; a child rewrites its record after every phase, so a
killed one keeps what it measured. ``--tiny`` runs the same code on tiny models (the CPU test).
Progress goes to stderr; the JSON is rewritten after every section.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import operator
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mlflow_lmeval.engine import loop
from mlflow_lmeval.engine.batching import MaterializeBatch

from .gpu_weights import TORCH_MISSING, build_models, torch, torch_forward_rate, torch_logliks
from .naive import NaiveEngine

REPO = Path(__file__).resolve().parent.parent
XLSTM_7B_CONFIG = REPO / "tests" / "fixtures" / "hf_xlstm" / "xlstm_7b" / "config.json"
LAMBADA_OPENAI_REQUESTS = 5153
TOTAL_BUDGET_S = 450  # the whole check must end inside 8 minutes on one GPU
DTYPE = "bfloat16"

# Each section: the model (transformers' xLSTMConfig fields, with both names of width and depth,
# which transformers keeps apart), the engine's batch shape, the synthetic workload, the sample
# (rolling, loglikelihood requests) for the naive evaluator and the log-likelihood checks, the
# torch forward's [rows, length] and the deadline. Rolling documents are at most 63 tokens shorter
# than ``rolling_length`` (a multiple of 64), so the naive evaluator compiles one shape for them.
SECTIONS = {
    "xlstm_125m": {  # GPT-2-small's width and depth: 85 M parameters besides the embeddings
        "hf_config": {"hidden_size": 768, "embedding_dim": 768, "num_blocks": 12, "num_hidden_layers": 12, "num_heads": 4},
        "batch_size": 128, "chunk_size": 64, "rolling": 192, "rolling_length": 1024, "loglikelihood": 2048,
        "sample": (6, 24), "torch_rows": (32, 512), "budget_s": 110},
    "xlstm_1_3b": {  # GPT-3-XL's width and depth
        "hf_config": {"hidden_size": 2048, "embedding_dim": 2048, "num_blocks": 24, "num_hidden_layers": 24, "num_heads": 4},
        "batch_size": 64, "chunk_size": 64, "rolling": 96, "rolling_length": 1024, "loglikelihood": 1024,
        "sample": (4, 12), "torch_rows": (16, 512), "budget_s": 180},
    "xlstm_7b_lambada": {  # xLSTM-7b's published config.json; LAMBADA-length requests only, no torch
        "hf_config": "xlstm_7b", "batch_size": 64, "chunk_size": 32, "rolling": 0, "rolling_length": 64,
        "loglikelihood": 1024, "sample": None, "torch_rows": None, "budget_s": 150},
}
# Tiny: one segment per full pass (chunk_size 128) against the engine's chunks of 32, so the
# equality check sets the state carried over chunks against one parallel pass.
TINY_MODEL = {"chunk_size": 128, "vocab_size": 256, "hidden_size": 64, "embedding_dim": 64, "num_blocks": 2,
              "num_hidden_layers": 2, "num_heads": 4}
TINY = {"batch_size": 4, "chunk_size": 32, "rolling": 4, "rolling_length": 128, "loglikelihood": 12, "budget_s": 90}
LAMBADA_LIKE = {"context_tokens": (70, 100), "continuation_tokens": (1, 3)}  # uniform, bounds included

TARGETS = {"speedup_vs_naive": 10.0, "fraction_of_bound": 0.7, "engine_vs_torch_forward": 2.0}
UNITS = {"*_tokens_per_s": "tokens/s", "*_requests_per_s": "requests/s", "*_s": "seconds", "*params": "parameters",
         "fraction_of_bound, speedup_vs_naive, *_vs_torch_forward": "ratio", "*loglik*": "nats (a request's sum)"}
DEFINITIONS = {
    "engine_model_tokens_per_s": "real tokens the engine's model ran / median seconds of Engine.score over the "
    "workload (recurrent mode; a warm-up pass over the same workload compiles first)",
    "bound_tokens_per_s": "B1's packed bound: the jitted forward over full [batch_size, chunk_size] batches of the "
    "workload's tokens, the state carried, every logit reduced",
    "fraction_of_bound": "engine_model_tokens_per_s / bound_tokens_per_s (as B1 in benchmarks/throughput.py)",
    "speedup_vs_naive": "naive seconds / engine seconds for the workload; B1's naive (benchmarks/naive.py), timed on "
    "a sample of each request kind and scaled by the kind's request count",
    "torch_forward_tokens_per_s": "transformers' xLSTMForCausalLM forward (inference_mode, bf16, default kernels, "
    "fresh state per call), same weights, same token stream as [rows, length] calls",
    "engine_vs_torch_forward": "engine_model_tokens_per_s / torch_forward_tokens_per_s",
    "max_abs_loglik_diff_vs_full_pass": "max over the sample of |engine - naive full pass| request log-likelihoods",
    "context_effect_max_abs_loglik": "max over the sample's loglikelihood requests of |naive loglik - naive loglik "
    "of the same continuation after another context|: the size a state error could show at",
    "max_abs_loglik_diff_vs_torch": "max over the torch sample of |engine - transformers| request log-likelihoods",
    "lambada_openai_projected_s": "5,153 requests / the engine's requests/s on LAMBADA-length requests",
}


def log(message: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_json(path: Path, data: dict) -> None:
    """Written whole and renamed, so a reader (or a kill) never sees half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2, default=str))
    partial.replace(path)


# ---- the engine's API in one place (its settings' fields and counters may be renamed) -----------
def engine_settings(batch_size: int, chunk_size: int) -> loop.EngineSettings:
    """Recurrent mode: every request is one piece, run in chunks with the state carried."""
    return loop.EngineSettings(batch_size=batch_size, chunk_size=chunk_size, mode="recurrent")


def engine_traces(engine: loop.Engine) -> int:
    return engine.traces


def prefetched_batches(pieces, plans, batch_size, *, worker_count=0, worker_buffer_size=1):
    """Stands in for ``batching.batch_stream`` where grain is absent (the lent GPU image has none):
    a thread builds the next batch while the device runs this one, as grain's worker_count=0 does."""
    make = MaterializeBatch(pieces, batch_size)
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(make, plans[0]) if plans else None
        for plan in plans[1:]:
            batch, ahead = ahead.result(), pool.submit(make, plan)
            yield batch
        if ahead is not None:
            yield ahead.result()


def use_available_batch_source() -> str:
    """grain where it is importable (the product's path), else ``prefetched_batches``."""
    try:
        import grain  # noqa: F401  (only probed: the engine imports it itself)

        return "grain"
    except ImportError:
        loop.batch_stream = prefetched_batches
        return "a prefetch thread (grain is not importable here)"


# ---- models and requests -------------------------------------------------------------
def section_spec(name: str, tiny: bool) -> dict:
    spec = dict(SECTIONS[name])
    if spec["hf_config"] == "xlstm_7b":
        spec["hf_config"] = json.loads(XLSTM_7B_CONFIG.read_text())
    if tiny:
        spec.update(TINY, hf_config={**spec["hf_config"], **TINY_MODEL}, rolling=spec["rolling"] and TINY["rolling"],
                    sample=spec["sample"] and (2, 3), torch_rows=spec["torch_rows"] and (2, 64))
    return spec


def make_requests(spec: dict, vocab_size: int, seed: int = 0) -> tuple[list, int]:
    """Rolling documents (the prefix token, then the document), then LAMBADA-like requests; returns
    them and the number of rolling ones. Random contexts never repeat, so no prefix is shared."""
    rng = np.random.default_rng(seed)

    def tokens(low: int, high: int) -> list[int]:
        return rng.integers(3, vocab_size, int(rng.integers(low, high + 1))).tolist()

    length = spec["rolling_length"]
    rolling = [([0], tokens(length - 63, length)) for _ in range(spec["rolling"])]
    lambada = [(tokens(*LAMBADA_LIKE["context_tokens"]), tokens(*LAMBADA_LIKE["continuation_tokens"]))
               for _ in range(spec["loglikelihood"])]
    return rolling + lambada, len(rolling)


# ---- measurements -----------------------------------------------------------------------------
def repeat_timed(function, budget_s: float, most: int = 3) -> list[float]:
    """Wall seconds of ``function()``: at least once, again while another run fits the budget."""
    times: list[float] = []
    while len(times) < most and (not times or sum(times) + times[-1] < budget_s):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def packed_bound(model, params, batch_size: int, chunk_size: int, stream: np.ndarray):
    """B1's bound: ``run(steps)`` feeds ``stream`` as full [batch_size, chunk_size] chunks through
    the jitted forward (state carried, every logit reduced); ``run.tokens``: what a whole run feeds."""
    rows = batch_size * chunk_size
    steps = max(1, -(-len(stream) // rows))
    chunks = np.resize(stream, steps * rows).reshape(steps, batch_size, chunk_size)
    mask = np.ones((batch_size, chunk_size), bool)
    # The fresh state is placed like the parameters, hence like the step's outputs: placed
    # otherwise, the second step (a carried state) compiled again.
    placement = jax.tree.leaves(params)[0].sharding

    def step(params, state, total, inputs):
        logits, state = model.apply(params, inputs, state, mask)
        return state, total + logits.astype(jnp.float32).max(-1).sum(-1)

    jitted = jax.jit(step, donate_argnums=(1, 2))

    def run(count: int = steps) -> None:
        state, total = jax.device_put((model.init_state(batch_size), jnp.zeros((batch_size,), jnp.float32)), placement)
        for index in range(count):
            state, total = jitted(params, state, total, chunks[index])
        jax.block_until_ready(total)

    run.tokens = steps * rows
    return run


def naive_check(model, requests: list, sample: list[list[int]], per_kind: list[int]) -> tuple[dict, np.ndarray]:
    """B1's naive evaluator on each kind's sample: the workload's projected seconds, the sample's
    log-likelihoods (a plain full pass, which the engine must equal) and the context effect."""
    naive = NaiveEngine(model)
    naive.precompile([requests[i] for kind in sample for i in kind])
    projected, logliks = 0.0, []
    for kind, total in zip(sample, per_kind):
        if kind:
            start = time.perf_counter()
            logliks.append(naive.score([requests[i] for i in kind]).loglik)
            projected += (time.perf_counter() - start) * total / len(kind)
    lambada = sample[1]
    swapped = [(requests[j][0], requests[i][1]) for i, j in zip(lambada, lambada[1:] + lambada[:1])]
    return {"compile_s": naive.compile_seconds, "requests_timed": sum(map(len, sample)), "workload_projected_s": projected,
            "context_effect": float(np.abs(naive.score(swapped).loglik - logliks[-1]).max())}, np.concatenate(logliks)


# ---- one section (a child process) ------------------------------------------------------------
def environment() -> dict:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
            "python": platform.python_version(), "torch_cuda": torch.version.cuda if torch is not None else None,
            "versions": {name: _version(name) for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers")}}


def run_section(name: str, tiny: bool, out: Path) -> None:
    spec, started, state = section_spec(name, tiny), time.perf_counter(), {}
    record: dict = {"section": name, "errors": {}, "phase_s": {}, "environment": environment()}
    record["environment"]["batches_from"] = use_available_batch_source()

    def left() -> float:
        return spec["budget_s"] - (time.perf_counter() - started)

    @contextlib.contextmanager
    def phase(label: str):
        """A failing phase is recorded; the phases that do not need its results still run."""
        log(f"{name}: {label} ({left():.0f} s left)")
        start = time.perf_counter()
        try:
            yield
        except Exception as error:  # an OOM or any other failure of this phase
            record["errors"][label] = f"{type(error).__name__}: {error}"[:2000]
            log(f"{name}: {label} failed: {record['errors'][label][:300]}")
        finally:
            record["phase_s"][label] = time.perf_counter() - start
            write_json(out, record)

    with phase("weights"):
        model, torch_model, device, record["config"] = build_models(spec["hf_config"], DTYPE, bool(spec["torch_rows"]))
        requests, rolling = make_requests(spec, model.vocab_size)
        stream = np.concatenate([np.asarray(c + x, np.int32) for c, x in requests])
        per_kind = [rolling, len(requests) - rolling]
        record["workload"] = {
            "requests_per_kind": {"rolling": rolling, "loglikelihood": per_kind[1]}, "request_tokens": len(stream),
            "rolling_tokens": [spec["rolling_length"] - 63, spec["rolling_length"]], **LAMBADA_LIKE,
            "engine": {"batch_size": spec["batch_size"], "chunk_size": spec["chunk_size"], "mode": "recurrent"}}
        if spec["sample"]:  # spread over each kind
            state["sample"] = [np.linspace(first, first + count - 1, size).astype(int).tolist() if count else []
                               for first, count, size in zip((0, rolling), per_kind, spec["sample"])]
            state["torch_sample"] = state["sample"][0][:2] + state["sample"][1][:2]
    if not spec["torch_rows"] or torch is None:
        record["torch"] = {"not_measured": TORCH_MISSING if spec["torch_rows"] else "no torch comparison in this section"}
    elif "config" in record:
        with phase("torch"):
            rate = torch_forward_rate(torch_model, stream, *spec["torch_rows"], device, min(20.0, left() / 8))
            record["torch"] = {"device": device, **rate}
            state["torch_logliks"] = torch_logliks(torch_model, [requests[i] for i in state["torch_sample"]], device)
        del torch_model
        if device == "cuda":
            torch.cuda.empty_cache()  # hand torch's cached blocks back before JAX needs them
    if "config" in record:
        with phase("engine"):
            engine = loop.Engine(model, engine_settings(spec["batch_size"], spec["chunk_size"]))
            start = time.perf_counter()
            # One pass over the workload compiles every shape it meets (row buckets included).
            engine.score(requests)
            warmup_s, traces, before = time.perf_counter() - start, engine_traces(engine), engine.model_tokens
            times = repeat_timed(lambda: state.update(results=engine.score(requests)), min(60.0, left() / 3))
            model_tokens, seconds = (engine.model_tokens - before) // len(times), float(np.median(times))
            record["engine"] = {
                "warmup_s": warmup_s, "seconds_all": times, "model_tokens": model_tokens,
                "engine_model_tokens_per_s": model_tokens / seconds, "requests_per_s": len(requests) / seconds,
                "scored_tokens_per_s": float(state["results"].num_tokens.sum()) / seconds,
                "traces_after_warmup": traces, "traces_after_timed_runs": engine_traces(engine),
                "all_finite": bool(np.all(np.isfinite(state["results"].loglik)))}
            # Derived at once, so that a section killed in a later phase still reports them.
            rate = record["engine"]["engine_model_tokens_per_s"]
            if "torch_logliks" in state:
                engine_logliks = state["results"].loglik[state["torch_sample"]]
                record["max_abs_loglik_diff_vs_torch"] = float(np.max(np.abs(engine_logliks - state["torch_logliks"])))
                record["engine_vs_torch_forward"] = rate / record["torch"]["torch_forward_tokens_per_s"]
            if not rolling:
                record["lambada_openai_projected_s"] = LAMBADA_OPENAI_REQUESTS / record["engine"]["requests_per_s"]
                record["lambada_openai_projected_with_warmup_s"] = record["lambada_openai_projected_s"] + warmup_s
    if "engine" in record:
        with phase("bound"):
            bound = packed_bound(model, engine.params, spec["batch_size"], spec["chunk_size"], stream[:model_tokens])
            bound(1)  # compiles
            timed = repeat_timed(bound, min(30.0, left() / 4))
            record["bound"] = {"bound_tokens_per_s": bound.tokens / float(np.median(timed)), "tokens_timed": bound.tokens,
                               "seconds_all": timed}
            record["fraction_of_bound"] = rate / record["bound"]["bound_tokens_per_s"]
            if "engine_vs_torch_forward" in record:
                record["bound_vs_torch_forward"] = record["bound"]["bound_tokens_per_s"] / record["torch"]["torch_forward_tokens_per_s"]
    if "engine" in record and spec["sample"]:
        with phase("naive"):
            record["naive"], naive_logliks = naive_check(model, requests, state["sample"], per_kind)
            record["speedup_vs_naive"] = record["naive"]["workload_projected_s"] / seconds
            engine_logliks = state["results"].loglik[functools.reduce(operator.iadd, state["sample"], [])]
            record["max_abs_loglik_diff_vs_full_pass"] = float(np.max(np.abs(engine_logliks - naive_logliks)))
            record["context_effect_max_abs_loglik"] = record["naive"].pop("context_effect")
    record["wall_s"] = time.perf_counter() - started
    write_json(out, record)


# ---- the parent: one child per section, each with a deadline ----------------------------------
SUMMARY_KEYS = ("fraction_of_bound", "speedup_vs_naive", "engine_vs_torch_forward", "max_abs_loglik_diff_vs_full_pass",
                "context_effect_max_abs_loglik", "max_abs_loglik_diff_vs_torch", "lambada_openai_projected_s")


def summarise(record: dict) -> dict:
    values = {"num_params": record.get("config", {}).get("num_params"),
              "engine_model_tokens_per_s": record.get("engine", {}).get("engine_model_tokens_per_s"),
              **{key: record.get(key) for key in SUMMARY_KEYS}}
    values["targets_met"] = {key: None if values[key] is None else values[key] >= target for key, target in TARGETS.items()}
    return values


def run_child(name: str, tiny: bool, deadline: float, out: Path) -> dict:
    """One section in a child process, killed at its deadline; its record, whatever it reached."""
    command = [sys.executable, "-m", "benchmarks.gpu", "--section", name, "--out", str(out)] + ["--tiny"] * tiny
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # torch shares the GPU with JAX
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start, status = time.perf_counter(), "ok"
    try:
        code = subprocess.run(command, cwd=REPO, env=env, timeout=max(deadline, 1)).returncode
        status = f"error: the child exited with {code}" if code else status
    except subprocess.TimeoutExpired:  # subprocess.run has killed the child by then
        status = f"timeout after {deadline:.0f} s"
    record = json.loads(out.read_text()) if out.exists() else {}
    if status == "ok" and record.get("errors"):
        status = f"partial: {', '.join(record['errors'])} failed"
    return {**record, "status": status, "deadline_s": deadline, "child_wall_s": time.perf_counter() - start}


def run_all(names: list[str], tiny: bool, json_path: Path | None) -> dict:
    started = time.perf_counter()
    result = {"benchmark": "benchmarks.gpu", "tiny": tiny, "argv": sys.argv[1:], "environment": None,
              "targets": {key: f">= {value}" for key, value in TARGETS.items()}, "units": UNITS,
              "definitions": DEFINITIONS, "sections": {}, "summary": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            deadline = min(section_spec(name, tiny)["budget_s"], TOTAL_BUDGET_S - (time.perf_counter() - started))
            log(f"section {name}: deadline {deadline:.0f} s")
            record = run_child(name, tiny, deadline, Path(scratch) / f"{name}.json")
            environment = record.pop("environment", None)
            result["environment"] = result["environment"] or environment
            result["sections"][name], result["summary"][name] = record, summarise(record)
            result["wall_s"] = time.perf_counter() - started
            numbers = ", ".join(f"{k}={v:.4g}" for k, v in result["summary"][name].items() if isinstance(v, float))
            log(f"section {name}: {record['status']}; {numbers}")
            if json_path:
                write_json(json_path, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every section)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and workloads (the CPU test)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset of the sections")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # a child's one section
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        run_section(args.section, args.tiny, args.out)
        return 0
    names = [name for name in args.sections.split(",") if name]
    if set(names) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(set(names) - set(SECTIONS)))}; choose from {', '.join(SECTIONS)}")
    result = run_all(names, args.tiny, args.json)
    if not args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
