"""B6: multi-host evaluation with ``jax.distributed``; two processes give what one process gives.

Two local processes join over gloo on 127.0.0.1 (a free port picked here), one CPU device each,
so the engine's mesh spans both processes. Process 0 drives; process 1 only serves. They score
the mixed requests of tests/test_multidevice.py (a long document, short pairs, choices sharing a
context), with shared prefixes on and off, in fixed-context windows too, and generate with and
without a stop condition that only process 0 can evaluate. A single process runs the same script
as the reference. Every process is a subprocess with a deadline and is killed by its PID if it
outlives the test.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mixed_requests import assert_same_results

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 240

SCRIPT = r"""
import json, sys, time
num_processes, process_id, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, sys.argv[4])
from mlflow_lmeval.engine import distributed, follower
distributed.initialize(distributed.DistributedSettings(f"127.0.0.1:{port}", num_processes, process_id).validate())
import jax
from mlflow_lmeval.engine.loop import Engine, EngineSettings
from mixed_requests import mixed_requests, reference_model

model = reference_model()
if not distributed.is_leader():
    served = follower.serve(model)
    distributed.shutdown()
    print("SERVED " + json.dumps({"commands": served, "devices": jax.device_count()}))
    sys.exit(0)

requests = mixed_requests()
contexts = [c for c, _ in requests[:5]]

def stops(generated):  # a stop rule only process 0 knows, like lm-eval's stop strings
    return len(generated) >= 2 and generated[-1] % 3 == 0

started = time.perf_counter()
out = {"devices": jax.device_count(), "processes": jax.process_count(), "runs": {}}
settings = {
    "shared": EngineSettings(batch_size=8, chunk_size=16, share_prefixes=True),
    "unshared": EngineSettings(batch_size=8, chunk_size=16, share_prefixes=False),
    "windows": EngineSettings(batch_size=8, mode="windowed", context_length=32),
}
for name, setting in settings.items():
    engine = Engine(model, setting)
    result = engine.score(requests)
    steps = 3 if name == "windows" else 6
    out["mesh_devices"] = int(engine.mesh.devices.size)
    out["runs"][name] = {
        "loglik": [float(x) for x in result.loglik],
        "num_tokens": [int(x) for x in result.num_tokens],
        "greedy": [bool(x) for x in result.greedy],
        "generated": engine.generate(contexts, steps, lambda t: False),
        "stopped": engine.generate(contexts, steps, stops),
    }
out["work_s"] = time.perf_counter() - started
distributed.stop_followers()
distributed.shutdown()
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(count: int, command, tmp_path: Path, env_extra=None, deadline_s: float = DEADLINE_S):
    """Start ``command(process_id, port)`` for every process; returns (return codes, outputs).

    Output goes to files, not pipes, so a chatty process cannot block on a full pipe while
    another waits for it in a collective.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update({"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})})
    port = free_port()
    processes, logs = [], []
    try:
        for process_id in range(count):
            log = open(tmp_path / f"process_{count}_{process_id}.log", "w+")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            processes.append(subprocess.Popen(command(process_id, port), cwd=REPO, env=env, stdout=log,
                                              stderr=subprocess.STDOUT, text=True))
        end = time.monotonic() + deadline_s
        codes = [process.wait(timeout=max(1.0, end - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return codes, outputs


def _tagged(output: str, tag: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(tag + " ")]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len(tag) + 1 :])


def run_script(count: int, tmp_path: Path) -> tuple[dict, list[dict]]:
    codes, outputs = run_processes(count, lambda i, port: [sys.executable, "-c", SCRIPT, str(count), str(i), str(port), str(Path(__file__).parent)], tmp_path)
    for code, output in zip(codes, outputs):
        assert code == 0, output[-4000:]
    return _tagged(outputs[0], "RESULT"), [_tagged(o, "SERVED") for o in outputs[1:]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multihost")
    # One after the other, so that each run's work_s is measured on an otherwise idle machine.
    return run_script(1, directory), run_script(2, directory)


def test_two_processes_share_one_mesh(runs):
    (one, _), (two, served) = runs
    assert one["processes"] == 1 and one["mesh_devices"] == 1
    assert two["processes"] == 2 and two["mesh_devices"] == 2
    # Process 1 saw every engine process 0 set up, and each one's score and two generate calls.
    assert served == [{"commands": 3 * 4, "devices": 2}]


def test_two_processes_give_the_results_of_one(runs):
    (one, _), (two, _) = runs
    assert one["runs"].keys() == two["runs"].keys() == {"shared", "unshared", "windows"}
    for setting in one["runs"]:
        relative = assert_same_results(one["runs"][setting], two["runs"][setting], setting)
        print(f"MULTIHOST setting={setting} requests={len(one['runs'][setting]['loglik'])} max_rel_loglik_diff={relative:.3g} "
              f"one_process_s={one['work_s']:.2f} two_processes_s={two['work_s']:.2f}")
    # The stop rule must have cut something short, or it tested nothing.
    stopped = one["runs"]["shared"]["stopped"]
    assert any(len(s) < 6 for s in stopped) and stopped != one["runs"]["shared"]["generated"]



def test_evaluate_command_on_two_processes_writes_the_results_of_one(checkpoint, local_tasks, tmp_path):
    """The whole `mlflow-lmeval evaluate` on two processes (a checkpoint one process saved, lm-eval
    on process 0 only) gives the results.json of one process, and only process 0 writes it."""
    directory, names = local_tasks
    tasks = ",".join(n for n in names if not n.endswith("_complete"))  # scoring and rolling tasks

    def evaluate(output: Path, extra=()):
        return [sys.executable, "-m", "mlflow_lmeval.cli", "evaluate", "--checkpoint", str(checkpoint.path),
                "--tasks", tasks, "--include_path", str(directory), "--output_path", str(output), "--limit", "6",
                "--batch_size", "4", "--bootstrap_iters", "0", "--no_tracking", "--no_cache", *extra]

    single = tmp_path / "single"
    codes, outputs = run_processes(1, lambda i, port: evaluate(single), tmp_path)
    assert codes == [0], outputs[0][-3000:]
    joint = [tmp_path / "joint_0", tmp_path / "joint_1"]
    codes, outputs = run_processes(2, lambda i, port: evaluate(joint[i], [
        "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)]), tmp_path)
    assert codes == [0, 0], [o[-3000:] for o in outputs]
    assert not joint[1].exists()  # a follower only computes
    served = re.search(r"process 1 served (\d+) engine call", outputs[1])
    assert served and int(served.group(1)) >= 2, outputs[1][-3000:]

    expected = json.loads((single / "results.json").read_text())["results"]
    actual = json.loads((joint[0] / "results.json").read_text())["results"]
    assert expected.keys() == actual.keys() and len(expected) == len(tasks.split(","))
    for task, metrics in expected.items():
        for name, value in metrics.items():
            if isinstance(value, float):
                assert actual[task][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, name)
            else:
                assert actual[task][name] == value, (task, name)
