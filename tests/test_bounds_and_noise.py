"""``--chunk_size`` is bounded by the work, and a normal command-line run prints only what a user reads."""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from mlflow_lmeval.engine.loop import Engine, EngineSettings

# Far wider than any piece below (at most ~300 positions), yet a width the engine before the cap
# still ran on this machine (1.2 GB for the packed rows with shared contexts). The CLI test below
# asks for 100,000,000, which that engine tried to allocate (terabytes).
WIDE = 2048
WINDOW = 48


@pytest.fixture(scope="module")
def requests(checkpoint, long_documents):
    """Shared contexts of ~60-120 tokens with four short continuations each (as multiple choice
    makes), and a few requests of ~300 tokens (batches that run fewer rows)."""
    tok = checkpoint.tokenizer
    words = long_documents[1].split()
    made = []
    for i in range(0, 480, 40):
        context = tok.encode(" ".join(words[i : i + 40 + i % 45]))
        made += [(context, tok.encode(" " + word)) for word in words[i + 100 : i + 104]]
    made += [([tok.bos_id], tok.encode(" ".join(words[i : i + 220]))) for i in (500, 800, 1100)]
    return made


def longest_piece(requests, window=None):
    """A request's longest row of inputs: its tokens but the last; a window's at most ``window``."""
    longest = max(len(context) + len(continuation) for context, continuation in requests) - 1
    return min(longest, window) if window else longest


@pytest.mark.parametrize("kind", ["packed", "padded", "windowed"])
def test_a_chunk_wider_than_every_piece_is_capped_and_scores_as_the_cap(checkpoint, requests, kind, caplog):
    model = dataclasses.replace(checkpoint.model, packable=False) if kind == "padded" else checkpoint.model
    extra = {"mode": "windowed", "context_length": WINDOW} if kind == "windowed" else {}
    wide = Engine(model, EngineSettings(batch_size=8, chunk_size=WIDE, **extra))
    with caplog.at_level(logging.WARNING, logger="mlflow_lmeval"):
        scores = wide.score(requests)
        cap, computed = wide.chunk_size, wide.computed_tokens
        wide.score(requests[-2:])  # another call, capped again
    longest = longest_piece(requests, WINDOW if kind == "windowed" else None)
    assert longest <= cap < 2 * longest, (longest, cap)  # rounded up to a bucket: a power of two
    told = [record.getMessage() for record in caplog.records if "capped" in record.getMessage()]
    assert len(told) == 1 and f"chunk_size {WIDE} " in told[0] and f"({cap} positions" in told[0], told

    capped = Engine(model, EngineSettings(batch_size=8, chunk_size=cap, **extra))
    expected = capped.score(requests)
    # The same plans and the same steps: bit-identical, and no more positions computed.
    for field in ("loglik", "greedy", "num_tokens", "position_nll", "position_tokens"):
        np.testing.assert_array_equal(getattr(scores, field), getattr(expected, field), err_msg=field)
    assert computed == capped.computed_tokens

    contexts = [context for context, _ in requests[::9]]
    never = lambda tokens: False
    assert wide.generate(contexts, 3, never) == capped.generate(contexts, 3, never)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_a_chunk_within_the_pieces_or_the_default_is_left_as_set(checkpoint, requests, chunk_size, caplog):
    """16 is narrower than the pieces; 64, the default, is never capped, not even for pieces of a
    few tokens: a default run keeps the steps it always ran."""
    short = [(context[:6], continuation) for context, continuation in requests[:8]]
    assert longest_piece(short) < 32
    engine = Engine(checkpoint.model, EngineSettings(batch_size=8, chunk_size=chunk_size))
    with caplog.at_level(logging.WARNING, logger="mlflow_lmeval"):
        engine.score(short)
    assert engine.chunk_size == chunk_size
    assert not [r for r in caplog.records if "capped" in r.getMessage()]


# ---- a normal run's output, and --verbose ------------------------------------------------------------

NOISE = {
    "aggregation": "aggregation is not",  # lm-eval: a metric without an aggregation gets the default
    "num_fewshot": "Overwriting default num_fewshot",  # lm-eval: --num_fewshot replacing the task's
    "tables": "Creating initial MLflow database tables",  # MLflow, on a new SQLite store
}


@pytest.fixture(scope="module")
def bare_task(tmp_path_factory):
    """A multiple-choice task whose metric names no aggregation (lm-eval then warns, as for many
    of its own tasks)."""
    directory = tmp_path_factory.mktemp("bare_task")
    docs = [{"question": "The sky is", "choices": [" blue", " loud"], "answer": 0},
            {"question": "Fire is", "choices": [" cold", " hot"], "answer": 1}]
    (directory / "bare.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "bare.yaml").write_text(json.dumps({
        "task": "bare", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(directory / "bare.jsonl")}},
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}))
    return directory


def run_cli_measured(args, tmp_path, timeout=300):
    """(exit code, stdout, stderr, peak RSS in bytes) of ``python -m mlflow_lmeval.cli ARGS``, run
    as a user would (no verbosity variables of ours or the libraries' set)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "LMEVAL_LOG_LEVEL",
                                                           "HF_DATASETS_DISABLE_PROGRESS_BARS", "MLFLOW_TRACKING_URI")}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "mlflow_lmeval.cli", *map(str, args)], stdout=stdout,
                                   stderr=stderr, env=env, cwd=tmp_path)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, out.read_text(), err.read_text(), usage.ru_maxrss * 1024


def test_a_normal_run_prints_no_library_notices_and_verbose_shows_them(checkpoint, bare_task, tmp_path):
    common = ["evaluate", "--checkpoint", checkpoint.path, "--tasks", "bare", "--include_path", bare_task,
              "--limit", 2, "--num_fewshot", 1, "--bootstrap_iters", 10, "--no_cache",
              # a training run the store does not hold: a TrackingWarning ("publishing without a parent link")
              "--training_run_id", "0123456789abcdef0123456789abcdef"]
    runs = {}
    for name, extra in (("normal", ["--chunk_size", 100_000_000]), ("verbose", ["--verbose"])):
        where = tmp_path / name
        where.mkdir()
        runs[name] = run_cli_measured([*common, "--output_path", where / "out",
                                       "--tracking_uri", f"sqlite:///{where}/mlflow.db", *extra], where)
        code, out, err, _ = runs[name]
        assert code == 0, err
        assert "|bare" in out and "MLflow run" in out, out  # lm-eval's table, our last line

    _, _, err, huge_rss = runs["normal"]
    for what, line in NOISE.items():
        assert line not in err, (what, err)
    warnings = [line for line in err.splitlines() if "without a parent link" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: training run "), err  # one line, no source line
    assert "warnings.warn(" not in err and "TrackingWarning" not in err, err
    told = [line for line in err.splitlines() if "capped" in line]
    assert len(told) == 1 and told[0].startswith("warning: chunk_size 100000000 "), err
    # Capped at the smallest cap, the default 64 (these pieces have ~16 tokens): the memory of the
    # default run, which 1.25 allows with room for the allocator's and the verbose run's noise.
    _, _, verbose_err, default_rss = runs["verbose"]
    assert huge_rss <= 1.25 * default_rss, (huge_rss, default_rss)
    assert "capped" not in verbose_err  # the default chunk is never capped, so nothing to say

    for what, line in NOISE.items():
        assert line in verbose_err, (what, verbose_err)
    assert "TrackingWarning" in verbose_err and "without a parent link" in verbose_err  # Python's own format
