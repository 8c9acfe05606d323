"""The team setup (docs/team-setup.md): an MLflow server backed by PostgreSQL, and one behind
MLflow's basic-auth app. Every server runs on 127.0.0.1 and is stopped by its PID.

PostgreSQL comes from the system (`.ci/run` installs Debian's package); without it the PostgreSQL
test is skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import MlflowServer, PostgresServer, postgres_bin_dir
from test_concurrency import _assert_one_of_each, _publish_together, _results_dirs
from test_tracking import make_checkpoint, make_results_dir

from mlflow_lmeval import tracking
from mlflow_lmeval.tracking import TrackingUnavailable, publish_results

PASSWORD = "team-Passw0rd-7731"


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def postgres():
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb); `apt-get install postgresql` or run .ci/run")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_postgres_backed_server_takes_concurrent_publishers(postgres, tmp_path, clean_env):
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow", backend_store_uri=postgres.uri)
    try:
        server.start()
        directories = _results_dirs(tmp_path)
        # Two publishers on this machine (sharing its lock) and one from elsewhere.
        lock_dirs = [tmp_path / "here", tmp_path / "here", tmp_path / "elsewhere"]
        outcomes = _publish_together(directories, tmp_path, lambda index: {
            **os.environ, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_LMEVAL_CACHE": str(lock_dirs[index])})
        assert [o.returncode for o in outcomes] == [0, 0, 0], [o.stderr[-800:] for o in outcomes]
        _assert_one_of_each(MlflowClient(server.uri), directories)
    finally:
        server.stop()


@pytest.fixture
def auth_server(tmp_path, clean_env):
    directory = tmp_path / "auth-server"
    directory.mkdir()
    config = directory / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{directory / 'basic_auth.db'}\n"
        f"admin_username = admin\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server = MlflowServer(directory, app_name="basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _sync(directory: Path, uri: str, username: str | None, password: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    if username:
        env.update(MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD=password)
    return subprocess.run([sys.executable, "-m", "mlflow_lmeval.cli", "sync", str(directory), "--tracking_uri", uri],
                          env=env, capture_output=True, text=True, timeout=180)


def test_basic_auth_server_right_and_wrong_credentials(auth_server, tmp_path, monkeypatch):
    uri = auth_server.uri
    first = make_results_dir(tmp_path, 100, acc=0.3)

    for username, password in ((None, None), ("admin", "wrong-password-1"), ("mallory", PASSWORD)):
        refused = _sync(first, uri, username, password)
        assert refused.returncode == 3, refused.stderr
        message = refused.stderr.strip()
        assert message.count("\n") == 0 and message.startswith("error: tracking server")
        assert "refused access" in message and ("401" in message or "nauthori" in message)
        assert PASSWORD not in message and "wrong-password-1" not in message

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with tracking.TrainingRun(tracking_uri=uri, experiment="train") as run:
        run.log_checkpoint(100, make_checkpoint(tmp_path, 100, run.run_id))
    assert not run.unavailable
    directory = make_results_dir(tmp_path, 100, run_id=run.run_id, acc=0.3)
    outcome = publish_results(directory, tracking_uri=uri)
    client = MlflowClient(uri)
    published = client.get_run(outcome.run_id)
    assert published.info.status == "FINISHED"
    assert published.data.tags["mlflow.parentRunId"] == run.run_id

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-1")
    with pytest.raises(TrackingUnavailable) as caught:
        publish_results(make_results_dir(tmp_path, 200, run_id=run.run_id), tracking_uri=uri)
    assert caught.value.exit_code == 3 and "wrong-password-1" not in str(caught.value)

    # Neither password reached anything the server stores (its user table keeps a hash).
    stored = [p for p in auth_server.directory.rglob("*") if p.is_file() and p.name not in ("basic_auth.ini", "server.log")]
    assert any(p.name == "server.db" for p in stored)
    for path in stored:
        content = path.read_bytes()
        assert PASSWORD.encode() not in content and b"wrong-password-1" not in content, path
