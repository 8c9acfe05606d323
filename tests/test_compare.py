"""mlflow_lmeval.compare: McNemar, the paired bootstrap, results dirs, JSON, CLI and publishing."""

import argparse
import json
import math

import numpy as np
import pytest

from mlflow_lmeval import compare, compare_report, paired_stats, stats
from mlflow_lmeval.errors import UserError

# Float tolerances here are float64 (2^-53 = 1.1e-16 per rounding): rel=1e-12 where two formulas
# compute one statistic from the same numbers (sums of at most a few thousand terms round within
# n·2^-53), rel=1e-9 against p-values written to 12 significant digits or through an exp; a bare
# approx() is pytest's 1e-6 on a value computed once more the same way; the Monte Carlo checks say
# their bound from the sampling distribution where they make it.

LN2 = math.log(2.0)


# --------------------------------------------------------------------------
# Hand-built results directories (what write_results + --log_samples leave)
# --------------------------------------------------------------------------


def _aggregate(metric, items):
    """lm-eval's aggregations, written out plainly."""
    if metric == "perplexity":
        return math.exp(-sum(items) / len(items))
    if metric in ("word_perplexity", "byte_perplexity"):
        return math.exp(-sum(ll for ll, _ in items) / sum(w for _, w in items))
    if metric == "bits_per_byte":
        return -sum(ll for ll, _ in items) / sum(w for _, w in items) / LN2
    return sum(items) / len(items)


def _write_dir(path, tasks, step=None, doc_ids=None, samples=True):
    """``tasks``: {task: {metric: [per-document value]}}; documents 0..n-1 unless ``doc_ids``."""
    path.mkdir(parents=True)
    results = {"results": {}, "configs": {}, "group_subtasks": {}, "checkpoint": {"step": step}}
    for task, metrics in tasks.items():
        entry = {"alias": task}
        for metric, items in metrics.items():
            entry[f"{metric},none"] = _aggregate(metric, items)
            entry[f"{metric}_stderr,none"] = "N/A"
        results["results"][task] = entry
        results["group_subtasks"][task] = []
        results["configs"][task] = {"metric_list": [{"metric": m} for m in metrics]}
        if not samples:
            continue
        n = len(next(iter(metrics.values())))
        ids = list(range(n)) if doc_ids is None else doc_ids
        with open(path / f"samples_{task}.jsonl", "w") as handle:
            for i, doc_id in enumerate(ids):
                record = {"doc_id": doc_id, "doc": {"text": f"doc {doc_id}"}, "filter": "none",
                          "metrics": list(metrics), "doc_hash": f"h{doc_id}"}
                record.update({m: items[i] for m, items in metrics.items()})
                handle.write(json.dumps(record) + "\n")
    (path / "results.json").write_text(json.dumps(results))
    return path


def _binary_pair(n, n01, n10, seed=0):
    """0/1 outcomes a, b [n] with exactly n01 (a=0, b=1) and n10 (a=1, b=0) pairs, shuffled."""
    rest = n - n01 - n10
    both = rest // 2
    a = np.array([0] * n01 + [1] * n10 + [1] * both + [0] * (rest - both))
    b = np.array([1] * n01 + [0] * n10 + [1] * both + [0] * (rest - both))
    order = np.random.default_rng(seed).permutation(n)
    return a[order], b[order]


def _pairs(n, seed, rate=1.6):
    rng = np.random.default_rng(seed)
    weight = rng.integers(20, 200, size=n).astype(float)
    return np.stack([-weight * rng.gamma(4.0, rate / 4.0, size=n), weight], axis=1)


# --------------------------------------------------------------------------
# McNemar
# --------------------------------------------------------------------------


def test_mcnemar_exact_binomial_with_few_discordant_pairs():
    a, b = _binary_pair(50, n01=6, n10=1)
    # 7 discordant: 2 * (C(7,0) + C(7,1)) / 2^7 = 16 / 128.
    assert paired_stats.mcnemar_p(a, b) == pytest.approx(0.125, rel=1e-12)
    # 5 one way, none the other: 2 / 2^5.
    assert paired_stats.mcnemar_from_counts(0, 5) == pytest.approx(0.0625, rel=1e-12)
    # 24 discordant (the largest exact case): 2 * sum_{i<=7} C(24, i) / 2^24.
    assert paired_stats.mcnemar_from_counts(17, 7) == pytest.approx(0.0639146566391, rel=1e-9)
    assert paired_stats.mcnemar_from_counts(3, 3) == 1.0
    assert paired_stats.mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0


def test_mcnemar_chi_square_with_many_discordant_pairs():
    a, b = _binary_pair(300, n01=30, n10=10)
    # (|30 - 10| - 1)^2 / 40 = 9.025 on 1 df: P = 0.0026631192591...
    assert paired_stats.mcnemar_p(a, b) == pytest.approx(0.00266311925914, rel=1e-9)
    # 25 discordant switches to chi-square: (|18 - 7| - 1)^2 / 25 = 4, P = erfc(sqrt 2).
    assert paired_stats.mcnemar_from_counts(18, 7) == pytest.approx(0.0455002638964, rel=1e-9)
    assert paired_stats.mcnemar_from_counts(20, 20) == 1.0


# --------------------------------------------------------------------------
# Paired bootstrap against a plain loop
# --------------------------------------------------------------------------


def _loop_deltas(stat, a, b, iters, seed):
    """Plain paired bootstrap: one resample of document indices per replicate, applied to A and B."""
    rng = np.random.default_rng(seed)
    n = len(a)
    deltas = []
    for _ in range(iters):
        idx = np.minimum((rng.random(n) * n).astype(int), n - 1)
        deltas.append(stat(b[idx]) - stat(a[idx]))
    return np.array(deltas)


def _loop_ci_p(deltas):
    low, high = np.quantile(deltas, [0.025, 0.975])
    tails = min(np.sum(deltas <= 0), np.sum(deltas >= 0))
    return low, high, min(1.0, 2 * (tails + 1) / (len(deltas) + 1))


@pytest.mark.parametrize("aggregate, stat", [
    (stats.word_perplexity, lambda s: math.exp(-s[:, 0].sum() / s[:, 1].sum())),
    (stats.bits_per_byte, lambda s: -s[:, 0].sum() / s[:, 1].sum() / LN2),
])
def test_ratio_metric_replicates_equal_plain_loop(aggregate, stat):
    # 80 distinct documents (> 64): the document-drawing scheme, not multinomial counts.
    a, b = _pairs(80, seed=1), _pairs(80, seed=2, rate=1.5)
    b[:, 1] = a[:, 1]  # same documents: same word / byte counts
    ours = paired_stats.paired_bootstrap_deltas(aggregate, a, b, iters=3000, seed=5)
    reference = _loop_deltas(stat, a, b, 3000, seed=5)
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-12)
    # Chunking changes nothing.
    chunked = paired_stats.paired_bootstrap_deltas(aggregate, a, b, iters=3000, seed=5, chunk_size=7)
    np.testing.assert_allclose(chunked, ours, rtol=1e-12, atol=1e-14)
    assert paired_stats.percentile_ci(ours) == pytest.approx(_loop_ci_p(reference)[:2], rel=1e-9)
    assert paired_stats.bootstrap_p(ours) == _loop_ci_p(reference)[2]


def test_median_replicates_equal_plain_loop():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=31), rng.normal(0.3, 1.0, size=31)
    ours = paired_stats.paired_bootstrap_deltas(stats.median, a, b, iters=2000, seed=9, chunk_size=64)
    reference = _loop_deltas(lambda x: np.sort(x)[len(x) // 2], a, b, 2000, seed=9)
    np.testing.assert_array_equal(ours, reference)


def test_binary_metric_matches_plain_loop_within_monte_carlo():
    a, b = _binary_pair(200, n01=28, n10=12, seed=4)
    ours = paired_stats.paired_bootstrap_deltas(stats.mean, a.astype(float), b.astype(float), iters=100_000, seed=0)
    reference = _loop_deltas(np.mean, a.astype(float), b.astype(float), 5000, seed=1)
    low, high, p = _loop_ci_p(reference)
    # delta = 16/200; its bootstrap sd ~ sqrt(40)/200 = 0.032.  5k loop replicates put the 2.5%
    # quantiles within ~0.0015 (plus the 1/200 grid); p (~0.01) within ~0.003.
    assert np.mean(ours) == pytest.approx(0.08, abs=0.001)
    assert paired_stats.percentile_ci(ours) == pytest.approx((low, high), abs=0.011)
    assert paired_stats.bootstrap_p(ours) == pytest.approx(p, abs=0.01)
    assert np.std(ours) == pytest.approx(math.sqrt((40 / 200 - 0.08**2) / 200), rel=0.02)


# --------------------------------------------------------------------------
# Results directories
# --------------------------------------------------------------------------


@pytest.fixture
def two_dirs(tmp_path):
    acc_a, acc_b = _binary_pair(120, n01=30, n10=5, seed=1)
    norm_a, norm_b = _binary_pair(120, n01=2, n10=1, seed=2)
    ppl_a = _pairs(25, seed=3)
    ppl_b = ppl_a.copy()
    ppl_b[:, 0] *= 0.9  # B: uniformly better log-likelihoods
    a = {
        "toy_mc": {"acc": acc_a.tolist(), "acc_norm": norm_a.tolist()},
        "toy_ppl": {"word_perplexity": [tuple(p) for p in ppl_a.tolist()],
                    "bits_per_byte": [tuple(p) for p in ppl_a.tolist()],
                    "perplexity": ppl_a[:, 0].tolist()},
    }
    b = {
        "toy_mc": {"acc": acc_b.tolist(), "acc_norm": norm_b.tolist()},
        "toy_ppl": {"word_perplexity": [tuple(p) for p in ppl_b.tolist()],
                    "bits_per_byte": [tuple(p) for p in ppl_b.tolist()],
                    "perplexity": ppl_b[:, 0].tolist()},
    }
    return _write_dir(tmp_path / "a", a, step=100), _write_dir(tmp_path / "b", b, step=200), a, b


def test_compare_results_dirs(two_dirs):
    dir_a, dir_b, a, b = two_dirs
    comparison = compare.compare(dir_a, dir_b, iterations=4000, seed=0)
    rows = {(r.task, r.metric): r for r in comparison.rows}
    assert set(rows) == {("toy_mc", "acc"), ("toy_mc", "acc_norm"), ("toy_ppl", "word_perplexity"),
                         ("toy_ppl", "bits_per_byte"), ("toy_ppl", "perplexity")}
    assert comparison.skipped == []
    for (task, metric), row in rows.items():
        assert row.a == pytest.approx(_aggregate(metric, a[task][metric]), rel=1e-12)
        assert row.b == pytest.approx(_aggregate(metric, b[task][metric]), rel=1e-12)
        assert row.delta == pytest.approx(row.b - row.a)
        assert row.ci_low <= row.delta <= row.ci_high
        assert row.n == len(a[task][metric])

    acc, norm = rows["toy_mc", "acc"], rows["toy_mc", "acc_norm"]
    assert acc.delta == pytest.approx(25 / 120)
    assert acc.mcnemar_p == pytest.approx(paired_stats.mcnemar_from_counts(30, 5)) and acc.mcnemar_p < 1e-4
    assert acc.p_value < 0.001 and acc.ci_low > 0
    assert norm.mcnemar_p == pytest.approx(1.0) and norm.p_value > 0.5
    # Perplexity-like metrics carry no McNemar; B's uniformly better logliks are significant.
    word = rows["toy_ppl", "word_perplexity"]
    assert word.mcnemar_p is None and word.delta < 0 and word.ci_high < 0 and word.p_value < 0.001
    assert rows["toy_ppl", "bits_per_byte"].ci_high < 0
    assert rows["toy_ppl", "perplexity"].ci_high < 0

    table = compare_report.render_table(comparison)
    assert "|Tasks" in table and "step 100" in table and "step 200" in table
    assert "word_perplexity" in table and "McNemar p" in table


def test_identical_results_give_no_difference(two_dirs):
    dir_a, _, _, _ = two_dirs
    comparison = compare.compare(dir_a, dir_a, iterations=500)
    for row in comparison.rows:
        assert row.delta == 0 and row.ci_low == 0 and row.ci_high == 0 and row.p_value == 1.0
        assert row.mcnemar_p in (None, 1.0)


def test_unreproducible_metric_is_skipped(tmp_path):
    tasks = {"toy": {"acc": [1, 0, 1, 1], "bleu": [1.0, 2.0, 3.0, 4.0]}}
    dir_a = _write_dir(tmp_path / "a", tasks)
    comparison = compare.compare(dir_a, dir_a, iterations=100)
    assert [r.metric for r in comparison.rows] == ["acc"]
    assert comparison.skipped == ["toy/bleu,none: aggregation not supported"]


def test_error_different_documents(tmp_path):
    dir_a = _write_dir(tmp_path / "a", {"toy": {"acc": [1, 0, 1]}})
    dir_b = _write_dir(tmp_path / "b", {"toy": {"acc": [1, 0, 1]}}, doc_ids=[0, 1, 5])
    with pytest.raises(UserError, match=r"task toy: A and B scored different documents") as error:
        compare.compare(dir_a, dir_b, iterations=10)
    assert "\n" not in str(error.value)


def test_error_missing_samples(tmp_path):
    dir_a = _write_dir(tmp_path / "a", {"toy": {"acc": [1, 0, 1]}})
    dir_b = _write_dir(tmp_path / "b", {"toy": {"acc": [1, 0, 1]}}, samples=False)
    with pytest.raises(UserError, match=r"task toy.*--log_samples") as error:
        compare.compare(dir_a, dir_b, iterations=10)
    assert "\n" not in str(error.value)


def test_error_no_shared_task(tmp_path):
    dir_a = _write_dir(tmp_path / "a", {"toy": {"acc": [1, 0, 1]}})
    dir_b = _write_dir(tmp_path / "b", {"other": {"acc": [1, 0, 1]}})
    with pytest.raises(UserError, match=r"share no task") as error:
        compare.compare(dir_a, dir_b, iterations=10)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------
# CLI, JSON, consecutive checkpoints
# --------------------------------------------------------------------------


def test_add_parser_and_json(two_dirs, tmp_path, capsys):
    dir_a, dir_b, _, _ = two_dirs
    parser = argparse.ArgumentParser()
    compare_report.add_parser(parser.add_subparsers(dest="command", required=True))
    defaults = parser.parse_args(["compare", str(dir_a), str(dir_b)])
    assert (defaults.iterations, defaults.seed, defaults.json, defaults.publish) == (100_000, 0, None, False)
    assert defaults.func is compare_report.run_command

    out = tmp_path / "out" / "compare.json"
    args = parser.parse_args(["compare", str(dir_a), str(dir_b), "--json", str(out), "--iterations", "300",
                              "--seed", "3"])
    args.func(args)
    printed = capsys.readouterr().out
    assert "|Tasks" in printed and f"wrote {out}" in printed

    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == 5
    required = {"task", "metric", "a", "b", "delta", "ci_low", "ci_high", "p_value"}
    for row in rows:
        assert required <= set(row)
        assert ("mcnemar_p" in row) == (row["metric"] in ("acc", "acc_norm"))
        assert all(isinstance(row[k], float) for k in required - {"task", "metric"})
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", str(dir_a), str(dir_b), "--iterations", "0"])


def test_write_consecutive_comparisons(tmp_path):
    dirs = {
        step: _write_dir(tmp_path / f"step_{step}", {"toy": {"acc": _binary_pair(30, 3 + i, 1, seed=i)[1].tolist()}},
                         step=step)
        for i, step in enumerate([200, 100, 300])
    }
    written = compare_report.write_consecutive_comparisons(dirs, tmp_path / "reports", iterations=200)
    assert sorted(p.name for p in written) == [
        "compare_step_100_vs_200.json", "compare_step_100_vs_200.md",
        "compare_step_200_vs_300.json", "compare_step_200_vs_300.md",
    ]
    assert json.loads((tmp_path / "reports" / "compare_step_100_vs_200.json").read_text())[0]["task"] == "toy"

    (dirs[300] / "samples_toy.jsonl").unlink()
    with pytest.warns(UserWarning, match="--log_samples"):
        assert len(compare_report.write_consecutive_comparisons(dirs, tmp_path / "lenient", iterations=50, strict=False)) == 2
    with pytest.raises(UserError):
        compare_report.write_consecutive_comparisons(dirs, tmp_path / "strict", iterations=50)


# --------------------------------------------------------------------------
# Publishing (one MLflow store for both cases: opening it costs seconds)
# --------------------------------------------------------------------------


def test_publish_onto_b_evaluation_run(two_dirs, tmp_path):
    from mlflow import MlflowClient

    from mlflow_lmeval import tracking

    dir_a, dir_b, _, _ = two_dirs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    comparison = compare.compare(dir_a, dir_b, iterations=200)
    with pytest.raises(UserError, match=rf"mlflow-lmeval sync {dir_b}` first"):
        compare.publish(comparison, uri)

    client = MlflowClient(uri)
    identity = tracking.evaluation_identity(comparison.results_b)[tracking.TAG_IDENTITY]
    run = client.create_run(client.create_experiment("e"), tags={tracking.TAG_IDENTITY: identity})
    client.set_terminated(run.info.run_id)
    assert compare.publish(comparison, uri) == run.info.run_id
    logged = client.get_run(run.info.run_id).data.metrics
    acc = next(r for r in comparison.rows if r.metric == "acc")
    assert logged["compare/toy_mc/acc/delta"] == pytest.approx(acc.delta)
    assert logged["compare/toy_mc/acc/p_value"] == pytest.approx(acc.p_value)
    assert len(logged) == 4 * len(comparison.rows)
    history = client.get_metric_history(run.info.run_id, "compare/toy_mc/acc/ci_low")
    assert [m.step for m in history] == [100]  # A's step
