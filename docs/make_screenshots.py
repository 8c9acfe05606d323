"""Screenshots of the MLflow UI as a person sees it, for docs/mlflow-ui.md.

    python docs/make_screenshots.py [--db mlflow.db] [--out docs/img]

It starts ``mlflow server`` on the pipeline's own database (127.0.0.1, a free port, stopped by its
PID at the end), then lets headless Chromium (Debian's ``chromium`` package) render each view after
the page's scripts have run, and writes one PNG per view:

- ``experiments.png``: MLflow's experiment list;
- ``experiment.png``: the experiment opened as from that list (no ``workflowType`` in the URL), so
  the view it lands in is the one the experiment's ``mlflow.experimentKind`` tag selects;
- ``training_run_charts.png``: the training run's model-metrics charts (``loss`` beside the
  ``lmeval/...`` learning curves);
- ``models.png``: the Models tab (the checkpoints' LoggedModels and their metrics);
- ``evaluation_run.png``: one evaluation run's overview, whose Description holds lm-eval's table.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket  # websocket-client, the `docs` extra

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "mlflow_lmeval"
SETTLE_S = 3  # after the page says it is ready: animations and late requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def start_server(db: Path, port: int, artifacts: Path) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"error: mlflow server exited with code {server.returncode}")
            time.sleep(0.5)
    stop(server)
    raise SystemExit("error: mlflow server did not answer /health within 120 s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


class Browser:
    """Headless Chromium driven over the DevTools protocol, waiting in real time (Chromium's own
    ``--screenshot`` fast-forwards timers, and MLflow's charts were still spinners when it fired)."""

    def __init__(self, chromium: str, width: int = 1600, height: int = 1000):
        self.profile = tempfile.TemporaryDirectory()
        port = free_port()
        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={self.profile.name}", f"--remote-debugging-port={port}",
             "--remote-allow-origins=*", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2).read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    stop(self.process)
                    raise SystemExit("error: chromium's DevTools endpoint did not answer within 60 s")
                time.sleep(0.3)
        page = next(p for p in pages if p["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120)
        self.calls = 0

    def call(self, method: str, **params):
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> None:
        """Poll a JavaScript condition until it holds (charts drawn, a link present)."""
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                print(f"warning: still waiting for {expression!r} after {timeout_s:.0f} s", file=sys.stderr)
                return
            time.sleep(0.5)

    def open(self, url: str, ready: str = "true", height: int = 1000) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=1600, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        self.wait_for(f"document.readyState === 'complete' && ({ready})")
        time.sleep(SETTLE_S)

    def shoot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path}", file=sys.stderr)

    def close(self) -> None:
        self.socket.close()
        stop(self.process)
        self.profile.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=ROOT / "mlflow.db")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: no chromium on PATH (apt-get install chromium)")
    if not args.db.is_file():
        raise SystemExit(f"error: no MLflow database at {args.db} (run `dvc repro` first)")
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as artifacts:
        server = start_server(args.db.resolve(), port, Path(artifacts))
        try:
            base = f"http://127.0.0.1:{port}"
            api = f"{base}/api/2.0/mlflow"
            experiment = get_json(f"{api}/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
            runs = get_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                   "max_results": 200})["runs"]
            training = next(r for r in runs if r["info"]["run_name"].startswith("train-"))
            evaluations = sorted((r for r in runs if r["info"]["run_name"].startswith("eval-step-")),
                                 key=lambda r: int(r["info"]["run_name"].rsplit("-", 1)[1]))
            experiment_id = experiment["experiment_id"]
            home = f"{base}/#/experiments/{experiment_id}"
            browser = Browser(chromium)
            try:
                link = f"a[href*='experiments/{experiment_id}']"
                browser.open(f"{base}/#/experiments", ready=f"document.querySelector({link!r}) !== null")
                # The assistant side panel opens on a first visit and hides half of every page; a
                # person closes it once (the choice is kept in the browser profile).
                browser.evaluate("""document.querySelector('button[aria-label="Close"]')?.click()""")
                time.sleep(1)
                browser.shoot(args.out / "experiments.png")
                # MLflow 3.17 picks the view from its sidebar switch (GenAI | Model training), kept per
                # browser, not from the experiment's mlflow.experimentKind tag (measured: a fresh
                # browser landed on the GenAI overview). A person flips it once; so does this script.
                browser.evaluate("""Array.from(document.querySelectorAll('*'))
                    .find(e => e.children.length === 0 && e.textContent.trim() === 'Model training')?.click()""")
                time.sleep(SETTLE_S)
                # Open the experiment as a person does, by its link in the list, and see where it lands.
                browser.evaluate(f"document.querySelector({link!r}).click()")
                time.sleep(SETTLE_S * 2)
                print(f"the experiment's link landed on {browser.evaluate('location.href')}", file=sys.stderr)
                browser.shoot(args.out / "experiment.png")
                browser.open(f"{home}/runs/{training['info']['run_id']}/model-metrics", height=2200,
                             ready="document.querySelectorAll('.main-svg').length > 0")
                browser.shoot(args.out / "training_run_charts.png")
                browser.open(f"{home}/models", ready="document.body.innerText.includes('checkpoint-step')")
                browser.shoot(args.out / "models.png")
                if evaluations:
                    browser.open(f"{home}/runs/{evaluations[-1]['info']['run_id']}", height=1400,
                                 ready="document.body.innerText.includes('eval-step')")
                    browser.shoot(args.out / "evaluation_run.png")
            finally:
                browser.close()
        finally:
            stop(server)


if __name__ == "__main__":
    main()
