"""Mistakes in task YAMLs and task options, each named in one line; empty rolling documents scored
as lm-eval scores them. In-process: the CLI's exit 2 for a UserError is tested elsewhere."""

import json
import logging

import numpy as np
import pytest
from test_bad_inputs import write_task

from mlflow_lmeval import EvalConfig, UserError
from mlflow_lmeval.evaluation import run_evaluation, task_manager


def task(directory, name, docs, **fields):
    """A local task over ``docs`` (test_bad_inputs' YAML), with ``fields`` replacing its own."""
    write_task(directory, name, "".join(json.dumps(doc) + "\n" for doc in docs).encode())
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return path


def evaluation_error(checkpoint, name, directory, **settings) -> str:
    config = EvalConfig(evaluation_tasks=(name,), include_path=str(directory), bootstrap_iters=0, response_cache=False,
                        **settings)
    with pytest.raises(UserError) as raised:
        run_evaluation(checkpoint.model, checkpoint.tokenizer, config, show_progress=False)
    return str(raised.value)


DOCS = [{"text": "a b c"}, {"text": "d e f"}, {"text": "g h"}]
ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}


def test_a_config_mistake_names_the_yaml_the_field_and_the_value(checkpoint, tmp_path, caplog):
    """lm-eval blamed these on the data file ("cannot read its data FILE"), dropped an unknown
    metric that has an aggregation in silence (exit 0, no metric), or ended in ``KeyError: None``
    after its own log lines."""
    cases = {
        "badtype": ({"output_type": "loglikelihoodz"},
                    ["output_type 'loglikelihoodz' is not one lm-eval knows", "generate_until", "did you mean loglikelihood"]),
        "dropped": ({"metric_list": [{**ACC, "metric": "accz"}]}, ["metric 'accz' is not one", "did you mean acc"]),
        "keyerror": ({"metric_list": [{"metric": "accz"}]}, ["metric 'accz' is not one", "did you mean acc"]),
        "badagg": ({"metric_list": [{**ACC, "aggregation": "meen"}]},
                   ["aggregation 'meen' (of metric 'acc') is not one lm-eval knows", "did you mean mean"]),
        "nometric": ({"metric_list": [{"aggregation": "mean"}]}, ["ValueError", "'metric' key not provided"]),
        # A task's own process_results names its metrics; each still needs an aggregation (KeyError: None).
        "ownmetric": (None, ["metric 'mine' has no default aggregation; give it one (aggregation: one of ", "mean"]),
    }
    directory = tmp_path / "tasks"
    for name, (fields, _) in cases.items():
        task(directory, name, DOCS, **(fields or {}))
    (directory / "task_mistakes_helpers.py").write_text("def process(doc, results):\n    return {'mine': 1.0}\n")
    (directory / "ownmetric.yaml").write_text(
        f"task: ownmetric\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'ownmetric.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{text}}'\ndoc_to_target: ' end'\n"
        "process_results: !function task_mistakes_helpers.process\nmetric_list:\n  - metric: mine\n")
    for name, (_, parts) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            message = evaluation_error(checkpoint, name, directory)
        assert message.startswith(f"task {name} ({directory / name}.yaml): ") and "\n" not in message, message
        assert all(part in message for part in parts), (name, message)
        assert "cannot read its data" not in message, message
        # lm-eval's search for the metric (its registry, then the evaluate library) stays quiet.
        assert not [r for r in caplog.records if r.name == "lm_eval.api.registry"], (name, caplog.text)


def test_more_shots_than_the_pool_holds_names_the_task_the_shots_and_the_pool(checkpoint, tmp_path):
    directory = tmp_path / "tasks"
    task(directory, "shots", DOCS)
    # Drawn from the evaluated split itself, the sampler leaves each document out of its own shots.
    task(directory, "ownsplit", DOCS, fewshot_split="test")
    message = evaluation_error(checkpoint, "shots", directory, num_fewshot=5)
    assert message == (f"task shots ({directory}/shots.yaml): num_fewshot 5 asks for more examples than its few-shot "
                       "pool holds: 3 document(s) from its test split; use num_fewshot 3 or less"), message
    message = evaluation_error(checkpoint, "ownsplit", directory, num_fewshot=3)
    assert message.endswith("3 document(s) from its test split, less the one evaluated; use num_fewshot 2 or less"), message
    # The advice holds: the most it names runs.
    config = EvalConfig(evaluation_tasks=("ownsplit",), include_path=str(directory), bootstrap_iters=0,
                        response_cache=False, num_fewshot=2)
    output = run_evaluation(checkpoint.model, checkpoint.tokenizer, config, show_progress=False)
    assert output["n-shot"]["ownsplit"] == 2 and "acc,none" in output["results"]["ownsplit"]


def test_an_unknown_task_is_told_without_indexing_lm_evals_tasks_and_with_close_names(local_tasks, monkeypatch):
    """Indexing lm-eval's 14,687 tasks took 14 s (11 s in the report) before an unknown name was told."""
    import lm_eval.tasks

    directory, names = local_tasks
    built = []

    class Recording(lm_eval.tasks.TaskManager):
        def __init__(self, *args, include_defaults=True, **kwargs):
            built.append(include_defaults)
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recording)
    with pytest.raises(UserError) as raised:
        task_manager(("t_rollng",), str(directory))
    assert str(raised.value) == (f"unknown task(s): t_rollng (not found in {directory} or among lm-eval's tasks); "
                                 "did you mean t_rolling?"), raised.value
    with pytest.raises(UserError) as raised:
        task_manager(("hellaswg", "t_lastwrd"), None)
    message = str(raised.value)
    assert message.startswith("unknown task(s): hellaswg, t_lastwrd (not found among lm-eval's tasks); did you mean "), message
    assert "hellaswag" in message and "(for hellaswg)" in message and "t_lastword" not in message, message
    assert True not in built, built  # never the index of lm-eval's own tasks
    assert task_manager(tuple(names), str(directory)).all_tasks  # the include path's names need none either
    assert True not in built, built


def test_a_name_lm_eval_may_know_is_left_to_its_index():
    from mlflow_lmeval.task_names import lm_eval_task_names, may_be_lm_eval_task

    assert may_be_lm_eval_task("hellaswag") and may_be_lm_eval_task("arc_easy")
    assert may_be_lm_eval_task("mmlu_*")  # a pattern: only the index can match it
    assert not may_be_lm_eval_task("hellaswg") and not may_be_lm_eval_task("no_such_task")
    assert not may_be_lm_eval_task("hellas")  # a piece of a longer name is no name
    assert {"hellaswag", "arc_easy", "lambada_openai"} <= set(lm_eval_task_names())


def test_an_empty_rolling_document_scores_zero_over_no_tokens_as_in_lm_eval(checkpoint):
    """lm-eval's hf backend sums a document's rolling windows, and an empty token list has none."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows

    from mlflow_lmeval.engine.loop import EngineSettings
    from mlflow_lmeval.lm import JaxLM

    assert list(get_rolling_token_windows([], prefix_token=0, max_seq_len=8, context_len=1)) == []
    lm = JaxLM(checkpoint.model, checkpoint.tokenizer, EngineSettings(batch_size=2), show_progress=False)
    texts = ["Some text to score.", "", "More text, and more."]
    requests = [Instance("loglikelihood_rolling", {}, (text,), i, ("toy", i, 1)) for i, text in enumerate(texts)]
    with_empty = lm.loglikelihood_rolling(requests)
    # The engine is given the same two documents either way: the same computation, equal bit for bit.
    without = lm.loglikelihood_rolling([requests[0], requests[2]])
    assert with_empty == [without[0], 0.0, without[1]]
    assert lm.document_scores["toy"][1] == (0.0, 0)
    assert lm.loglikelihood_rolling(requests[1:2]) == [0.0]  # alone: no engine call at all


def test_documents_without_tokens_leave_token_perplexity_and_its_stderr_as_they_were():
    from mlflow_lmeval.lm_eval_stats import add_token_perplexity

    def figures(scores):
        output = {"configs": {"toy": {"output_type": "loglikelihood_rolling"}}, "results": {"toy": {}}}
        add_token_perplexity(output, {"toy": scores}, iters=1000)
        return output["results"]["toy"]

    scored = [(-12.5, 4), (-30.25, 9)]
    with_empty = figures([scored[0], (0.0, 0), (0.0, 0), scored[1]])
    assert with_empty == figures(scored)
    assert np.isfinite(with_empty["token_perplexity_stderr,none"]), with_empty
