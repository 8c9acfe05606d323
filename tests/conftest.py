"""Shared fixtures: a real-looking corpus from the standard library, a tokenizer, tiny models."""

import atexit
import itertools
import os
import shutil
import socket
import tempfile

# Nothing a test does may land in the repository or the user's caches.
_SCRATCH = tempfile.mkdtemp(prefix="mlflow_lmeval_tests_")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SCRATCH}/mlflow.db"
os.environ["MLFLOW_LMEVAL_CACHE"] = f"{_SCRATCH}/cache"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", f"{_SCRATCH}/hf")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DISABLE_MULTIPROC", "1")
# One persistent XLA cache for the whole run, this process and every CLI, pipeline and worker
# process it starts: tests build many engines over the same tiny models, and each new engine (and
# each subprocess) would otherwise compile the same step again. Keyed by XLA on the computation,
# so it never changes a result; it lives and dies with this run's scratch directory.
# Test workers (pytest-xdist) inherit the first process's variable, so they share one cache.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.setdefault("MLFLOW_LMEVAL_TESTS_XLA_CACHE", f"{_SCRATCH}/xla_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlflow_lmeval.models import mlstm

TINY = {"embed_dim": 32, "num_layers": 2, "num_heads": 2}

# ---- Float tolerances ----------------------------------------------------------------------------
# Each float comparison in the suite is one of three kinds, and its comment says which:
# - the same computation (the same jitted program on the same inputs, or a value written and read
#   back): compared exactly, since XLA on a CPU is deterministic;
# - two of our own paths in a different order (chunk sizes, batch sizes, packed or padded rows,
#   another padded length, eager against jitted, another CPU: XLA vectorises each reduction for the
#   ISA it sees, SSE4.2, AVX2 or AVX-512, and that regroups its partial sums);
# - another implementation (transformers' torch model, lm-eval's hf backend).
# The last two are bounded by float32 rounding. One operation rounds within U32 = 2^-24 (6e-8) of
# its result; a sum of n terms, in any order, within n·U32 of the sum of their magnitudes (Higham's
# γ_n), so two evaluations differ by at most 2·n·U32 of it. A logit passes a chain of reductions
# whose γs add: its n is the sum of their lengths (the path lengths below). These worst cases are far
# above the differences seen (1e-6 to 2e-4 on a log-probability, on SSE4.2, AVX2 and AVX-512), yet
# each stays under the error of a real bug on one value (a wrong mask, a lost state: 1e-2 and more);
# a dropped token is also caught exactly, by the token counts the tests compare.
U32 = 2.0**-24


def rounding_bound(length: int, magnitude: float) -> float:
    """Worst case |Δ| between two float32 evaluations, in different orders, of a chain of reductions
    whose lengths add up to ``length``, at values of ``magnitude``."""
    return 2 * length * U32 * magnitude


def logprob_bound(logit_bound: float, vocab_size: int) -> float:
    """|Δ| of a log-probability z_t - logsumexp(z) when every logit is within ``logit_bound``: that
    of z_t, that of the logsumexp (1-Lipschitz), and the logsumexp's own sum of exp(z - max) <= 1."""
    return 2 * logit_bound + rounding_bound(vocab_size, 1.0)


def running_sum_rtol(additions: int) -> float:
    """Relative bound on the rounding of float32 running totals of same-signed terms (a log-likelihood
    added up chunk by chunk) made with ``additions`` additions in all, both sides together. Each
    addition rounds within half an ulp (at most 2·U32 of the partial sum) on its own, a random walk:
    the total's deviation is about sqrt(additions)/3·U32 of the sum (a uniform error within ±ulp/2
    deviates by ulp/sqrt(12); the partial sums' rms is the total/sqrt(3)). Five deviations: one false
    failure in 1.7 million. The worst case, additions·U32, would hide a lost token among 30,000."""
    return 5 * np.sqrt(additions) / 3 * U32


def token_errors_bound(num_tokens, per_token: float):
    """|Δ| bound on sums of ``num_tokens`` (an array) log-probabilities that agree to ``per_token``
    each: n·per_token for a few; over many, each token's error comes from its own roundings, so they
    add as a random walk of deviation sqrt(n/3)·per_token, and five deviations are 3·sqrt(n)·per_token."""
    n = np.asarray(num_tokens, np.float64)
    return np.minimum(n, 3 * np.sqrt(n)) * per_token


# Path lengths of the tiny mLSTMs of the suite (TINY, and mixed_requests.py's: embed 32, inner 64,
# 2 heads of 32, 2 blocks, a vocabulary of at most 512). Per block: LayerNorm 2 x 32, up 32, query,
# key, value and gates 4 x 64, q·k 32, the state's decayed sum over earlier positions 400 (its weights
# add up to 1 / (1 - f) for the slowest forget gate, sigmoid(6) = 0.9975), C·q and n·q 2 x 32, the
# RMS norm 32, down 64: 944. A logit: two blocks, the final LayerNorm 64, the unembedding 32.
MLSTM_LOGIT_PATH = 2 * 944 + 64 + 32
MLSTM_STATE_PATH = 944 + 64 + 32 + 4 * 64 + 400  # the last block's state: one block, then up to its sum
# Logits of the tiny mLSTMs are at most 6.5 in magnitude (measured: 6.5 after the 60 training steps of
# trained_checkpoints, 4.5 at random initialisation), so any two of our paths agree on each
# log-probability within MLSTM_LOGPROB (3.1e-3), and on each state entry within MLSTM_STATE_RTOL
# (2e-4) of the leaf's largest magnitude.
MLSTM_LOGPROB = logprob_bound(rounding_bound(MLSTM_LOGIT_PATH, 6.5), 512)
MLSTM_STATE_RTOL = rounding_bound(MLSTM_STATE_PATH, 1.0)


def assert_within(actual, expected, bound, what="values"):
    """|actual - expected| <= bound elementwise (``bound`` may be an array: one per request or bucket,
    which np.testing.assert_allclose's atol does not take)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    difference, bound = np.abs(actual - expected), np.broadcast_to(bound, expected.shape)
    excess = np.divide(difference, bound, out=np.where(difference == 0, 0.0, np.inf), where=bound > 0)  # 0/0: equal
    assert (excess <= 1).all(), f"{what} apart by up to {excess.max():.3g} times their bound at {np.argmax(excess)}"


def assert_logliks_close(actual, expected, num_tokens, running_additions=0):
    """Two of our paths through a tiny mLSTM (another order: other chunks, rows, batches or windows,
    or the naive full pass) agree on every request's log-likelihood: each of its ``num_tokens`` scored
    tokens within MLSTM_LOGPROB (added up by token_errors_bound), plus the rounding of a padded row's
    float32 running totals, ``running_additions`` additions on both sides (running_sum_rtol). Packed
    rows, fusing and the naive pass sum in float64 on the host, which adds nothing at this scale."""
    bound = token_errors_bound(num_tokens, MLSTM_LOGPROB) + running_sum_rtol(running_additions) * np.abs(expected)
    assert_within(actual, expected, bound, "log-likelihoods")


# The same for tests/fixtures/hf_xlstm (transformers' xLSTM: hidden 64, 2 heads, query/key 32 and
# value 64 per head, FFN 192, 2 blocks, vocabulary 320, sequences of at most 150 tokens). Per block:
# RMS norm 64, query, key, value and gates 4 x 64, q·k 32, the sum over earlier positions 150, C·q and
# n·q 2 x 32, the multi-head LayerNorm 2 x 64, out 128, the FFN's RMS norm 64, up and gate 2 x 64,
# down 192: 1,206. A logit: two blocks, the out norm 64 and the head 64. Its logits are at most 6.4
# (the reference's), so any two evaluations agree within XLSTM_LOGIT (1.9e-3) on each logit and
# XLSTM_LOGPROB (3.9e-3) on each log-probability.
XLSTM_LOGIT_PATH = 2 * 1206 + 64 + 64
XLSTM_STATE_PATH = 1206 + 64 + 4 * 64 + 150
XLSTM_LOGIT = rounding_bound(XLSTM_LOGIT_PATH, 6.4)
XLSTM_LOGPROB = logprob_bound(XLSTM_LOGIT, 320)
XLSTM_STATE_RTOL = rounding_bound(XLSTM_STATE_PATH, 1.0)


def run_in_chunks(model, params, tokens, chunk_size, mask=None, marks=None, state=None):
    """Naive reference: feed ``tokens`` [B, T] through ``model.apply`` chunk by chunk (from
    ``state``, else a fresh one; ``marks``, (starts, branches), go to a packable model)."""
    batch, length = tokens.shape
    mask = np.ones((batch, length), bool) if mask is None else mask
    apply = jax.jit(model.apply)
    state, outputs = model.init_state(batch) if state is None else state, []
    for start in range(0, length, chunk_size):
        stop = start + chunk_size
        extra = {} if marks is None else {"starts": marks[0][:, start:stop], "branches": marks[1][:, start:stop]}
        logits, state = apply(params, tokens[:, start:stop], state, mask[:, start:stop], **extra)
        outputs.append(np.asarray(logits))
    return np.concatenate(outputs, axis=1), state


def check_packed_sequences(model, tokens, chunk_size, logprob_atol, state_rtol):
    """Sequences packed in the two rows of ``tokens`` (at least ``3 * chunk_size + 5`` long) and
    run in chunks of ``chunk_size`` give the logits and end states of each sequence run alone:
    from a fresh state at a start, from its context's end at a branch, and for a row's first one
    from the state the row came in with. Starts and branches fall inside chunks and at their
    edges, each branch in its context's last chunk or, after a context ending at a chunk's end,
    in the next. Packed and alone are two of our paths in another order (other chunks, other
    segment boundaries): callers pass the model's bounds, ``logprob_atol`` on each log-probability
    (MLSTM_LOGPROB, XLSTM_LOGPROB) and ``state_rtol`` on each state entry, relative to the leaf's
    largest magnitude (MLSTM_STATE_RTOL, XLSTM_STATE_RTOL)."""
    assert model.packable
    c = chunk_size
    length = 3 * c + 5
    tokens = tokens[:, :length]
    starts, branches = np.zeros(tokens.shape, bool), np.zeros(tokens.shape, bool)
    branches[0, [5, 6]] = True  # two continuations of the incoming sequence, one a single token
    starts[0, [2 * c - 4, length - 1]] = True  # a context ending at a chunk's end; a last one-token sequence
    branches[0, [2 * c, 2 * c + 5, 3 * c - 1]] = True  # its continuations, the last running on
    starts[1, [0, 2 * c + 1]] = True
    branches[1, [c, c + 3]] = True
    _, incoming = run_in_chunks(model, model.params, tokens[:, :30], 30)
    packed_logits, packed_state = run_in_chunks(model, model.params, tokens, c, marks=(starts, branches), state=incoming)
    for row in range(2):
        bounds = [0, *np.flatnonzero(starts[row] | branches[row]), length]
        state = context = jax.tree.map(lambda leaf, row=row: leaf[row : row + 1], incoming)
        in_branch = False
        for begin, end in itertools.pairwise(bounds):
            if begin == end:
                continue
            if starts[row, begin]:
                state, in_branch = model.init_state(1), False
            elif branches[row, begin]:
                context = context if in_branch else state
                state, in_branch = context, True
            logits, state = run_in_chunks(model, model.params, tokens[row : row + 1, begin:end], c, state=state)
            np.testing.assert_allclose(log_probs(packed_logits[row : row + 1, begin:end]), log_probs(logits), rtol=0, atol=logprob_atol)
        for packed_leaf, leaf in zip(jax.tree.leaves(packed_state), jax.tree.leaves(state), strict=True):
            leaf = np.asarray(leaf)[0]
            np.testing.assert_allclose(np.asarray(packed_leaf)[row], leaf, rtol=0, atol=state_rtol * np.abs(leaf).max())


def log_probs(logits):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "pydoc.txt"
    path.write_text("\n\n".join(topics[name] for name in sorted(topics)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer(corpus_path, tmp_path_factory):
    from mlflow_lmeval.tokenizer import train_tokenizer

    return train_tokenizer(corpus_path, 512, tmp_path_factory.mktemp("tok") / "tok.model")


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    return mlstm.MLSTMConfig(vocab_size=tokenizer.vocab_size, **TINY).validate()


@pytest.fixture(scope="session")
def trained_checkpoints(corpus_path, tokenizer, tiny_config, tmp_path_factory):
    """Checkpoints at steps 20 and 60 of a short real training run, plus the logged losses."""
    from mlflow_lmeval.training import TrainSettings, encode_corpus, train

    losses = {}
    settings = TrainSettings(steps=60, save_steps=(20, 60), batch_size=8, sequence_length=64, log_every=5)
    paths = train(
        encode_corpus(corpus_path, tokenizer), tokenizer, tiny_config, settings,
        tmp_path_factory.mktemp("ckpt"), on_log=lambda step, m: losses.__setitem__(step, m["loss"]),
    )
    return paths, losses


@pytest.fixture(scope="session")
def checkpoint(trained_checkpoints):
    from mlflow_lmeval import load

    return load(trained_checkpoints[0][-1])


@pytest.fixture(scope="session")
def long_documents():
    """Real text of several thousand tokens each (the longest pydoc topics)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics, key=lambda n: -len(topics[n]))[:3]]


def naive_loglikelihood(checkpoint, context, continuation):
    """One request alone, one full forward pass: (sum log p(continuation), all greedy). The float32
    log-probabilities are summed in float64, so the sum adds no rounding of its own."""
    sequence = np.asarray(context + continuation, np.int32)
    logits = checkpoint.logits(sequence[None, :-1])[0]
    scored = log_probs(logits)[len(context) - 1 :]
    targets = sequence[len(context) :]
    loglik = float(scored[np.arange(len(targets)), targets].astype(np.float64).sum())
    greedy = bool(np.all(logits[len(context) - 1 :].argmax(-1) == targets))
    return loglik, greedy


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory):
    """The four local task types, written from held-out pydoc documents."""
    from mlflow_lmeval.pipeline.corpus import pydoc_topics
    from mlflow_lmeval.pipeline.tasks import write_tasks

    directory = tmp_path_factory.mktemp("tasks")
    documents = list(pydoc_topics())[::8]
    names = write_tasks(directory, documents, prefix="t")
    return directory, names


def naive_greedy_decode(checkpoint, context, steps):
    sequence = list(context)
    for _ in range(steps):
        sequence.append(int(checkpoint.logits(np.asarray(sequence, np.int32)[None])[0, -1].argmax()))
    return sequence[len(context) :]


# ---- MLflow --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the schema once
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, template_db):
    """``sqlite:///<tmp>/mlflow.db``, cwd in tmp, no tracking/DVC environment leaking in or out."""
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(template_db, tmp_path / "mlflow.db")
    yield f"sqlite:///{tmp_path}/mlflow.db"
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def dead_uri():
    """An http tracking URI on a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A real `mlflow server` (SQLite store) on 127.0.0.1, stopped by its PID afterwards."""
    import mlflow
    from servers import MlflowServer

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "server").mkdir()
    instance = MlflowServer(tmp_path / "server")
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        mlflow.set_tracking_uri(None)
