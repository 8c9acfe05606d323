"""Bad input is refused before any work, in one line, and nothing of the user's is moved or changed:
the response cache's path, the output path, the tracking URI, the step, the limit, a window length
without windowed mode, a sync with nothing to publish, a checkpoint that is a file."""

import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_lmeval import response_cache
from mlflow_lmeval.errors import UserError
from mlflow_lmeval.response_cache import ResponseCache


def run_cli(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "mlflow_lmeval.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=300, env=env)
    return result.returncode, result.stdout, result.stderr.strip()


def snapshot(directory: Path) -> dict:
    """Every file and directory under ``directory``: its bytes (None for a directory) and mtime."""
    return {p.relative_to(directory).as_posix(): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


@pytest.fixture
def workdir(tmp_path):
    """A checkpoint directory that would fail to load (so a check that comes after loading names it
    instead), a plain file, and a directory holding a user's file."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "metadata.json").write_text('{"format": "not loaded: every check comes first"}')
    (tmp_path / "a_file").write_text("the user's\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x\n")
    return tmp_path


EVALUATE = ["evaluate", "--checkpoint", "{w}/ckpt", "--tasks", "t", "--output_path", "{w}/out"]

# (arguments, the one-line answer's text); every case exits 2 before JAX, the model or lm-eval load.
CASES = {
    "tracking-unknown-scheme": (EVALUATE + ["--tracking_uri", "foo://x"], "tracking URI foo://x: MLflow has no store for the scheme 'foo'"),
    "tracking-file-store-unwritable": (EVALUATE + ["--tracking_uri", "file:///proc/nope"],
                                       "tracking URI file:///proc/nope: cannot write the file store's directory /proc/nope"),
    "tracking-file-store-refused": (EVALUATE + ["--tracking_uri", "file://{w}/store"], "unless MLFLOW_ALLOW_FILE_STORE=true"),
    "tracking-sqlite-unwritable": (EVALUATE + ["--tracking_uri", "sqlite:////proc/nope/mlflow.db"],
                                   "cannot write the database's directory /proc/nope"),
    "output-is-a-file": (EVALUATE + ["--no_tracking", "--output_path", "{w}/a_file"],
                         "cannot write results to {w}/a_file: it is a file, not a directory"),
    "output-under-a-file": (EVALUATE + ["--output_path", "{w}/a_file/out"], "cannot write results to {w}/a_file/out: Not a directory"),
    "output-in-proc": (EVALUATE + ["--output_path", "/proc/x"], "cannot write results to /proc/x"),
    "limit-1.5": (EVALUATE + ["--limit", "1.5"], "--limit must be a count (a whole number from 1) or a fraction below 1, got 1.5"),
    "negative-step": (EVALUATE + ["--step", "-5"], "argument --step: must be 0 or more, got -5"),
    "context-length-without-windowed": (EVALUATE + ["--context_length", "128"], "--context_length applies only in windowed mode"),
    "checkpoint-is-a-file": (EVALUATE + ["--no_tracking", "--checkpoint", "{w}/a_file"], "not a checkpoint: {w}/a_file is a file"),
    "sync-nothing-there": (["sync", "{w}/d"], "nothing to publish in {w}/d: no results.json"),
    "cache-not-sqlite": (["cache", "info", "--cache_path", "{w}/a_file"], "{w}/a_file is not a response cache (not a SQLite file)"),
    "cache-foreign-sqlite": (["cache", "clear", "--cache_path", "{w}/user.db"], "{w}/user.db is not a response cache (a SQLite database"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_any_work_and_changes_nothing(workdir, case, monkeypatch):
    args, message = CASES[case]
    with sqlite3.connect(workdir / "user.db") as db:  # a user's own database
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('keep me')")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    before = snapshot(workdir)
    code, _, err = run_cli(*(arg.format(w=workdir) for arg in args))
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("error: ") and message.format(w=workdir) in err, err
    assert snapshot(workdir) == before  # nothing created (no output dir, no store), moved or changed


def test_cache_info_on_a_directory_reads_the_cache_in_it_and_changes_nothing(workdir):
    before = snapshot(workdir)
    code, out, err = run_cli("cache", "info", "--cache_path", workdir / "d")
    assert code == 0, err
    assert out.strip() == f"{workdir / 'd' / response_cache.FILE_NAME}: no response cache yet"
    assert snapshot(workdir) == before
    cache = ResponseCache(workdir / "d")  # an evaluation's cache goes inside it too
    cache.put_pieces("ns", [(b"k", 0, -1.0, 1, True, "[]")])
    cache.close()
    assert cache.path == workdir / "d" / response_cache.FILE_NAME and (workdir / "d" / "f").read_text() == "x\n"


def test_cache_info_is_read_only_even_on_a_torn_cache(tmp_path):
    path = tmp_path / "r.sqlite"
    cache = ResponseCache(path)
    cache.put_pieces("ns", [(b"k", 0, -1.0, 1, True, "[]"), (b"k", 1, -2.0, 1, True, "[]")])
    cache.close()
    before = snapshot(tmp_path)
    assert response_cache.describe(path) == f"{path}: 2 cached responses"
    assert snapshot(tmp_path) == before  # no -wal or -shm file left behind
    with open(path, "r+b") as handle:  # torn as in test_response_cache.py: its header survives
        handle.seek(100)
        handle.write(b"\xff" * 4000)
    before = snapshot(tmp_path)
    assert "damaged" in response_cache.describe(path)
    assert snapshot(tmp_path) == before  # reported, not moved aside: that is for the next evaluation


def test_a_file_that_is_not_our_cache_is_refused_and_left_alone(tmp_path):
    text, database = tmp_path / "notes.txt", tmp_path / "user.db"
    text.write_bytes(b"this is not a database" * 100)
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")  # even a table of our name
    before = snapshot(tmp_path)
    for path in (text, database):
        with pytest.raises(UserError, match="is not a response cache"):
            ResponseCache(path)
    assert snapshot(tmp_path) == before


def test_a_cache_written_before_the_application_id_is_still_ours(tmp_path):
    """The caches earlier versions wrote (no application id in the header) keep working."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE pieces (namespace TEXT, key BLOB, sequence_idx INTEGER, loglik REAL, num_tokens INTEGER,
                                 greedy INTEGER, positions TEXT, PRIMARY KEY (key, sequence_idx));
            CREATE TABLE generations (namespace TEXT, key BLOB PRIMARY KEY, tokens TEXT);
            INSERT INTO generations VALUES ('ns', x'01', '[1, 2]');
        """)
        db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(response_cache.SCHEMA_VERSION),))
    cache = ResponseCache(path)
    assert cache.get_generations([b"\x01"]) == {b"\x01": [1, 2]}
    cache.close()
    assert int.from_bytes(path.read_bytes()[68:72], "big") == response_cache.APPLICATION_ID


def test_retries_against_a_closed_port_log_nothing_above_the_one_line(tmp_path, dead_uri, caplog):
    from mlflow_lmeval.tracking import TrackingUnavailable, sync

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps({"results": {"t": {"acc,none": 0.5}}, "eval_config": {}}))
    with caplog.at_level(logging.DEBUG), pytest.raises(TrackingUnavailable, match="connection refused"):
        sync([tmp_path / "out"], tracking_uri=dead_uri, max_retries=1)
    assert not [r for r in caplog.records if r.name.startswith("urllib3") and r.levelno >= logging.WARNING]


class _Tokenizer:
    vocab_size, bos_id, eos_id = 8, 1, 2

    def encode(self, text):
        return [3] * len(text)

    def decode(self, tokens):
        return "x" * len(tokens)


@pytest.mark.parametrize("change, message", [
    ({"output_path": "{w}/a_file"}, "cannot write results to {w}/a_file: it is a file"),
    ({"tracking_uri": "foo://x"}, "MLflow has no store for the scheme 'foo'"),
    ({"step": -5}, "step must be an integer of 0 or more, got -5"),
    ({"limit_requests": 2.5}, "limit_requests must be a count"),
], ids=["output-is-a-file", "unknown-scheme", "negative-step", "limit-2.5"])
def test_the_python_api_checks_the_same_before_any_work(workdir, monkeypatch, change, message):
    """``evaluate`` (a checkpoint directory) and ``evaluate_model`` (a model in memory) refuse what
    the CLI refuses, before the checkpoint loads or the model is touched (``object()`` would fail)."""
    from mlflow_lmeval import evaluate, evaluate_model

    change = {k: v.format(w=workdir) if isinstance(v, str) else v for k, v in change.items()}
    tracking_uri, step = change.pop("tracking_uri", None), change.pop("step", 0)
    if tracking_uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    config = {"evaluation_tasks": ["t"], "output_path": str(workdir / "out"), **change}
    with pytest.raises(UserError, match=message.format(w=workdir)):
        evaluate_model(object(), _Tokenizer(), config, step=step)
    if tracking_uri:
        return  # evaluate() publishes nothing
    with pytest.raises(UserError, match=message.format(w=workdir)):
        evaluate(workdir / "ckpt", config, step=step)
    assert not (workdir / "out").exists()


def test_params_yaml_refuses_a_window_length_without_windowed_mode_and_a_fractional_count(tmp_path):
    from mlflow_lmeval.pipeline.params import load_params

    for evaluate, message in [({"context_length": 64}, "params.yaml: evaluate.context_length applies only in windowed mode"),
                              ({"limit": 1.5}, "params.yaml: evaluate.limit must be a count")]:
        (tmp_path / "params.yaml").write_text(json.dumps({"evaluate": {"tasks": ["t"], **evaluate}}))
        with pytest.raises(UserError, match=message):
            load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(json.dumps({"evaluate": {"tasks": ["t"], "mode": "windowed", "context_length": 64}}))
    assert load_params(tmp_path / "params.yaml")["evaluate"].context_length == 64
