"""One source of truth for settings, and caches keyed on everything that changes a result."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from mlflow_lmeval import config as config_module
from mlflow_lmeval.config import REQUESTS, RESPONSES, STATISTICS, EvalConfig
from mlflow_lmeval.engine.cached import CachedEngine
from mlflow_lmeval.engine.loop import Engine, EngineSettings
from mlflow_lmeval.evaluation import configure_environment, engine_settings, run_evaluation
from mlflow_lmeval.pipeline.params import load_params
from mlflow_lmeval.tracking import settings_digest

REPO = Path(__file__).resolve().parents[1]

# A changed value for every field, from a base that runs in fixed-context mode (so that both
# the mode and the window length reach the response cache's namespace).
BASE = EvalConfig(evaluation_tasks=("a",), mode="windowed", context_length=32)
CHANGED = {
    "evaluation_tasks": ("b",), "tokenizer_path": "/other/tok.model", "cache_requests": False, "limit_requests": 3,
    "write_out": True, "mode": "recurrent", "infinite_eval_chunksize": 16, "context_length": 16,
    "batch_size": 4, "worker_buffer_size": 2, "worker_count": 1, "scale_logits": True, "system_instruction": "Be brief.",
    "num_fewshot": 2, "bootstrap_iters": 10, "apply_chat_template": True, "include_path": "/elsewhere",
    "output_path": "/out", "log_samples": True, "response_cache": False, "response_cache_path": "/c.sqlite",
    "offline": True, "dtype": "bfloat16",
}


def test_every_field_has_metadata_and_a_changed_value():
    fields = [f.name for f in dataclasses.fields(EvalConfig)]
    assert set(CHANGED) == set(fields)
    for name, setting in config_module.settings().items():
        assert setting.affects in (None, *config_module.SCORE_EFFECTS), name


def _namespace(model, config):
    return CachedEngine(Engine(model, engine_settings(config)), cache=object(), fingerprint="fp").namespace


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_a_field_changes_the_identity_and_cache_keys_exactly_when_it_affects_scores(checkpoint, name):
    base, model = BASE, checkpoint.model
    if name == "mode":  # a context_length is refused outside windowed mode: the window is the model's here
        base, model = BASE.replace(context_length=None), dataclasses.replace(model, context_length=32)
    changed = base.replace(**{name: CHANGED[name]})
    affects = config_module.settings()[name].affects
    digest = lambda c: settings_digest({"eval_config": c.to_dict()})
    assert (digest(changed) != digest(base)) == (affects is not None)
    assert (_namespace(model, changed) != _namespace(model, base)) == (affects == RESPONSES)


def test_every_request_shaping_field_reaches_the_request_cache_key():
    """How each REQUESTS field keys lm-eval's request cache (request_cache.request_key). A new
    REQUESTS field fails here until it is wired in."""
    reaches = {
        "evaluation_tasks": "each task is keyed on its own resolved config",
        "tokenizer_path": "the tokenizer's identity (JaxLM.tokenizer_name)",
        "limit_requests": "not keyed: lm-eval caches every document and slices (test_request_cache_...limit)",
        "system_instruction": "system_instruction", "num_fewshot": "num_fewshot", "apply_chat_template": "chat_template",
    }
    assert set(reaches) == {n for n, s in config_module.settings().items() if s.affects == REQUESTS}
    assert {n for n, s in config_module.settings().items() if s.affects == STATISTICS} == {"bootstrap_iters"}


def test_dvc_yaml_lists_exactly_the_score_relevant_params():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]["do"]
    listed = {p.removeprefix("evaluate.") for p in stage["params"]}
    expected = {s.param for s in config_module.settings().values() if s.param and s.affects is not None}
    assert listed == expected


def test_cli_flags_and_params_names_map_onto_the_fields(tmp_path):
    from mlflow_lmeval.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--checkpoint", "c", "--tasks", "x,y", "--output_path", "o",
                                      "--no_cache", "--mode", "windowed", "--context_length", "16", "--limit", "0.5",
                                      "--apply_chat_template", "--offline"])
    config = config_module.from_args(args)
    assert config == EvalConfig(evaluation_tasks=("x", "y"), output_path="o", response_cache=False,
                                mode="windowed", context_length=16, limit_requests=0.5,
                                apply_chat_template=True, offline=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(chunk_size=16, cache_requests=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_params(tmp_path / "params.yaml")["evaluate"].eval_config("out")
    assert (settings.infinite_eval_chunksize, settings.cache_requests, settings.offline) == (16, False, True)
    assert engine_settings(settings) == EngineSettings(chunk_size=16, batch_size=8, mode="recurrent", dtype="float32")


def test_the_seeds_names_are_aliases_not_fields(tmp_path):
    """use_infinite_eval / --no_infinite_eval and debug / --debug_logits still set mode and
    scale_logits; given with the field they must agree; the identity is the same either way."""
    windowed = EvalConfig(mode="windowed")
    assert EvalConfig(use_infinite_eval=False) == windowed and EvalConfig(use_infinite_eval=True) == EvalConfig()
    assert EvalConfig(debug=True) == EvalConfig(scale_logits=True) != EvalConfig()
    assert EvalConfig.from_dict({"use_infinite_eval": False, "debug": True}) == windowed.replace(scale_logits=True)
    assert EvalConfig().replace(use_infinite_eval=False) == windowed
    assert EvalConfig(mode="windowed", use_infinite_eval=False) == windowed
    assert "use_infinite_eval" not in EvalConfig().to_dict() and "debug" not in EvalConfig().to_dict()
    for values, message in [
        ({"mode": "recurrent", "use_infinite_eval": False}, "mode 'recurrent' conflicts with use_infinite_eval=False"),
        ({"scale_logits": False, "debug": True}, "scale_logits False conflicts with debug=True"),
        ({"use_infinite_eval": "no"}, "use_infinite_eval must be true or false, got 'no'"),
        ({"mode": "fixed"}, "mode must be recurrent or windowed, got 'fixed'"),
    ]:
        with pytest.raises(config_module.UserError) as raised:
            EvalConfig.from_dict(values)
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value), raised.value

    from mlflow_lmeval.cli import build_parser

    def parsed(*flags):
        args = build_parser().parse_args(["evaluate", "--checkpoint", "c", "--tasks", "x", "--output_path", "o", *flags])
        return config_module.from_args(args)

    cli_base = EvalConfig(("x",), output_path="o")
    assert parsed("--no_infinite_eval") == parsed("--mode", "windowed") == cli_base.replace(mode="windowed")
    assert parsed("--debug_logits") == parsed("--scale_logits") == cli_base.replace(scale_logits=True)
    assert parsed().mode == "recurrent" and parsed().scale_logits is False

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["evaluate"]["mode"]
    params["evaluate"]["use_infinite_eval"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_params(tmp_path / "params.yaml")["evaluate"].settings.mode == "windowed"
    params["evaluate"]["mode"] = "recurrent"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    conflict = "params.yaml: evaluate.mode 'recurrent' conflicts with use_infinite_eval"
    with pytest.raises(config_module.UserError, match=conflict):
        load_params(tmp_path / "params.yaml")

    # An evaluation published under the seed's names keeps its identity.
    new = {"eval_config": EvalConfig(("x",), mode="windowed", scale_logits=True).to_dict()}
    old = {"eval_config": {**{k: v for k, v in new["eval_config"].items() if k not in ("mode", "scale_logits")},
                           "use_infinite_eval": False, "debug": True}}
    assert settings_digest(new) == settings_digest(old)
    assert settings_digest(new) != settings_digest({"eval_config": {**old["eval_config"], "use_infinite_eval": True}})


def test_online_by_default_offline_by_choice(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    configure_environment()
    assert "HF_HUB_OFFLINE" not in __import__("os").environ
    configure_environment(offline=True)
    assert __import__("os").environ["HF_HUB_OFFLINE"] == __import__("os").environ["HF_DATASETS_OFFLINE"] == "1"


def _write_task(directory: Path, texts: list[str], doc_to_text: str = "{{text}}") -> None:
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t, "target": " end"}) + "\n" for t in texts))
    (directory / "changing.yaml").write_text(yaml.safe_dump({
        "task": "changing", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood", "doc_to_text": doc_to_text, "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))


def _prompts(checkpoint, directory: Path, output: Path, limit=None) -> list[str]:
    config = EvalConfig(evaluation_tasks=("changing",), include_path=str(directory), output_path=str(output),
                        log_samples=True, bootstrap_iters=0, limit_requests=limit, batch_size=4)
    run_evaluation(checkpoint.model, checkpoint.tokenizer, config, show_progress=False)
    lines = (output / "samples_changing.jsonl").read_text().splitlines()
    return [json.loads(line)["arguments"][0][0] for line in lines]


def test_request_cache_follows_the_data_the_template_and_the_limit(checkpoint, tmp_path, monkeypatch, capfd):
    """The cache stays on throughout: each run must score its own documents. It runs outside a
    git checkout, where lm-eval's `git describe` used to print "fatal: not a git repository"."""
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "tasks"
    directory.mkdir()
    first = [f"alpha {i} one two" for i in range(6)]
    _write_task(directory, first)
    assert sorted(_prompts(checkpoint, directory, tmp_path / "r1", limit=4)) == sorted(first[:4])
    second = [f"beta {i} three four" for i in range(6)]  # same task name, same count, other data
    _write_task(directory, second)
    assert sorted(_prompts(checkpoint, directory, tmp_path / "r2", limit=4)) == sorted(second[:4])
    _write_task(directory, second, doc_to_text="Q: {{text}}")  # a changed template rebuilds the requests
    assert sorted(_prompts(checkpoint, directory, tmp_path / "r3", limit=4)) == sorted("Q: " + t for t in second[:4])
    # The cache is warm for this config: a larger limit still gives the right count.
    assert sorted(_prompts(checkpoint, directory, tmp_path / "r4", limit=6)) == sorted("Q: " + t for t in second)
    assert "fatal" not in capfd.readouterr().err


def test_tokenizer_name_is_the_tokenizers_identity(checkpoint):
    import hashlib

    from mlflow_lmeval.lm import JaxLM

    lm = JaxLM(checkpoint.model, checkpoint.tokenizer, show_progress=False)
    assert lm.tokenizer_name == "sentencepiece:" + hashlib.sha256(checkpoint.tokenizer.model_bytes).hexdigest()[:16]


def test_unreachable_hub_dataset_names_both_ways_out(checkpoint, tmp_path):
    from mlflow_lmeval import UserError

    (tmp_path / "hub.yaml").write_text(yaml.safe_dump({
        "task": "hubtask", "dataset_path": "nobody/not_cached_anywhere", "test_split": "test",
        "output_type": "loglikelihood", "doc_to_text": "{{text}}", "doc_to_target": " x",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    config = EvalConfig(evaluation_tasks=("hubtask",), include_path=str(tmp_path), offline=True, bootstrap_iters=0)
    with pytest.raises(UserError) as raised:
        run_evaluation(checkpoint.model, checkpoint.tokenizer, config, show_progress=False)
    message = str(raised.value)
    assert "task hubtask" in message and "nobody/not_cached_anywhere" in message, message
    assert "go online" in message and "include:" in message and "dataset_path: json" in message, message


def test_dtype_is_float32_or_bfloat16():
    assert EvalConfig().dtype == "float32" and EvalConfig(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(config_module.UserError, match="^dtype must be float32 or bfloat16, got 'float16'$"):
        EvalConfig(dtype="float16")
