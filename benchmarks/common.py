"""Shared pieces of the benchmarks: real text, local lm-eval tasks, models, timing and patching.

Everything here is benchmark scaffolding; the package is only used through its public API
(``Engine``, ``EngineSettings``, ``JaxLM``, ``run_lm_eval``, the mLSTM reference model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MLFLOW_LMEVAL_DATA", REPO.parent / "shared" / "data"))
WIKITEXT = DATA / "wikitext2_valid.txt"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
VOCAB_SIZE = 4096


# ---- machine ------------------------------------------------------------------------------
def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import jax

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_total = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_bytes": mem_total,
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "flax", "numpy", "lm_eval", "grain", "sentencepiece", "mlflow_lmeval")
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": dirty.splitlines() if dirty else [],
        "note": "shared machine: other processes may run concurrently; figures are medians and "
        "ratios taken within one run, with the methods interleaved repeat by repeat",
    }


# ---- timing -------------------------------------------------------------------------------
def median(values):
    return statistics.median(values) if values else None


class Stopwatch:
    """Accumulates wall seconds over several ``with`` blocks."""

    def __init__(self):
        self.seconds = 0.0
        self.count = 0

    @contextlib.contextmanager
    def __call__(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.count += 1


class CompileCounter:
    """Counts every XLA backend compilation (jitted steps and eager ops alike) in this process."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        from jax import monitoring

        self.count = 0
        self.seconds = 0.0
        self._active = False
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **_kwargs):
        if self._active and event == self.EVENT:
            self.count += 1
            self.seconds += duration

    @contextlib.contextmanager
    def counting(self):
        self.count, self.seconds, self._active = 0, 0.0, True
        try:
            yield self
        finally:
            self._active = False


_COMPILE_COUNTER: CompileCounter | None = None


def compile_counter() -> CompileCounter:
    global _COMPILE_COUNTER
    if _COMPILE_COUNTER is None:
        _COMPILE_COUNTER = CompileCounter()
    return _COMPILE_COUNTER


@contextlib.contextmanager
def patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield original
    finally:
        setattr(owner, name, original)


# ---- environment --------------------------------------------------------------------------
def configure(cache_dir: Path) -> None:
    """Offline lm-eval, caches in ``cache_dir``, and quiet loggers; call before lm_eval is imported."""
    import logging

    from mlflow_lmeval.evaluation import configure_environment

    configure_environment(cache_dir, offline=True)  # benchmarks read local data only
    os.environ.setdefault("HF_HOME", str(cache_dir / "hf"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("lm_eval", "lm-eval", "datasets", "absl", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


# ---- engine settings ----------------------------------------------------------------------
def engine_settings(**values):
    """EngineSettings from ``values``, leaving out fields this version of the package lacks.

    Returns (settings, applied) where ``applied`` lists what was really set.
    """
    from mlflow_lmeval.engine.loop import EngineSettings

    known = {f.name for f in dataclasses.fields(EngineSettings)}
    applied = {k: v for k, v in values.items() if k in known}
    return EngineSettings(**applied), applied


def has_share_prefixes() -> bool:
    from mlflow_lmeval.engine.loop import EngineSettings

    return "share_prefixes" in {f.name for f in dataclasses.fields(EngineSettings)}


def model_tokens(engine, counter: str = "model_tokens") -> int | None:
    """An engine's token counter (``model_tokens``: real tokens; ``computed_tokens``: positions the
    step ran), None for an engine version without it."""
    value = getattr(engine, counter, None)
    return int(value) if value is not None else None


class StreamTimer:
    """Stands in for ``mlflow_lmeval.engine.loop.batch_stream``: times how long the engine's host
    loop waits for each batch from the grain pipeline, and counts real and padded tokens."""

    def __init__(self, original):
        self.original = original
        self.reset()

    def reset(self):
        self.blocked = 0.0
        self.batches = 0
        self.streams = 0
        self.padded_tokens = 0
        self.real_tokens = 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        iterator = self.original(*args, **kwargs)
        self.blocked += time.perf_counter() - start
        self.streams += 1
        return self._timed(iterator)

    def _timed(self, iterator):
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.blocked += time.perf_counter() - start
                return
            self.blocked += time.perf_counter() - start
            self.batches += 1
            self.padded_tokens += int(batch["valid"].size)
            self.real_tokens += int(batch["valid"].sum())
            yield batch


@contextlib.contextmanager
def timed_batches():
    """Within the block every Engine's batch stream is timed and counted by the yielded StreamTimer."""
    from mlflow_lmeval.engine import loop

    timer = StreamTimer(loop.batch_stream)
    with patched(loop, "batch_stream", timer):
        yield timer


# ---- text ---------------------------------------------------------------------------------
def wikitext_articles() -> list[tuple[str, str]]:
    """WikiText-2 validation split into articles at its top-level `` = Title = `` lines."""
    text = WIKITEXT.read_text(encoding="utf-8").lstrip("\ufeff")
    parts = re.split(r"^ = ([^=].*?) = $", text, flags=re.MULTILINE)
    return [(parts[i], f" = {parts[i]} = {parts[i + 1]}".rstrip() + "\n") for i in range(1, len(parts), 2)]


def shakespeare_speeches() -> list[tuple[str, list[str]]]:
    """(speaker, lines) for each speech of Tiny Shakespeare, in order."""
    speeches = []
    for block in re.split(r"\n\s*\n", SHAKESPEARE.read_text(encoding="utf-8")):
        lines = [line.rstrip() for line in block.strip().splitlines() if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            speeches.append((lines[0][:-1], lines[1:]))
    return speeches


def train_benchmark_tokenizer(directory: Path):
    """A 4,096-piece SentencePiece model trained on both corpora (deterministic, about 3 s)."""
    from mlflow_lmeval.tokenizer import Tokenizer, train_tokenizer

    path = directory / "tokenizer.model"
    if path.is_file():
        return Tokenizer.load(path)
    corpus = directory / "tokenizer_corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8") + "\n" + WIKITEXT.read_text(encoding="utf-8"), encoding="utf-8")
    tokenizer = train_tokenizer(corpus, VOCAB_SIZE, path)
    corpus.unlink()
    return tokenizer


# ---- tasks --------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z]+")


def lastword_docs(limit: int | None = None) -> list[dict]:
    """Tiny Shakespeare speeches of at least 12 words whose last word is alphabetic: predict it
    (the shape of lambada)."""
    docs = []
    for _speaker, lines in shakespeare_speeches():
        words = " ".join(lines).split()
        if len(words) < 12:
            continue
        last = words[-1].rstrip(".,;:!?'")
        if not _WORD.fullmatch(last):
            continue
        words = words[-80:]
        docs.append({"context": " ".join(words[:-1]), "target": " " + last})
    return docs[:limit] if limit else docs


def choice_docs(seed: int = 0, num_choices: int = 4) -> list[dict]:
    """Which line comes next? Context: a speech and the next speaker; choices: the true first
    line of the next speech and three first lines of random other speeches."""
    rng = random.Random(seed)
    speeches = shakespeare_speeches()
    first_lines = [lines[0] for _, lines in speeches if 3 <= len(lines[0].split())]
    docs = []
    for (speaker, lines), (next_speaker, next_lines) in itertools.pairwise(speeches):
        answer = next_lines[0]
        if len(answer.split()) < 3 or len(lines) > 8:
            continue
        distractors = []
        while len(distractors) < num_choices - 1:
            line = rng.choice(first_lines)
            if line != answer and line not in distractors:
                distractors.append(line)
        choices = [answer] + distractors
        rng.shuffle(choices)
        context = f"{speaker}:\n" + "\n".join(lines) + f"\n\n{next_speaker}:"
        docs.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return docs


def _write_task(directory: Path, name: str, fields: dict, splits: dict[str, list[dict]]) -> str:
    files = {}
    for split, docs in splits.items():
        path = (directory / f"{name}_{split}.jsonl").absolute()
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
        files[split] = str(path)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }
    (directory / f"{name}.yaml").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return name


def write_mixed_tasks(directory: Path, prefix: str, sizes: tuple[int, int, int]) -> list[str]:
    """B1's task mix: the shortest WikiText articles (rolling), last-word and 4-choice Tiny
    Shakespeare tasks, with ``sizes`` = (articles, last-word docs, choice docs)."""
    articles, lastword, choice = sizes
    shortest = sorted(wikitext_articles(), key=lambda a: len(a[1]))[:articles]
    return [
        write_rolling_task(directory, f"{prefix}_wiki", shortest),
        write_lastword_task(directory, f"{prefix}_lastword", lastword_docs()[:lastword]),
        write_choice_task(directory, f"{prefix}_choice", choice_docs(seed=1)[:choice]),
    ]


def write_rolling_task(directory: Path, name: str, articles: list[tuple[str, str]]) -> str:
    return _write_task(directory, name, {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{page}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    }, {"test": [{"title": title, "page": page} for title, page in articles]})


def write_lastword_task(directory: Path, name: str, docs: list[dict]) -> str:
    return _write_task(directory, name, {
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }, {"test": docs})


def write_choice_task(directory: Path, name: str, test: list[dict], train: list[dict] | None = None) -> str:
    fields = {
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "\n",
        "fewshot_delimiter": "\n\n",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    splits = {"test": test}
    if train:
        fields["fewshot_split"] = "train"
        fields["fewshot_config"] = {"sampler": "default"}
        splits["train"] = train
    return _write_task(directory, name, fields, splits)


# ---- models -------------------------------------------------------------------------------
def reference_model(preset: str, seed: int = 0, vocab_size: int = VOCAB_SIZE):
    """The mLSTM reference model with random weights (speed does not depend on training)."""
    from mlflow_lmeval.models import mlstm

    config = mlstm.preset_config(preset, vocab_size)
    params = mlstm.init_params(config, seed)
    return mlstm.as_language_model(config, params), mlstm.count_params(params)


# ---- evaluation ---------------------------------------------------------------------------
class ScoreRecorder:
    """Wraps ``engine.score`` of one engine instance: times each call and keeps its requests and
    results, so a benchmark can count tokens and compare per-request results."""

    def __init__(self, engine):
        self.engine = engine
        self._score = engine.score
        engine.score = self  # instance attribute: JaxLM calls self.engine.score(...)
        self.reset()

    def reset(self):
        self.calls = []  # dicts: requests, results, seconds

    def __call__(self, requests):
        start = time.perf_counter()
        results = self._score(requests)
        self.calls.append({"requests": requests, "results": results, "seconds": time.perf_counter() - start})
        return results

    @property
    def seconds(self) -> float:
        return sum(c["seconds"] for c in self.calls)

    @property
    def requests(self):
        return [r for c in self.calls for r in c["requests"]]

    def loglik(self) -> np.ndarray:
        return np.concatenate([np.asarray(c["results"].loglik, np.float64) for c in self.calls]) if self.calls else np.zeros(0)

    def greedy(self) -> np.ndarray:
        return np.concatenate([np.asarray(c["results"].greedy) for c in self.calls]) if self.calls else np.zeros(0, bool)

    def scored_tokens(self) -> int:
        return int(sum(int(np.sum(c["results"].num_tokens)) for c in self.calls))

    def request_tokens(self) -> int:
        """Tokens a model must read to score every request alone: len(context + continuation) - 1."""
        return request_tokens(self.requests)


def request_tokens(requests) -> int:
    return int(sum(len(c) + len(x) - 1 for c, x in requests))


def shared_model_tokens(requests) -> int:
    """Model tokens when every context used by several requests runs once (the share_prefixes
    rule: prefix = context without its last token, then each request feeds that token and its
    continuation without the last)."""
    users: dict[tuple, int] = {}
    for context, _ in requests:
        users[tuple(context)] = users.get(tuple(context), 0) + 1
    total = sum(len(c) - 1 for c, n in users.items() if n > 1 and len(c) > 1)
    for context, continuation in requests:
        shared = users[tuple(context)] > 1 and len(context) > 1
        total += len(continuation) if shared else len(context) + len(continuation) - 1
    return int(total)


def make_lm(model, tokenizer, settings):
    from mlflow_lmeval.lm import JaxLM

    return JaxLM(model, tokenizer, settings, show_progress=False)


def evaluate_lm(lm, config) -> dict:
    """What ``run_evaluation`` does, with an LM built by the caller (so its compiled engine is
    reused across repeats): lm-eval's requests in, lm-eval's results and our statistics out."""
    from mlflow_lmeval.evaluation import run_lm_eval
    from mlflow_lmeval.lm_eval_stats import add_token_perplexity

    lm.document_scores.clear()
    with contextlib.redirect_stderr(_Devnull()):
        output = run_lm_eval(lm, config)
    add_token_perplexity(output, lm.document_scores, config.bootstrap_iters)
    return output


class _Devnull:
    def write(self, _text):
        return 0

    def flush(self):
        pass


def eval_config(tasks: list[str], include_path: Path, **overrides):
    from mlflow_lmeval.config import EvalConfig

    values = {
        "evaluation_tasks": tuple(tasks), "include_path": str(include_path), "cache_requests": False, "bootstrap_iters": 0,
    }
    values.update(overrides)
    return EvalConfig(**values)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
