"""The engine: chunked == fixed-context == batched == naive, windows follow lm-eval, few traces."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    MLSTM_LOGPROB,
    assert_logliks_close,
    assert_within,
    log_probs,
    logprob_bound,
    naive_greedy_decode,
    naive_loglikelihood,
    rounding_bound,
    running_sum_rtol,
    token_errors_bound,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mlflow_lmeval import from_linen_cache
from mlflow_lmeval.engine import loop
from mlflow_lmeval.engine.batching import plan_groups, plan_streams
from mlflow_lmeval.engine.loop import Engine, EngineSettings
from mlflow_lmeval.engine.requests import make_pieces, piece_counts


@pytest.fixture(scope="module")
def requests(checkpoint, long_documents):
    """Three documents of thousands of tokens (rolling shape) and short context/continuation pairs."""
    tok = checkpoint.tokenizer
    rolling = [([tok.bos_id], tok.encode(text)) for text in long_documents]
    words = long_documents[0].split()
    pairs = [(tok.encode(" ".join(words[i : i + 5 + i % 40])), tok.encode(" " + words[i + 5 + i % 40])) for i in range(0, 600, 37)]
    assert min(len(c) for _, c in rolling) > 2000
    return rolling + pairs


def score(checkpoint, requests, **settings):
    return Engine(checkpoint.model, EngineSettings(**settings)).score(requests)


@pytest.fixture(scope="module")
def reference(checkpoint, requests):
    return score(checkpoint, requests, chunk_size=64, batch_size=8)


@pytest.mark.parametrize("chunk_size", [1, 7])
def test_chunk_sizes_agree(checkpoint, requests, reference, chunk_size):
    result = score(checkpoint, requests, chunk_size=chunk_size, batch_size=8)
    assert_logliks_close(result.loglik, reference.loglik, reference.num_tokens)
    # Exact: a flag flips only where two logits are within the rounding of each other, none here.
    np.testing.assert_array_equal(result.greedy, reference.greedy)
    np.testing.assert_array_equal(result.num_tokens, reference.num_tokens)


def test_fixed_context_equals_recurrent_when_everything_fits(checkpoint, requests, reference):
    longest = max(len(c) + len(x) for c, x in requests)
    result = score(checkpoint, requests, mode="windowed", context_length=longest, batch_size=8)
    assert_logliks_close(result.loglik, reference.loglik, reference.num_tokens)
    np.testing.assert_array_equal(result.greedy, reference.greedy)


def test_a_partial_batch_runs_fewer_rows_with_the_same_results(checkpoint, requests, reference, monkeypatch):
    """Two long documents in a batch of 8 run as 2 rows, then 1 once the shorter one has ended,
    each at the width that keeps rows x width at 8 x 64."""
    two = requests[:2]
    bucketed = Engine(checkpoint.model, EngineSettings(batch_size=8, chunk_size=64))
    result = bucketed.score(two)
    monkeypatch.setattr(loop, "ROW_BUCKET_MIN_LENGTH", 10**9)  # no row buckets: all 8 rows every chunk
    full = Engine(checkpoint.model, EngineSettings(batch_size=8, chunk_size=64))
    expected = full.score(two)
    for other in (expected, reference):  # other row counts and widths, other packing: another order
        assert_logliks_close(result.loglik, other.loglik[:2], other.num_tokens[:2])
        np.testing.assert_array_equal(result.greedy, other.greedy[:2])
        np.testing.assert_array_equal(result.num_tokens, other.num_tokens[:2])
    assert full.computed_tokens % 8 == 0
    padded = full.computed_tokens // 8
    shorter = min(len(c) + len(x) - 1 for c, x in two)
    # At most one chunk of 8 x 64 cells of padding where 2 rows become 1, and one at the end.
    assert bucketed.computed_tokens <= 2 * shorter + (padded - shorter) + 2 * 8 * 64, (bucketed.computed_tokens, padded)
    assert bucketed.traces == 2  # one step shape per row count: 2 rows x 256, then 1 row x 512


def test_packed_rows_equal_padded_rows(checkpoint, requests):
    """A packable model's requests run end to end in rows, with the results of one padded row each
    and fewer positions computed."""
    settings = EngineSettings(batch_size=8, chunk_size=64, share_prefixes=False)
    padded_engine = Engine(dataclasses.replace(checkpoint.model, packable=False), settings)
    packed_engine = Engine(checkpoint.model, settings)
    padded, packed = padded_engine.score(requests), packed_engine.score(requests)
    # A padded row adds its float32 totals once per chunk of 64 (the sums by position too).
    additions = -(-max(padded.num_tokens) // 64)
    assert_logliks_close(packed.loglik, padded.loglik, padded.num_tokens, additions)
    assert_within(packed.position_nll, padded.position_nll, token_errors_bound(padded.position_tokens, MLSTM_LOGPROB)
                  + running_sum_rtol(additions) * np.abs(padded.position_nll), "sums by position")
    for field in ("greedy", "num_tokens", "position_tokens"):
        np.testing.assert_array_equal(getattr(packed, field), getattr(padded, field))
    assert packed_engine.model_tokens == padded_engine.model_tokens
    assert packed_engine.computed_tokens < padded_engine.computed_tokens, (packed_engine.computed_tokens, padded_engine.computed_tokens)


def row_spans(plan, lengths):
    """Per row, its placements as (piece, start, end, branch), checked not to overlap."""
    rows = []
    for stream in plan.streams:
        spans = sorted((start, start + int(lengths[index]), index, branch) for index, start, branch in stream)
        assert all(end <= next_start for (_, end, _, _), (next_start, _, _, _) in itertools.pairwise(spans))
        rows.append([(index, start, end, branch) for start, end, index, branch in spans])
    return rows


def test_stream_plans_hold_every_piece_once_in_balanced_rows():
    lengths = np.random.default_rng(0).integers(1, 300, 500)
    lengths[:2] = 5000  # longer than a row: each opens a batch of its own length
    plans = plan_streams(lengths, range(len(lengths)), 8, 64, 2048)
    placed = [index for plan in plans for stream in plan.streams for index, _, _ in stream]
    assert sorted(placed) == list(range(len(lengths)))
    for plan in plans:
        ends = [row[-1][2] for row in row_spans(plan, lengths)]
        assert plan.length % 64 == 0 and max(ends) <= plan.length < max(ends) + 64
        assert max(ends) <= max(2048, *(lengths[index] for stream in plan.streams for index, _, _ in stream))
    full = [plan for plan in plans[:-1] if len(plan.streams) == 8]
    assert full and all(sum(lengths[i] for s in p.streams for i, _, _ in s) > 0.9 * 8 * p.length for p in full)


def test_group_plans_begin_every_continuation_in_its_contexts_last_chunk():
    rng = np.random.default_rng(1)
    groups, lengths = [], []
    for _ in range(40):
        prefix = len(lengths)
        lengths.append(int(rng.integers(1, 150)))
        continuations = list(range(len(lengths), len(lengths) + 4))
        lengths.extend(int(n) for n in rng.integers(1, 40, 4))  # 4 x up to 40: some groups split
        groups.append((prefix, continuations))
    lengths = np.array(lengths)
    plans = plan_groups(lengths, groups, 8, 64, 512)
    branched = []
    for plan in plans:
        for row in row_spans(plan, lengths):
            for index, start, end, branch in row:
                if not branch:  # a prefix: its continuations begin in its last chunk, or the next at a chunk's end
                    prefix, prefix_end = index, end
                    assert prefix in {p for p, _ in groups}
                else:
                    last_chunk = (prefix_end - 1) // 64
                    assert start // 64 == last_chunk or (prefix_end % 64 == 0 and start // 64 == last_chunk + 1)
                    assert any(p == prefix and index in c for p, c in groups)
                    branched.append(index)
    assert sorted(branched) == sorted(i for _, c in groups for i in c)


@pytest.mark.parametrize("packable", [True, False])
def test_nan_is_blamed_on_the_request_that_made_it(checkpoint, packable):
    """In a packed row a NaN reaches every request of its chunk; the error still names its own."""
    model = checkpoint.model
    params = {**model.params, "embed": {"embedding": model.params["embed"]["embedding"].at[7].set(jnp.nan)}}
    poisoned = dataclasses.replace(model, params=params, packable=packable)
    clean = [[8 + i % 50 for i in range(start, start + 20)] for start in range(3)]
    requests = [(clean[0], clean[1]), (clean[2][:2], [7, 9]), (clean[1][:4], clean[2][:4])]
    with pytest.raises(loop.NonFiniteLogits, match="for request 2$"):
        Engine(poisoned, EngineSettings(batch_size=1, chunk_size=64)).score(requests)


def test_progress_ends_at_its_total_when_a_shared_context_runs_twice(checkpoint):
    context = [8 + i % 50 for i in range(30)]
    requests = [(context, [9 + i] * 20) for i in range(6)]  # 6 x 20 tokens: more than a chunk, the group splits
    calls = []
    engine = Engine(checkpoint.model, EngineSettings(batch_size=2, chunk_size=16), progress=lambda *c: calls.append(c))
    engine.score(requests)
    assert calls and all(done <= total for done, total in calls) and calls[-1][0] == calls[-1][1], calls


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_sizes_agree(checkpoint, requests, reference, batch_size):
    result = score(checkpoint, requests, batch_size=batch_size)
    assert_logliks_close(result.loglik, reference.loglik, reference.num_tokens)
    np.testing.assert_array_equal(result.greedy, reference.greedy)


def test_every_request_equals_a_naive_full_pass(checkpoint, requests, reference):
    for (context, continuation), loglik, greedy, count in zip(requests, reference.loglik, reference.greedy, reference.num_tokens):
        expected_loglik, expected_greedy = naive_loglikelihood(checkpoint, context, continuation)
        assert_logliks_close(loglik, expected_loglik, count)
        assert greedy == expected_greedy and count == len(continuation)


def test_fixed_context_windows_follow_lm_eval(checkpoint, requests):
    """Rolling requests cut into windows equal lm-eval's own rolling windows, scored naively."""
    window = 96
    rolling = requests[:3]
    result = score(checkpoint, rolling, mode="windowed", context_length=window, batch_size=4)
    for (prefix, tokens), loglik in zip(rolling, result.loglik):
        expected = 0.0
        for context, continuation in map(make_disjoint_window, get_rolling_token_windows(tokens, prefix[0], window, 1)):
            inputs = (context + continuation)[-(window + 1) :]
            assert len(inputs) - 1 <= window
            expected += naive_loglikelihood(checkpoint, inputs[: len(inputs) - len(continuation)], continuation)[0]
        assert_logliks_close(loglik, expected, len(tokens))


def test_long_continuation_in_fixed_context_scores_only_the_continuation(checkpoint, requests):
    """A loglikelihood request longer than the window is windowed; its context is never scored."""
    context, continuation = requests[0][1][:300], requests[0][1][300:700]
    result = score(checkpoint, [(context, continuation)], mode="windowed", context_length=128, batch_size=2)
    assert result.num_tokens[0] == len(continuation)
    sequence = context + continuation
    expected = 0.0
    for start in range(len(context), len(sequence), 128):
        end = min(start + 128, len(sequence))
        inputs = sequence[max(0, end - 129) : end]
        expected += naive_loglikelihood(checkpoint, inputs[: len(inputs) - (end - start)], inputs[len(inputs) - (end - start) :])[0]
    assert_logliks_close(result.loglik[0], expected, len(continuation))


@pytest.mark.parametrize("max_length", [None, 1, 5, 64])
def test_piece_counts_are_the_pieces_make_pieces_cuts(max_length):
    """The response cache looks pieces up by these counts before any piece is built."""
    requests = [([1] * n, [2] * m) for n, m in [(1, 1), (3, 4), (1, 5), (7, 6), (2, 64), (5, 65), (1, 200)]]
    cut = np.bincount([p.document_idx - 1 for p in make_pieces(requests, max_length)], minlength=len(requests))
    np.testing.assert_array_equal(piece_counts(requests, max_length), cut)


class Bigram(nn.Module):
    """A stateless causal model: each position sees only its own token."""

    vocab: int

    @nn.compact
    def __call__(self, tokens, mask):
        return nn.Dense(self.vocab)(nn.tanh(nn.Embed(self.vocab, 16)(tokens)))


# A bigram logit is one reduction of 16 (its logits are below 0.84, measured), over a vocabulary of 64.
BIGRAM_LOGPROB = logprob_bound(rounding_bound(16, 0.84), 64)


@pytest.fixture(scope="module")
def stateless():
    module = Bigram(64)
    params = module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), mask=jnp.ones((1, 4), bool))["params"]
    return from_linen_cache(module, params, vocab_size=64, context_length=32)


def mixed_requests(count, seed):
    """Every other request is short (one bucket), the rest up to 140 tokens (all buckets)."""
    rng = np.random.default_rng(seed)
    return [
        (list(rng.integers(0, 64, rng.integers(1, 6 if i % 2 else 80))), list(rng.integers(0, 64, rng.integers(1, 6 if i % 2 else 60))))
        for i in range(count)
    ]


def test_stateless_model_windows_equal_naive(stateless):
    requests = mixed_requests(40, 0)
    result = Engine(stateless, EngineSettings(batch_size=8)).score(requests)
    apply = jax.jit(lambda tokens: stateless.apply(stateless.params, tokens, None, jnp.ones(tokens.shape, bool))[0])
    for (context, continuation), loglik in zip(requests, result.loglik):
        sequence = context + continuation
        expected = 0.0
        for start in range(len(context), len(sequence), 32):
            end = min(start + 32, len(sequence))
            inputs = np.asarray(sequence[max(0, end - 33) : end - 1])[None]
            targets = np.asarray(sequence[end - (end - start) : end])
            scores = log_probs(apply(inputs))[0][-(end - start) :]
            expected += scores[np.arange(len(targets)), targets].astype(np.float64).sum()
        # Our two paths, another order (other window shapes): each token within the bigram's bound,
        # and the engine's float32 sum over a window's <= 32 tokens (fused in float64).
        assert loglik == pytest.approx(expected, rel=rounding_bound(32, 1.0), abs=len(continuation) * BIGRAM_LOGPROB)


@pytest.mark.parametrize("model_kind", ["recurrent", "stateless"])
def test_traces_do_not_grow_with_requests(checkpoint, stateless, model_kind):
    model = checkpoint.model if model_kind == "recurrent" else stateless
    counts = []
    for count in (100, 500):
        requests = [([c % 64 for c in ctx], [c % 64 for c in cont]) for ctx, cont in mixed_requests(count, count)]
        engine = Engine(model, EngineSettings(batch_size=8, chunk_size=16, mode="recurrent"))
        engine.score(requests)
        counts.append(engine.traces)
    # one step shape for the recurrent loop; one per power-of-two bucket (16, 32) for windows
    assert counts[0] == counts[1] == (1 if model_kind == "recurrent" else 2), counts


def test_generate_equals_naive_argmax_decode(checkpoint, requests):
    contexts = [c for c, _ in requests[3:8]] + [requests[0][1][:50]]
    engine = Engine(checkpoint.model, EngineSettings(batch_size=4, chunk_size=16, generation_block=5))
    generated = engine.generate(contexts, 12, lambda tokens: False)
    for context, tokens in zip(contexts, generated):
        assert tokens == naive_greedy_decode(checkpoint, context, 12)


def test_generate_stops_when_finished(checkpoint, requests):
    context = requests[4][0]
    full = naive_greedy_decode(checkpoint, context, 12)
    engine = Engine(checkpoint.model, EngineSettings(batch_size=2, generation_block=4))
    (tokens,) = engine.generate([context], 12, lambda tokens: len(tokens) >= 3 and tokens[2] == full[2])
    assert tokens == full[:3]


def test_stateless_generate_equals_naive(stateless):
    contexts = [ctx for ctx, _ in mixed_requests(5, 3)]
    generated = Engine(stateless, EngineSettings(batch_size=4)).generate(contexts, 6, lambda t: False)
    for context, tokens in zip(contexts, generated):
        sequence = list(context)
        for _ in range(6):
            window = np.asarray(sequence[-32:])[None]
            sequence.append(int(np.asarray(stateless.apply(stateless.params, window, None, np.ones(window.shape, bool))[0])[0, -1].argmax()))
        assert tokens == sequence[len(context) :]


@pytest.mark.parametrize("packable", [True, False])
def test_shared_contexts_run_once_and_give_the_same_results(checkpoint, long_documents, packable):
    """Several continuations of one context (multiple choice, few-shot) branch one context state:
    in packed rows after the context (packable), or from a table of context states."""
    tok = checkpoint.tokenizer
    words = long_documents[1].split()
    requests = []
    for start in range(0, 400, 50):
        context = tok.encode(" ".join(words[start : start + 40]))
        for choice in range(4):
            requests.append((context, tok.encode(" " + " ".join(words[start + 40 + 7 * choice : start + 43 + 7 * choice]))))
    requests.append(([tok.bos_id], tok.encode(long_documents[2][:2000])))  # an unshared one among them
    results = {}
    for share in (False, True):
        model = dataclasses.replace(checkpoint.model, packable=packable)
        # Chunks of 32: a context spans two, and its 4 short continuations fit in one.
        engine = Engine(model, EngineSettings(batch_size=4, chunk_size=32, share_prefixes=share, prefix_block=3))
        results[share] = (engine.score(requests), engine.model_tokens)
    (plain, plain_tokens), (shared, shared_tokens) = results[False], results[True]
    # Another order (a branched context state, other rows); padded rows add once per chunk of 32.
    assert_logliks_close(shared.loglik, plain.loglik, plain.num_tokens, 0 if packable else 2 * -(-max(plain.num_tokens) // 32))
    np.testing.assert_array_equal(shared.greedy, plain.greedy)
    np.testing.assert_array_equal(shared.num_tokens, plain.num_tokens)
    assert plain_tokens / shared_tokens > 1.5
    for (context, continuation), loglik in list(zip(requests, shared.loglik))[:8]:
        assert_logliks_close(loglik, naive_loglikelihood(checkpoint, context, continuation)[0], len(continuation))


def test_worker_processes_give_the_same_results(checkpoint, requests, reference):
    """worker_count > 0 materializes batches in grain worker processes."""
    result = score(checkpoint, requests[3:], chunk_size=64, batch_size=8, worker_count=1, worker_buffer_size=2)
    # The same batches through the same jitted step as in this process: bit-identical.
    in_process = score(checkpoint, requests[3:], chunk_size=64, batch_size=8)
    np.testing.assert_array_equal(result.loglik, in_process.loglik)
    np.testing.assert_array_equal(result.greedy, in_process.greedy)
    assert_logliks_close(result.loglik, reference.loglik[3:], reference.num_tokens[3:])  # other packing
