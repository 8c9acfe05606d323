"""Through lm-eval: local tasks of every request type, lm-eval's encoding, samples and results."""

import json

import numpy as np
import pytest
from conftest import assert_logliks_close, naive_loglikelihood

from mlflow_lmeval import EvalConfig
from mlflow_lmeval.evaluation import evaluate


def run(checkpoint_path, local_tasks, tmp_path, **overrides):
    directory, names = local_tasks
    # No response cache: every run here must compute its results, or the comparisons are vacuous.
    config = {"evaluation_tasks": names, "include_path": str(directory), "limit_requests": 6, "log_samples": True,
                  "output_path": str(tmp_path), "bootstrap_iters": 0, "response_cache": False}
    config.update(overrides)
    results = evaluate(checkpoint_path, EvalConfig.from_dict(config), show_progress=False)
    samples = {
        name: [json.loads(line) for line in (tmp_path / f"samples_{name}.jsonl").read_text().splitlines()]
        for name in config["evaluation_tasks"]
    }
    return results, samples


@pytest.fixture(scope="module")
def reference(checkpoint, local_tasks, tmp_path_factory):
    return run(checkpoint.path, local_tasks, tmp_path_factory.mktemp("ref"))


def test_results_have_every_metric(reference, local_tasks):
    results, _ = reference
    _, _names = local_tasks
    expected = {
        "t_rolling": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"],
        "t_lastword": ["perplexity,none", "acc,none"],
        "t_nextsentence": ["acc,none", "acc_norm,none"],
        "t_complete": ["exact_match,none"],
    }
    for task, metrics in expected.items():
        for metric in metrics:
            assert np.isfinite(results["results"][task][metric]), (task, metric)
    assert results["checkpoint"]["fingerprint"].startswith("sha256:")
    on_disk = json.loads((__import__("pathlib").Path(results["eval_config"]["output_path"]) / "results.json").read_text())
    assert on_disk["results"] == results["results"]
    # Loss by position: every loglikelihood/rolling task, its buckets weighing up to its token perplexity.
    by_position = on_disk["loss_by_position"]
    assert set(by_position) == {"t_rolling", "t_lastword", "t_nextsentence"}  # t_complete only generates
    for task, rows in by_position.items():
        tokens = sum(row["tokens"] for row in rows)
        assert tokens == results["engine"]["scored_tokens"][task]
        mean_nll = sum(row["tokens"] * row["mean_nll"] for row in rows) / tokens
        if task != "t_nextsentence":  # multiple choice has no token perplexity
            # The same float32 log-probabilities, summed in float64 per bucket and per request: n·2^-53 apart.
            assert np.exp(mean_nll) == pytest.approx(results["results"][task]["token_perplexity,none"], rel=1e-9)


def encode_like_lm_eval(checkpoint, context, continuation):
    """lm-eval's TemplateLM rules, applied to the checkpoint's tokenizer."""
    from lm_eval.api.model import TemplateLM

    class Encoder(TemplateLM):
        eot_token_id = checkpoint.tokenizer.eos_id
        prefix_token_id = checkpoint.tokenizer.bos_id
        tok_encode = staticmethod(lambda s, **kw: checkpoint.tokenizer.encode(s))
        _loglikelihood_tokens = loglikelihood_rolling = generate_until = None

    if context == "":
        return [checkpoint.tokenizer.bos_id], checkpoint.tokenizer.encode(continuation)
    return Encoder._encode_pair(Encoder.__new__(Encoder), context, continuation)


@pytest.mark.parametrize("task", ["t_lastword", "t_nextsentence"])
def test_loglikelihoods_equal_naive_full_pass(reference, checkpoint, task):
    _, samples = reference
    for sample in samples[task]:
        for (context, continuation), (loglik, greedy) in zip(sample["arguments"], (r[0] for r in sample["resps"])):
            context_tokens, continuation_tokens = encode_like_lm_eval(checkpoint, context, continuation)
            expected = naive_loglikelihood(checkpoint, context_tokens, continuation_tokens)
            assert_logliks_close(float(loglik), expected[0], len(continuation_tokens))  # another order
            assert bool(greedy) == expected[1]


def test_rolling_loglikelihood_equals_naive_full_pass(reference, checkpoint):
    _, samples = reference
    for sample in samples["t_rolling"]:
        text = sample["arguments"][0][0]
        tokens = checkpoint.tokenizer.encode(text)
        expected, _ = naive_loglikelihood(checkpoint, [checkpoint.tokenizer.bos_id], tokens)
        assert_logliks_close(float(sample["resps"][0][0]), expected, len(tokens))  # another order


def test_generation_equals_naive_decode_cut_at_until(reference, checkpoint):
    from conftest import naive_greedy_decode

    _, samples = reference
    tok = checkpoint.tokenizer
    for sample in samples["t_complete"]:
        context, gen_kwargs = sample["arguments"][0]
        assert gen_kwargs["until"] == ["\n"]
        tokens = naive_greedy_decode(checkpoint, tok.encode(context), gen_kwargs["max_gen_toks"])
        if tok.eos_id in tokens:
            tokens = tokens[: tokens.index(tok.eos_id)]
        assert sample["resps"][0][0] == tok.decode(tokens).split("\n")[0]


def test_generate_until_stops_at_a_stop_string(checkpoint):
    from conftest import naive_greedy_decode
    from lm_eval.api.instance import Instance

    from mlflow_lmeval.engine.loop import EngineSettings
    from mlflow_lmeval.lm import JaxLM

    lm = JaxLM(checkpoint.model, checkpoint.tokenizer, EngineSettings(batch_size=2, generation_block=4), show_progress=False)
    contexts = ["The while statement is used", "Raise an exception", "x"]
    requests, expected = [], []
    for index, context in enumerate(contexts):
        text = checkpoint.tokenizer.decode(naive_greedy_decode(checkpoint, checkpoint.tokenizer.encode(context), 20))
        assert len(text) >= 4
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        requests.append(Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 20}), index))
        expected.append(text.split(stop)[0])
    assert lm.generate_until(requests) == expected


@pytest.mark.parametrize("overrides", [{"infinite_eval_chunksize": 7}, {"use_infinite_eval": False, "context_length": 4096}, {"batch_size": 3}],
                         ids=["chunk7", "fixed-context", "batch3"])
def test_settings_give_the_same_per_request_results(reference, checkpoint, local_tasks, tmp_path, overrides):
    _, expected = reference
    results, samples = run(checkpoint.path, local_tasks, tmp_path, **overrides)
    if overrides.get("use_infinite_eval") is False:
        assert results["loss_by_position"]["mode"] == "windowed"  # says why there is no table
    for task in expected:
        for got, want in zip(samples[task], expected[task]):
            if task == "t_complete":
                assert got["resps"] == want["resps"]
                continue
            for arguments, a, b in zip(got["arguments"], got["resps"], want["resps"]):
                # Another order (other chunks, windows or rows): the tiny mLSTM's bound per scored token.
                if task == "t_rolling":
                    a, b, scored = a[0], b[0], len(checkpoint.tokenizer.encode(arguments[0]))
                else:
                    a, b, scored = a[0][0], b[0][0], len(encode_like_lm_eval(checkpoint, *arguments)[1])
                assert_logliks_close(float(a), float(b), scored)


def test_chat_template_and_system_instruction_reach_the_prompt(checkpoint, local_tasks, tmp_path):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    _, samples = run(checkpoint.path, local_tasks, tmp_path, apply_chat_template=template, system_instruction="Be brief.",
                     evaluation_tasks=("t_complete",), limit_requests=2)
    prompt = samples["t_complete"][0]["arguments"][0][0]
    assert prompt.startswith("[system] Be brief.\n[user] ") and prompt.endswith("[assistant] ")


def test_stderrs_for_every_metric_without_a_process_pool(checkpoint, local_tasks, tmp_path, monkeypatch):
    """word/byte perplexity and bits_per_byte get stderrs (lm-eval gives "N/A"), computed without
    forking a pool, and they agree with a plain bootstrap over the logged per-document items."""
    import multiprocessing.pool

    def no_pool(*args, **kwargs):
        raise AssertionError("a multiprocessing pool was started after JAX")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", no_pool)
    results, samples = run(checkpoint.path, local_tasks, tmp_path, evaluation_tasks=("t_rolling", "t_lastword"),
                           limit_requests=10, bootstrap_iters=20000)
    rolling = results["results"]["t_rolling"]
    items = np.array([s["word_perplexity"] for s in samples["t_rolling"]], dtype=float)  # (loglik, words) pairs
    rng = np.random.default_rng(0)
    resampled = items[rng.integers(0, len(items), (4000, len(items)))]
    plain = np.std(np.exp(-resampled[..., 0].sum(1) / resampled[..., 1].sum(1)), ddof=1)
    # Two bootstraps of one statistic, with other draws: a standard deviation estimated from B
    # resamples is off by about 1/sqrt(2B) relative (1.1 % for B = 4,000), so 10 % is 9 of those.
    assert rolling["word_perplexity_stderr,none"] == pytest.approx(plain, rel=0.1)
    for metric in ("byte_perplexity", "bits_per_byte", "token_perplexity", "mean_token_loglik"):
        assert rolling[f"{metric}_stderr,none"] > 0, metric
    lastword = results["results"]["t_lastword"]
    assert lastword["perplexity_stderr,none"] > 0 and lastword["token_perplexity_stderr,none"] > 0


def test_token_perplexity_is_computed_from_the_fused_documents(checkpoint, reference):
    results, samples = reference
    tok = checkpoint.tokenizer
    logliks = [float(s["resps"][0][0]) for s in samples["t_rolling"]]
    counts = [len(tok.encode(s["arguments"][0][0])) for s in samples["t_rolling"]]
    expected = float(np.exp(-np.sum(logliks) / np.sum(counts)))
    # The same float64 log-likelihoods (JSON keeps every bit) summed in another order: n·2^-53 apart.
    assert results["results"]["t_rolling"]["token_perplexity,none"] == pytest.approx(expected, rel=1e-9)
