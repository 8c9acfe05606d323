"""Servers the tests start on 127.0.0.1 and stop by their own PIDs: MLflow and PostgreSQL."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the process group ``process`` leads; SIGKILL it if it has not gone in 20 s."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in its own process group (uvicorn runs as a child)."""

    def __init__(self, directory: Path, port: int | None = None, backend_store_uri: str | None = None,
                 app_name: str | None = None, env: dict[str, str] | None = None):
        self.directory, self.port, self.process = directory, port or free_port(), None
        self.backend_store_uri = backend_store_uri or f"sqlite:///{directory}/server.db"
        self.app_name, self.env = app_name, env or {}
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
               **self.env}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", self.backend_store_uri,
                   "--artifacts-destination", str(self.directory / "artifacts")]
        if self.app_name:
            command += ["--app-name", self.app_name]
        with open(self.directory / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.directory, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not become healthy: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        _stop_group(self.process, signal.SIGTERM)


def postgres_bin_dir() -> Path | None:
    """Where ``initdb`` and ``postgres`` are: on PATH, else Debian's versioned directory."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` in a temporary directory, ``postgres`` listening on
    127.0.0.1 only, trust authentication for one user, stopped by its PID (SIGINT, a fast shutdown).

    PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` (else ``nobody``)
    user, in a directory outside pytest's root-only tmp tree.
    """

    user, database = "lmeval", "mlflow"

    def __init__(self, bin_dir: Path):
        self.bin_dir, self.port, self.process = bin_dir, free_port(), None
        self.directory = Path(tempfile.mkdtemp(prefix="lmeval-pg-"))
        self.uri = f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"
        self._account = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self._account = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            os.chown(self.directory, self._account.pw_uid, self._account.pw_gid)

    def _as_account(self) -> dict:
        """Popen arguments that run a child as the unprivileged account (no preexec_fn: a fork
        with Python code in the child is unsafe in a process that runs JAX's threads)."""
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60.0) -> None:
        import psycopg

        data = self.directory / "data"
        subprocess.run([str(self.bin_dir / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, timeout=timeout, **self._as_account())
        with open(self.directory / "postgres.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.directory}",
                 "-c", "fsync=off"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_account())
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.directory / 'postgres.log').read_text()[-2000:]}")
            try:
                connection = psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                                             autocommit=True)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.2)
        with connection:
            connection.execute(f"CREATE DATABASE {self.database}")

    def stop(self) -> None:
        try:
            _stop_group(self.process, signal.SIGINT)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
