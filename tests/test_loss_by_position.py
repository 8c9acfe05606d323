"""Loss by context position: per-bucket sums add up to the request totals, at their absolute positions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_within, logprob_bound, rounding_bound, token_errors_bound
from lm_eval.api.instance import Instance

from mlflow_lmeval.engine import positions
from mlflow_lmeval.engine.cached import CachedEngine
from mlflow_lmeval.engine.loop import Engine, EngineSettings
from mlflow_lmeval.lm import JaxLM
from mlflow_lmeval.models.protocol import LanguageModel
from mlflow_lmeval.response_cache import ResponseCache

VOCAB = 64
# The model below: a logit passes the state's decayed sum (its weights add up to 1 / (1 - 0.9) = 10)
# and the output projection (16), at magnitudes up to 14.1 (measured on 400 random tokens).
LOGPROB = logprob_bound(rounding_bound(10 + 16, 14.1), VOCAB)
# No request here scores more than 250 tokens: two float32 sums of the same log-probabilities in
# other groupings (per bucket or per request, per chunk of 16 or 256) differ by at most SUM_RTOL.
SUM_RTOL = rounding_bound(250, 1.0)


@pytest.fixture(scope="module")
def model():
    """A decaying sum of embeddings as the recurrent state: it compiles in a moment, and a target's
    loss depends on everything before it, so a wrong position or a lost state changes the sums."""
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"embed": jax.random.normal(keys[0], (VOCAB, 16)), "out": jax.random.normal(keys[1], (16, VOCAB))}

    def apply(params, tokens, state, mask):
        def one(state, step):
            token, real = step
            state = jnp.where(real[:, None], 0.9 * state + params["embed"][token], state)
            return state, jnp.tanh(state) @ params["out"]

        state, logits = jax.lax.scan(one, state, (tokens.T, mask.T))
        return logits.transpose(1, 0, 2), state

    return LanguageModel(apply, lambda rows: jnp.zeros((rows, 16)), params, VOCAB, True)


@pytest.fixture(scope="module")
def requests():
    """Contexts and continuations that cross bucket edges, plus three that share a 150-token context
    (run once as a prefix: their pieces start at position 150, not 0). Lengths of 150 to 250 keep
    the step's shapes (so its compilations) few."""
    rng = np.random.default_rng(0)
    shared = list(rng.integers(0, VOCAB, 150))
    contexts = [int(n) for n in rng.integers(1, 100, 8)]
    drawn = [(list(rng.integers(0, VOCAB, n)), list(rng.integers(0, VOCAB, int(rng.integers(150, 250)) - n)))
             for n in contexts]
    return drawn + [(shared, list(rng.integers(0, VOCAB, 5))) for _ in range(3)]


def expected_tokens(requests):
    """int [D, K]: each continuation token counted in the bucket of its index in context + continuation."""
    counts = np.zeros((len(requests), positions.NUM_BUCKETS), np.int64)
    for row, (context, continuation) in enumerate(requests):
        where = np.arange(len(context), len(context) + len(continuation))
        counts[row] = np.bincount(positions.bucket_of(where), minlength=positions.NUM_BUCKETS)
    return counts


@pytest.fixture(scope="module")
def by_chunk(model, requests):
    return {size: Engine(model, EngineSettings(batch_size=4, chunk_size=size)).score(requests) for size in (16, 256)}


def test_bucket_bounds_are_powers_of_two():
    assert [positions.bucket_bounds(k) for k in range(4)] == [(0, 64), (64, 128), (128, 256), (256, 512)]
    np.testing.assert_array_equal(positions.bucket_of(np.array([0, 63, 64, 127, 128, 255, 256, 2**31 - 1])),
                                  [0, 0, 1, 1, 2, 2, 3, positions.NUM_BUCKETS - 1])


def test_buckets_count_every_scored_token_at_its_position_in_the_request(by_chunk, requests):
    for result in by_chunk.values():
        np.testing.assert_array_equal(result.position_tokens, expected_tokens(requests))
        np.testing.assert_array_equal(result.position_tokens.sum(1), result.num_tokens)
        np.testing.assert_allclose(result.position_nll.sum(1), -result.loglik, rtol=SUM_RTOL)


def test_chunk_size_does_not_change_the_buckets(by_chunk):
    small, large = by_chunk[16], by_chunk[256]
    np.testing.assert_array_equal(small.position_tokens, large.position_tokens)
    # Our two paths, another order: each token within LOGPROB, and the sums within SUM_RTOL.
    assert_within(small.position_nll, large.position_nll, token_errors_bound(small.position_tokens, LOGPROB)
                  + SUM_RTOL * np.abs(large.position_nll), "sums by position")


def test_windowed_mode_records_none(model, requests):
    result = Engine(model, EngineSettings(mode="windowed", context_length=64, batch_size=4)).score(requests)
    assert result.num_tokens.sum() > 0 and result.position_tokens.sum() == 0


def test_cached_responses_keep_their_buckets(model, requests, by_chunk, tmp_path):
    cache = ResponseCache(tmp_path / "r.sqlite")
    CachedEngine(Engine(model, EngineSettings(batch_size=4, chunk_size=16)), cache, "fp").score(requests)
    engine = Engine(model, EngineSettings(batch_size=4, chunk_size=16))
    again = CachedEngine(engine, cache, "fp").score(requests)
    assert engine.model_tokens == 0  # every piece came from the cache
    np.testing.assert_array_equal(again.position_tokens, by_chunk[16].position_tokens)
    # The cache holds what the same program computed on the same batches as by_chunk[16], stored as
    # doubles and read back: exact.
    np.testing.assert_array_equal(again.position_nll, by_chunk[16].position_nll)


class Characters:
    """A tokenizer of one token per character (codes 2..63); 0 is BOS, 1 is EOS."""

    vocab_size, bos_id, eos_id, name = VOCAB, 0, 1, "characters"

    def encode(self, text):
        return [2 + ord(c) % (VOCAB - 2) for c in text]

    def decode(self, tokens):
        return "".join(chr(t) for t in tokens)


def lm_requests():
    text = "the quick brown fox jumps over the lazy dog " * 6
    rolling = [Instance("loglikelihood_rolling", {}, (text[: 40 + 37 * i],), i, ("wiki", i, 1)) for i in range(5)]
    choices = [Instance("loglikelihood", {}, (text[: 70 + 11 * i], text[70 + 11 * i : 75 + 13 * i]), i, ("cloze", i, 1))
               for i in range(6)]
    return rolling, choices


@pytest.mark.parametrize("mode", ["recurrent", "windowed"])
def test_each_task_table_weighs_up_to_its_mean_nll(model, mode):
    lm = JaxLM(model, Characters(), EngineSettings(batch_size=4, chunk_size=16, mode=mode, context_length=32),
               show_progress=False)
    rolling, choices = lm_requests()
    lm.loglikelihood_rolling(rolling)
    lm.loglikelihood(choices)
    table = lm.loss_by_position()
    if mode == "windowed":
        assert table["mode"] == "windowed" and table["reason"]
        return
    assert set(table) == {"wiki", "cloze"}
    for task, rows in table.items():
        logliks, counts = zip(*lm.document_scores[task])
        assert sum(r["tokens"] for r in rows) == sum(counts)
        weighted = sum(r["tokens"] * r["mean_nll"] for r in rows) / sum(counts)
        assert weighted == pytest.approx(-sum(logliks) / sum(counts), rel=SUM_RTOL)  # the same log-probabilities
        assert all(r["tokens"] > 0 for r in rows) and [r["start"] for r in rows] == sorted(r["start"] for r in rows)
    assert [r["start"] for r in table["wiki"]] == [0, 64, 128]  # documents of up to 188 characters
    assert table["cloze"][0]["start"] == 64  # every continuation starts after at least 70 characters


def test_publishing_logs_the_curve_with_positions_as_steps_and_its_chart(store, tmp_path):
    from mlflow import MlflowClient

    from mlflow_lmeval.tracking import publish_results

    rows = [{"start": 0, "end": 64, "tokens": 30, "mean_nll": 3.5}, {"start": 128, "end": 256, "tokens": 9, "mean_nll": 2.5}]
    results = {"results": {"wiki": {"alias": "wiki", "word_perplexity,none": 40.0}},
               "checkpoint": {"path": None, "step": 7, "fingerprint": None, "mlflow_run_id": None},
               "eval_config": {"evaluation_tasks": ["wiki"]}, "loss_by_position": {"wiki": rows}}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps(results))
    outcome = publish_results(tmp_path / "out", tracking_uri=store)
    client = MlflowClient(store)
    history = client.get_metric_history(outcome.run_id, "lmeval/wiki/nll_by_position")
    assert sorted((p.step, p.value) for p in history) == [(64, 3.5), (256, 2.5)]
    assert client.get_run(outcome.run_id).data.metrics["lmeval/wiki/word_perplexity"] == 40.0
    assert "loss_by_position.png" in {a.path for a in client.list_artifacts(outcome.run_id)}


def test_report_stage_tables_and_draws_every_checkpoint(tmp_path, monkeypatch):
    from mlflow_lmeval.pipeline import stages

    monkeypatch.chdir(tmp_path)
    for step, nll in ((12, 3.0), (6, 4.0)):
        rows = [{"start": 0, "end": 64, "tokens": 5, "mean_nll": nll}, {"start": 64, "end": 128, "tokens": 2, "mean_nll": nll - 1}]
        (tmp_path / "results" / f"step_{step}").mkdir(parents=True)
        (tmp_path / "results" / f"step_{step}" / "results.json").write_text(json.dumps(
            {"results": {"wiki": {"bits_per_byte,none": 1.0}}, "checkpoint": {"step": step}, "loss_by_position": {"wiki": rows}}))
    (tmp_path / "results" / "windowed").mkdir()
    (tmp_path / "results" / "windowed" / "results.json").write_text(json.dumps(
        {"results": {"wiki": {}}, "checkpoint": {"step": 20}, "loss_by_position": {"mode": "windowed", "reason": "."}}))
    (tmp_path / "reports").mkdir()
    collected = stages.collect_results(tmp_path / "results")
    assert [row["step"] for row in collected] == [6, 12, 20]
    table, chart = stages.write_loss_by_position(collected, tmp_path / "results")
    lines = table.read_text().splitlines()
    assert lines[0] == "checkpoint,step,task,start,end,tokens,mean_nll"
    assert lines[1:] == ["step_6,6,wiki,0,64,5,4.0", "step_6,6,wiki,64,128,2,3.0",
                         "step_12,12,wiki,0,64,5,3.0", "step_12,12,wiki,64,128,2,2.0"]
    assert chart.stat().st_size > 0


def test_a_cache_written_without_buckets_is_set_aside_not_served(tmp_path):
    import sqlite3

    path = tmp_path / "r.sqlite"
    with sqlite3.connect(path) as db:  # the schema-1 layout: pieces without their loss by position
        db.executescript("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES ('schema', '1');"
                         "CREATE TABLE pieces (namespace TEXT, key BLOB, sequence_idx INTEGER, loglik REAL,"
                         " num_tokens INTEGER, greedy INTEGER, PRIMARY KEY (key, sequence_idx));"
                         "INSERT INTO pieces VALUES ('ns', x'00', 0, -1.0, 1, 1);")
    with pytest.warns(UserWarning, match="written with schema 1"):
        cache = ResponseCache(path)
    assert cache.count() == 0 and list(tmp_path.glob("r.sqlite.corrupt-*"))
