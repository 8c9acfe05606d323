"""mlflow_lmeval.stats and .bootstrap: bootstrap stderrs agree with lm-eval and with plain references."""

import math

import numpy as np
import pytest

from mlflow_lmeval import bootstrap, stats

# Float tolerances here are float64 (2^-53 = 1.1e-16 per rounding), of two kinds:
# - two formulas of one statistic on the same numbers (ours and lm-eval's, vectorised and looped):
#   sums of at most a few thousand terms round within n·2^-53 < 1e-12 relative, so rel=1e-12 (1e-9
#   where an exp, a square root or a bootstrap over many replicates compounds that); an
#   approx() without a tolerance is pytest's 1e-6, far above either;
# - Monte Carlo against its expectation: a bound from the sampling distribution, said at the check.


@pytest.fixture
def no_pool(monkeypatch):
    """lm-eval's bootstrap_stderr forks a multiprocessing pool unless this is set."""
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")


def _logliks(n, seed=0):
    return np.random.default_rng(seed).normal(-2.0, 0.8, size=n)


def _loglik_weight_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.integers(20, 400, size=n).astype(float)  # words / bytes per doc
    loglik = -weight * rng.gamma(4.0, 0.4, size=n)  # per-doc rate varies
    return np.stack([loglik, weight], axis=1)


def _labels(n, k, seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, k, size=n)
    noisy = rng.integers(0, k, size=n)
    pred = np.where(rng.random(n) < 0.6, gold, noisy)
    return np.stack([gold, pred], axis=1)


def _relative(a, b):
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------
# Agreement with lm-eval's own bootstrap (pool disabled)
# --------------------------------------------------------------------------


def test_perplexity_and_median_match_lm_eval(no_pool):
    from lm_eval.api import metrics as lm

    items = list(_logliks(500))
    # 20k lm-eval replicates: Monte Carlo error ~1% on each side, well inside 5%.
    ours_ppl = stats.stderr_for("perplexity", items, iters=100_000, seed=7)
    theirs_ppl = lm.stderr_for_metric(lm.perplexity, 20_000)(items)
    assert _relative(ours_ppl, theirs_ppl) < 0.05, (ours_ppl, theirs_ppl)

    ours_median = stats.stderr_for("median", items, iters=100_000, seed=7)
    theirs_median = lm.stderr_for_metric(lm.median, 20_000)(items)
    assert _relative(ours_median, theirs_median) < 0.05, (ours_median, theirs_median)


def test_ratio_estimators_match_lm_eval_bootstrap(no_pool):
    from lm_eval.api import metrics as lm

    pairs = _loglik_weight_pairs(200)
    items = [tuple(p) for p in pairs]
    for ours_agg, theirs_agg in [
        (stats.word_perplexity, lm.weighted_perplexity),
        (stats.bits_per_byte, lm.bits_per_byte),
    ]:
        ours = bootstrap.bootstrap_stderr(ours_agg, pairs, 50_000, seed=3)
        theirs = lm.bootstrap_stderr(theirs_agg, items, 8_000)
        assert _relative(ours, theirs) < 0.05, (ours_agg.__name__, ours, theirs)


def test_closed_form_mean_matches_lm_eval():
    from lm_eval.api import metrics as lm

    acc = list(np.random.default_rng(1).integers(0, 2, size=321).astype(float))
    assert stats.stderr_for("acc", acc) == pytest.approx(lm.mean_stderr(acc), rel=1e-12)
    assert stats.mean_stderr(acc) == pytest.approx(lm.mean_stderr(acc), rel=1e-12)


# --------------------------------------------------------------------------
# Ratio estimators against a plain bootstrap loop
# --------------------------------------------------------------------------


def _reference_bootstrap(stat, samples, iters, seed):
    rng = np.random.default_rng(seed)
    n = len(samples)
    reps = [stat(samples[rng.integers(0, n, size=n)]) for _ in range(iters)]
    return float(np.std(reps, ddof=1))


@pytest.mark.parametrize(
    "name, stat",
    [
        ("word_perplexity", lambda s: math.exp(-s[:, 0].sum() / s[:, 1].sum())),
        ("byte_perplexity", lambda s: math.exp(-s[:, 0].sum() / s[:, 1].sum())),
        ("bits_per_byte", lambda s: -s[:, 0].sum() / s[:, 1].sum() / math.log(2)),
    ],
)
def test_ratio_estimators_match_plain_loop(name, stat):
    pairs = _loglik_weight_pairs(300, seed=5)
    ours = stats.stderr_for(name, pairs, iters=100_000, seed=11)
    # 10k reference replicates: relative MC error ~0.7%; 5% is > 5 sigma.
    reference = _reference_bootstrap(stat, pairs, 10_000, seed=12)
    assert math.isfinite(ours) and ours > 0
    assert _relative(ours, reference) < 0.05, (name, ours, reference)


def test_token_perplexity():
    pairs = _loglik_weight_pairs(400, seed=8)
    out = stats.token_perplexity(pairs[:, 0], pairs[:, 1], iters=20_000, seed=4)
    mean_ll = pairs[:, 0].sum() / pairs[:, 1].sum()
    assert out["mean_token_loglik"] == pytest.approx(mean_ll, rel=1e-12)
    assert out["token_perplexity"] == pytest.approx(math.exp(-mean_ll), rel=1e-12)
    same_draws = bootstrap.bootstrap_stderr(stats.weighted_perplexity, pairs, 20_000, seed=4)
    assert out["token_perplexity_stderr"] == pytest.approx(same_draws, rel=1e-9)
    reference = _reference_bootstrap(lambda s: s[:, 0].sum() / s[:, 1].sum(), pairs, 5_000, 9)
    assert _relative(out["mean_token_loglik_stderr"], reference) < 0.06
    single = stats.token_perplexity([-3.0], [2.0])
    assert single["token_perplexity_stderr"] is None


# --------------------------------------------------------------------------
# f1 / mcc aggregates
# --------------------------------------------------------------------------


def _f1_reference(golds, preds):
    tp = sum(1 for g, p in zip(golds, preds) if g == 1 and p == 1)
    fp = sum(1 for g, p in zip(golds, preds) if g != 1 and p == 1)
    fn = sum(1 for g, p in zip(golds, preds) if g == 1 and p != 1)
    return 0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _mcc_reference(golds, preds):
    labels = sorted(set(golds) | set(preds))
    c = {(a, b): 0 for a in labels for b in labels}
    for g, p in zip(golds, preds):
        c[g, p] += 1
    t = {a: sum(c[a, b] for b in labels) for a in labels}
    q = {b: sum(c[a, b] for a in labels) for b in labels}
    n = len(golds)
    correct = sum(c[a, a] for a in labels)
    cov_tp = correct * n - sum(t[a] * q[a] for a in labels)
    cov_pp = n * n - sum(q[a] ** 2 for a in labels)
    cov_tt = n * n - sum(t[a] ** 2 for a in labels)
    return 0.0 if cov_pp * cov_tt == 0 else cov_tp / math.sqrt(cov_pp * cov_tt)


def _classification_batches():
    batches = [np.stack([_labels(97, k, seed=s) for s in range(6)]) for k in (2, 3, 5)]
    degenerate = np.array(
        [
            [[0, 0]] * 10,  # no positives anywhere: f1 = 0, mcc = 0
            [[1, 1]] * 10,  # one class: mcc = 0
            [[1, 0]] * 5 + [[0, 1]] * 5,  # always wrong
            [[0, 0]] * 5 + [[1, 1]] * 5,  # always right
        ]
    )
    return batches + [degenerate]


def test_f1_and_mcc_match_plain_python():
    for batch in _classification_batches():
        got_f1, got_mcc = stats.f1(batch), stats.mcc(batch)
        assert got_f1.shape == got_mcc.shape == (len(batch),)
        for i, resample in enumerate(batch):
            golds, preds = resample[:, 0].tolist(), resample[:, 1].tolist()
            if set(golds) | set(preds) <= {0, 1}:
                assert abs(got_f1[i] - _f1_reference(golds, preds)) < 1e-12
            assert abs(got_mcc[i] - _mcc_reference(golds, preds)) < 1e-12


def test_f1_and_mcc_match_lm_eval_aggregations():
    pytest.importorskip("sklearn")
    from lm_eval.api import metrics as lm

    for batch in _classification_batches():
        for resample in batch:
            items = [tuple(r) for r in resample.tolist()]
            got_mcc = stats.mcc(resample[None])[0]
            assert abs(got_mcc - lm.matthews_corrcoef(items)) < 1e-12
            if set(resample.ravel().tolist()) <= {0, 1}:
                got_f1 = stats.f1(resample[None])[0]
                assert abs(got_f1 - lm.f1_score(items)) < 1e-12


def test_f1_and_mcc_bootstrap_agree_with_plain_loop():
    binary, multi = _labels(250, 2, seed=1), _labels(250, 4, seed=2)
    f1_ref = _reference_bootstrap(lambda s: _f1_reference(*s.T.tolist()), binary, 4_000, 1)
    mcc_ref = _reference_bootstrap(lambda s: _mcc_reference(*s.T.tolist()), multi, 4_000, 1)
    assert _relative(stats.stderr_for("f1", binary, 50_000), f1_ref) < 0.07
    assert _relative(stats.stderr_for("matthews_corrcoef", multi, 50_000), mcc_ref) < 0.07


# --------------------------------------------------------------------------
# Sampling schemes: determinism, chunking, threads, exactness
# --------------------------------------------------------------------------


def _generic(agg):
    """Same aggregate without the fast-path hints: forces explicit resamples."""
    return lambda x: agg(x)


CASES = [
    ("perplexity lanes", stats.perplexity, _logliks(1000)),
    ("word_perplexity lanes", stats.word_perplexity, _loglik_weight_pairs(999)),
    ("explicit resamples", _generic(stats.perplexity), _logliks(1000)),
    ("median order statistic", stats.median, _logliks(1001)),
    ("f1 multinomial", stats.f1, _labels(500, 2, seed=3)),
    ("perplexity 32-bit lanes", stats.perplexity, _logliks(40_000)),
]


@pytest.mark.parametrize("name, agg, samples", CASES, ids=[c[0] for c in CASES])
def test_deterministic_and_chunking_invariant(name, agg, samples):
    iters = 300
    base = bootstrap.bootstrap_replicates(agg, samples, iters, seed=5, chunk_size=64, workers=1)
    assert base.shape == (iters,) and np.isfinite(base).all()
    again = bootstrap.bootstrap_replicates(agg, samples, iters, seed=5, chunk_size=64, workers=1)
    np.testing.assert_array_equal(base, again)
    for chunk, workers in [(1, 1), (7, 3), (1000, 2), (None, None)]:
        other = bootstrap.bootstrap_replicates(agg, samples, iters, 5, chunk, workers)
        np.testing.assert_allclose(other, base, rtol=1e-12)
    assert bootstrap.bootstrap_stderr(agg, samples, iters, seed=5) == pytest.approx(
        float(np.std(base, ddof=1)), rel=1e-12
    )
    changed = bootstrap.bootstrap_replicates(agg, samples, iters, seed=6)
    assert not np.allclose(changed, base)


@pytest.mark.parametrize("n", [5, 3000, 21846, 40_000])
@pytest.mark.parametrize("tail", ["default", "starved"])
def test_lane_sums_equal_explicit_resamples(n, tail, monkeypatch):
    # 21846 rejects a third of 16-bit lanes; "starved" leaves no spare lanes,
    # so every rejected draw goes through the per-replicate fallback stream.
    monkeypatch.setattr(bootstrap, "_FEW_ROWS", 0)  # tiny n would go multinomial
    if tail == "starved":
        monkeypatch.setattr(bootstrap, "_tail_lanes", lambda n, reject: 0)
    pairs = _loglik_weight_pairs(n, seed=n)
    for agg in (stats.word_perplexity, stats.bits_per_byte):
        fast = bootstrap.bootstrap_replicates(agg, pairs, 40, seed=2, chunk_size=16)
        slow = bootstrap.bootstrap_replicates(_generic(agg), pairs, 40, seed=2, chunk_size=16)
        np.testing.assert_allclose(fast, slow, rtol=1e-12)
    logliks = _logliks(n, seed=n)
    fast = bootstrap.bootstrap_replicates(stats.perplexity, logliks, 40, seed=2)
    slow = bootstrap.bootstrap_replicates(_generic(stats.perplexity), logliks, 40, seed=2)
    np.testing.assert_allclose(fast, slow, rtol=1e-12)


@pytest.mark.parametrize("tail", ["default", "starved"])
def test_lane_indices_are_uniform(tail, monkeypatch):
    if tail == "starved":
        monkeypatch.setattr(bootstrap, "_tail_lanes", lambda n, reject: 0)
    n, rows = 21846, 300
    lanes = bootstrap.Lanes(n, seed=9)
    idx = lanes.indices(lanes.draw(0, rows), 0)
    assert idx.min() >= 0 and idx.max() < n
    counts = np.bincount(idx.ravel(), minlength=n)
    expected = rows  # each replicate draws n documents
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert abs(chi2 - (n - 1)) < 6 * math.sqrt(2 * (n - 1)), chi2


def test_median_order_statistic_matches_explicit_resamples():
    samples = np.array([3.0, -1.0, 2.0, 2.0, 7.0, 0.5])  # ties and an even count
    fast = bootstrap.bootstrap_replicates(stats.median, samples, 200_000, seed=1)
    slow = bootstrap.bootstrap_replicates(_generic(stats.median), samples, 200_000, seed=1)
    values = np.unique(samples)
    p_fast = (fast[:, None] == values).mean(axis=0)
    p_slow = (slow[:, None] == values).mean(axis=0)
    # Two runs of 200,000 resamples (the same seed, other code paths): each frequency p has a standard
    # error of sqrt(p(1-p)/200,000) <= 0.0011, so 0.005 is over three of their difference's (0.0016).
    np.testing.assert_allclose(p_fast, p_slow, atol=0.005)
    assert stats.median(np.sort(samples)[None])[0] == sorted(samples)[len(samples) // 2]


def test_stderr_for_dispatch():
    x = _logliks(50)
    assert stats.stderr_for("perplexity", x, iters=0) is None
    assert stats.stderr_for("bleu", x) is None
    assert stats.stderr_for("acc_all", [(1, {"idx": 0})] * 3) is None
    assert stats.stderr_for("median", x[:1]) is None
    assert stats.stderr_for("mean", x) == pytest.approx(np.std(x, ddof=1) / math.sqrt(50))
    nan_items = np.where(np.arange(50) % 7 == 0, np.nan, x)
    assert math.isfinite(stats.stderr_for("nanmean", nan_items, iters=2_000))
    for name in ("mcc", "matthews_corrcoef", "f1"):
        assert math.isfinite(stats.stderr_for(name, _labels(80, 2, seed=0), iters=2_000))
