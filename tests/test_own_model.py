"""``mlflow_lmeval.evaluate_model``: the README's "Bring your own model" examples, run as written."""

import re
import tempfile
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import mlflow_lmeval
from mlflow_lmeval import UserError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(marker: str) -> str:
    """The README's fenced python block whose first line is ``# example: <marker>``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    found = [block for block in blocks if block.startswith(f"# example: {marker}\n")]
    assert len(found) == 1, f"README.md has {len(found)} python blocks marked '# example: {marker}'"
    return found[0]


@pytest.fixture
def example_env(tmp_path, monkeypatch):
    """The examples' temp dirs under tmp_path/tmp, run from the empty tmp_path/cwd; no tracking
    environment in or out."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def run_example(marker: str, capsys) -> dict:
    namespace = {"__name__": f"readme_{marker}"}
    exec(compile(readme_example(marker), f"README.md:{marker}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert re.search(r"^acc \d", printed, flags=re.MULTILINE), printed
    # Everything it writes is under the workdir it names, nothing where it was run (no ./mlruns).
    assert sorted(path.name for path in Path.cwd().iterdir()) == []
    assert namespace["workdir"].parent == Path(tempfile.gettempdir())
    return namespace


def evaluation_child(namespace: dict):
    """(client, the one evaluation run under the example's training run)."""
    workdir, training_run = namespace["workdir"], namespace["training_run"]
    results = namespace["results"]
    assert 0.0 <= results["results"]["tiny_qa"]["acc,none"] <= 1.0
    assert (workdir / "results" / "results.json").is_file()
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    parent_id = training_run.info.run_id
    children = client.search_runs([training_run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 1, children
    child = children[0]
    assert child.info.status == "FINISHED"
    history = client.get_metric_history(child.info.run_id, "lmeval/tiny_qa/acc")
    assert [point.step for point in history] == [100]
    assert history[0].value == results["results"]["tiny_qa"]["acc,none"]  # a double stored and read back: exact
    return client, child


def test_readme_nnx_example_publishes_a_child_run_without_a_logged_model(example_env, capsys):
    namespace = run_example("nnx", capsys)
    client, child = evaluation_child(namespace)
    experiment = namespace["training_run"].info.experiment_id
    assert client.search_logged_models(experiment_ids=[experiment]).to_list() == []
    assert "lmeval.model_id" not in child.data.tags


def test_readme_linen_example_publishes_a_child_run_and_a_logged_model(example_env, capsys):
    namespace = run_example("linen", capsys)
    client, child = evaluation_child(namespace)
    training_run = namespace["training_run"]
    models = client.search_logged_models(experiment_ids=[training_run.info.experiment_id]).to_list()
    assert len(models) == 1
    assert models[0].tags["lmeval.fingerprint"] == f"{training_run.info.run_id}:100"
    assert "lmeval.checkpoint_path" not in models[0].tags  # evaluated from memory: no path to show
    assert child.data.tags["lmeval.model_id"] == models[0].model_id


class NoDecode:
    vocab_size, bos_id, eos_id = 257, None, 256

    def encode(self, text):
        return list(text.encode())


def test_a_tokenizer_missing_a_member_is_named_in_one_line():
    with pytest.raises(UserError) as raised:
        mlflow_lmeval.evaluate_model(None, NoDecode(), {"evaluation_tasks": ["x"]}, step=0, publish=False)
    message = str(raised.value)
    assert "\n" not in message and "NoDecode" in message and "lacks decode:" in message, message
    assert isinstance(NoDecode(), mlflow_lmeval.TokenizerProtocol) is False


@pytest.mark.parametrize("fingerprint", ["has space", "quote'd", ""])
def test_a_fingerprint_that_cannot_key_a_logged_model_is_refused(fingerprint):
    tokenizer = NoDecode()
    tokenizer.decode = lambda ids: ""
    with pytest.raises(UserError, match="fingerprint"):
        mlflow_lmeval.evaluate_model(None, tokenizer, {"evaluation_tasks": ["x"]}, step=0, fingerprint=fingerprint,
                                     publish=False)


def test_publishing_needs_an_output_path():
    tokenizer = NoDecode()
    tokenizer.decode = lambda ids: ""
    with pytest.raises(UserError, match="output path"):
        mlflow_lmeval.evaluate_model(None, tokenizer, {"evaluation_tasks": ["x"]}, step=0)
