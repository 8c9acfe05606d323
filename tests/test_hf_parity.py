"""Our evaluator on a save_pretrained xLSTM gives lm-eval's own ``hf`` backend's per-request answers.

The hf side was recorded once with torch (tests/fixtures/hf_xlstm/make_fixture.py: HFLM on
single/, batch size 1, float32, max_length 64) over local tasks of every request type; these
tests need neither torch nor transformers. lm-eval's hf backend cuts documents into max_length
windows and carries no state, so recurrent mode is compared on requests that fit the window,
and fixed-context mode (context_length = max_length) on the rolling documents, long ones included.
"""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import XLSTM_LOGPROB, token_errors_bound

import mlflow_lmeval
from mlflow_lmeval.tokenizer import HFTokenizer

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "tests" / "fixtures" / "hf_xlstm" / "harness"
REFERENCE = json.loads((HARNESS / "hf_backend.json").read_text(encoding="utf-8"))
MAX_LENGTH = REFERENCE["max_length"]
FITTING = [task for task, recorded in REFERENCE["tasks"].items() if recorded["fits_max_length"]]
ROLLING = [task for task, recorded in REFERENCE["tasks"].items() if recorded["output_type"] == "loglikelihood_rolling"]
# Another implementation (torch, float32, its own order): each scored token's log-probability within
# the fixture's XLSTM_LOGPROB (conftest), a request's sum within token_errors_bound of its tokens.
TOKENIZER = HFTokenizer.load(REPO / REFERENCE["checkpoint"])


def read_samples(out: Path, tasks: list[str]) -> dict[str, dict[int, dict]]:
    """Our samples (samples_<task>.jsonl) by task and doc_id."""
    samples = {}
    for task in tasks:
        lines = (out / f"samples_{task}.jsonl").read_text(encoding="utf-8").splitlines()
        samples[task] = {sample["doc_id"]: sample for sample in map(json.loads, lines)}
    return samples


def evaluate_cli(out: Path, tasks: list[str]) -> dict[str, dict[int, dict]]:
    """What a user runs: ``mlflow-lmeval evaluate --checkpoint DIR`` (the task files name their data
    relative to the repository root, so it runs there)."""
    command = [sys.executable, "-m", "mlflow_lmeval.cli", "evaluate", "--checkpoint", str(REPO / REFERENCE["checkpoint"]),
               "--tasks", ",".join(tasks), "--include_path", str(HARNESS / "tasks"), "--output_path", str(out),
               "--log_samples", "--no_cache", "--no_cache_requests", "--offline", "--bootstrap_iters", "0",
               "--no_tracking"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return read_samples(out, tasks)


def evaluate(out: Path, tasks: list[str], **settings) -> dict[str, dict[int, dict]]:
    """The same through the Python API, in this process."""
    config = dict(evaluation_tasks=tasks, include_path=str(HARNESS / "tasks"), output_path=str(out), log_samples=True,
                  response_cache=False, cache_requests=False, offline=True, bootstrap_iters=0, **settings)
    with contextlib.chdir(REPO):
        mlflow_lmeval.evaluate(REPO / REFERENCE["checkpoint"], config, show_progress=False)
    return read_samples(out, tasks)


@pytest.fixture(scope="module")
def recurrent(tmp_path_factory):
    return evaluate_cli(tmp_path_factory.mktemp("recurrent"), FITTING)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return evaluate(tmp_path_factory.mktemp("windowed"), ROLLING, mode="windowed", context_length=MAX_LENGTH)


def max_difference(task: str, ours: dict[int, dict]) -> float:
    """The largest |Δ loglik| of a task's requests as a fraction of its bound (a request scores at
    most the tokens of its whole text); is_greedy and generated text must be equal."""
    recorded = REFERENCE["tasks"][task]
    assert sorted(ours) == [sample["doc_id"] for sample in recorded["samples"]]
    worst, worst_fraction = 0.0, 0.0
    for sample in recorded["samples"]:
        mine = ours[sample["doc_id"]]
        assert [arguments[: len(expected)] for arguments, expected in zip(mine["arguments"], sample["arguments"])] \
            == sample["arguments"], sample["doc_id"]  # the same requests were built
        assert len(mine["resps"]) == len(sample["resps"])
        for arguments, (theirs,), (got,) in zip(sample["arguments"], sample["resps"], mine["resps"], strict=True):
            if recorded["output_type"] == "generate_until":
                assert got == theirs, (task, sample["doc_id"])
                continue
            if recorded["output_type"] != "loglikelihood_rolling":
                assert got[1] == theirs[1], (task, sample["doc_id"], "is_greedy")
                got, theirs = got[0], theirs[0]
            bound = float(token_errors_bound(len(TOKENIZER.encode("".join(arguments))) + 1, XLSTM_LOGPROB))
            worst, worst_fraction = max(worst, abs(got - theirs)), max(worst_fraction, abs(got - theirs) / bound)
    print(f"HFPARITY task={task} requests={sum(len(s['resps']) for s in recorded['samples'])} max_abs_loglik_diff={worst:.3g}")
    return worst_fraction


def test_the_fixture_covers_every_request_type_and_long_documents():
    types = {recorded["output_type"] for recorded in REFERENCE["tasks"].values()}
    assert types == {"loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until"}
    assert REFERENCE["tasks"]["hfp_rolling_long"]["longest_request_tokens"] > 2 * MAX_LENGTH  # several windows
    assert REFERENCE["model_args"]["max_length"] == MAX_LENGTH and REFERENCE["model_args"]["batch_size"] == 1


@pytest.mark.parametrize("task", FITTING)
def test_recurrent_mode_equals_the_hf_backend(recurrent, task):
    assert max_difference(task, recurrent[task]) <= 1


@pytest.mark.parametrize("task", ROLLING)
def test_fixed_context_windows_equal_the_hf_backend(windowed, task):
    assert max_difference(task, windowed[task]) <= 1
