"""Resumable evaluation: finished batches survive a crash or kill -9, and nothing stale is reused."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import assert_logliks_close

from mlflow_lmeval.engine import loop
from mlflow_lmeval.engine.cached import CachedEngine
from mlflow_lmeval.engine.loop import Engine, EngineSettings
from mlflow_lmeval.response_cache import ResponseCache


def requests_for(checkpoint, count=40):
    tok = checkpoint.tokenizer
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the", "cat", "sleeps", "in", "the", "warm", "sun"]
    return [(tok.encode(" ".join(words[: 3 + i % 9])), tok.encode(" " + words[(i * 7) % len(words)])) for i in range(count)]


def scored(checkpoint, requests, cache=None, fingerprint="fp-a"):
    engine = Engine(checkpoint.model, EngineSettings(batch_size=4, chunk_size=8))
    return CachedEngine(engine, cache, fingerprint).score(requests), engine


def test_a_crash_loses_at_most_the_batch_in_flight(checkpoint, tmp_path, monkeypatch):
    # Packed rows of 16 positions: about 8 of these requests to a batch of 4 rows, so several batches.
    monkeypatch.setattr(loop, "PACKED_ROW_LENGTH", 16)
    requests = requests_for(checkpoint)
    expected, _ = scored(checkpoint, requests)
    cache = ResponseCache(tmp_path / "r.sqlite")
    real_put, stored = cache.put_pieces, []

    def crash_on_third(namespace, rows):
        if len(stored) == 2:
            raise KeyboardInterrupt  # the process dies while storing batch 3
        rows = list(rows)
        stored.append(len({row[0] for row in rows}))
        real_put(namespace, rows)

    cache.put_pieces = crash_on_third
    with pytest.raises(KeyboardInterrupt):
        scored(checkpoint, requests, cache)
    cache.put_pieces = real_put
    kept = sum(stored)
    assert kept > 0 and cache.count() == kept  # both batches finished before the crash are kept, whole
    recomputed = []
    cache.put_pieces = lambda namespace_, rows: (recomputed.extend(rows := list(rows)), real_put(namespace_, rows))
    resumed, _ = scored(checkpoint, requests, cache)
    # The stored batches are what `expected` computed; the rest ran packed with other neighbours at
    # other offsets in their chunks: our two paths, another order.
    assert_logliks_close(resumed.loglik, expected.loglik, expected.num_tokens)
    np.testing.assert_array_equal(resumed.greedy, expected.greedy)
    distinct = len({(tuple(c), tuple(x)) for c, x in requests})
    assert cache.count() == distinct
    assert len({row[0] for row in recomputed}) == distinct - kept  # only what was not stored is computed again


def test_complete_cache_computes_nothing_and_other_checkpoints_never_hit(checkpoint, tmp_path):
    requests = requests_for(checkpoint, 12)
    cache = ResponseCache(tmp_path / "r.sqlite")
    first, engine = scored(checkpoint, requests, cache)
    assert engine.model_tokens > 0
    again, engine = scored(checkpoint, requests, cache)
    assert engine.model_tokens == 0
    np.testing.assert_array_equal(again.loglik, first.loglik)  # stored and read back: every bit
    _, other = scored(checkpoint, requests, cache, fingerprint="fp-b")
    assert other.model_tokens > 0  # a different checkpoint computes everything


def test_corrupt_cache_is_rebuilt_not_trusted(tmp_path):
    path = tmp_path / "r.sqlite"
    cache = ResponseCache(path)
    cache.put_pieces("ns", [(b"k", 0, -1.0, 1, True, "[]")])
    cache.close()
    with open(path, "r+b") as handle:  # tear the file: overwrite its middle
        handle.seek(100)
        handle.write(b"\xff" * 4000)
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = ResponseCache(path)
    assert rebuilt.count() == 0
    assert list(tmp_path.glob("r.sqlite.corrupt-*"))


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "mlflow_lmeval.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_kill_9_then_the_same_command_resumes_with_identical_results(checkpoint, local_tasks, tmp_path):
    directory, _names = local_tasks
    cache_path = tmp_path / "r.sqlite"
    common = ["evaluate", "--checkpoint", checkpoint.path, "--tasks", "t_rolling,t_nextsentence", "--include_path", directory,
              "--batch_size", 1, "--chunk_size", 4, "--limit", 12, "--bootstrap_iters", 0, "--no_tracking", "--log_samples"]
    victim = cli(*common, "--output_path", tmp_path / "a", "--cache_path", cache_path)
    deadline = time.time() + 240
    count = 0
    while time.time() < deadline and victim.poll() is None:
        time.sleep(0.5)
        if cache_path.exists():
            try:
                with sqlite3.connect(cache_path, timeout=1) as db:
                    count = db.execute("SELECT COUNT(*) FROM pieces").fetchone()[0]
            except sqlite3.Error:
                count = 0
            if count >= 3:
                break
    assert victim.poll() is None, "the evaluation finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed = cli(*common, "--output_path", tmp_path / "a", "--cache_path", cache_path)
    reference = cli(*common, "--output_path", tmp_path / "b", "--no_cache")
    for process in (resumed, reference):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    def flat(resps):
        return [float(r[0]) if not isinstance(r[0], list) else float(r[0][0]) for doc in resps for r in doc]

    def scored_at_most(samples):  # a request scores at most the tokens of its whole text
        return [len(checkpoint.tokenizer.encode("".join(arguments))) for sample in samples for arguments in sample["arguments"]]

    for task in ("t_rolling", "t_nextsentence"):
        got = [json.loads(line) for line in (tmp_path / f"a/samples_{task}.jsonl").read_text().splitlines()]
        want = [json.loads(line) for line in (tmp_path / f"b/samples_{task}.jsonl").read_text().splitlines()]
        assert len(got) == len(want)
        # What was not stored before the kill ran in other rows than in the uncached run: another order.
        assert_logliks_close(flat(s["resps"] for s in got), flat(s["resps"] for s in want), scored_at_most(want))


def test_cache_clear_command(tmp_path):
    path = tmp_path / "r.sqlite"
    cache = ResponseCache(path)
    cache.put_pieces("ns", [(b"k", 0, -1.0, 1, True, "[]"), (b"k", 1, -2.0, 1, False, "[]")])
    cache.close()
    out = subprocess.run([sys.executable, "-m", "mlflow_lmeval.cli", "cache", "clear", "--cache_path", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "removed 2" in out.stdout, out.stderr
    assert ResponseCache(path).count() == 0


def test_generations_are_stored_per_batch_and_reused_only_for_the_same_checkpoint(checkpoint, tmp_path):
    from lm_eval.api.instance import Instance

    from mlflow_lmeval.lm import JaxLM

    cache = ResponseCache(tmp_path / "r.sqlite")
    contexts = ["The king", "A fool", "To be or", "My lord,", "Good night"]
    requests = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6}), i) for i, c in enumerate(contexts)]

    def run(fingerprint):
        lm = JaxLM(checkpoint.model, checkpoint.tokenizer, EngineSettings(batch_size=2), show_progress=False,
                   cache=cache, fingerprint=fingerprint)
        asked, generate = [], lm.engine.generate
        lm.engine.generate = lambda contexts, *args, **kwargs: (asked.extend(contexts), generate(contexts, *args, **kwargs))[1]
        return lm.generate_until(requests), asked

    first, asked = run("fp-a")
    assert len(asked) == len(contexts) and cache.count() == len(contexts)
    again, asked = run("fp-a")
    assert again == first and asked == []  # every generation came from the cache
    _, asked = run("fp-b")
    assert len(asked) == len(contexts)  # another checkpoint computes its own
