"""B5: the engine shards its batch over a ``data`` axis of every device; results equal one device.

Each run is its own process, because the number of host CPU devices is fixed when JAX starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives four. Both processes score the same
mixed requests (a long document, short pairs, choices sharing a context, a one-token context) with
the reference model at small random weights, batch size 8, and generate a few tokens.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mixed_requests import assert_same_results

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
import jax
from mlflow_lmeval.engine.loop import Engine, EngineSettings
from mixed_requests import mixed_requests, reference_model

model = reference_model()
requests = mixed_requests()

known = {f.name for f in dataclasses.fields(EngineSettings)}
out = {"devices": jax.device_count(), "runs": {}}
for share in ([True, False] if "share_prefixes" in known else [None]):
    extra = {} if share is None else {"share_prefixes": share}
    engine = Engine(model, EngineSettings(batch_size=8, chunk_size=16, **extra))
    result = engine.score(requests)
    generated = engine.generate([c for c, _ in requests[:5]], 6, lambda t: False)
    out["mesh_devices"] = int(engine.mesh.devices.size)
    out["runs"][str(share)] = {
        "loglik": [float(x) for x in result.loglik],
        "num_tokens": [int(x) for x in result.num_tokens],
        "greedy": [bool(x) for x in result.greedy],
        "generated": generated,
        "traces": engine.traces,
    }
print("RESULT " + json.dumps(out))
"""


def _run(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["JAX_PLATFORMS"] = "cpu"
    # The caller's other XLA flags stay (an ISA cap, as .ci/run's second pass sets); only the device count is ours.
    flags = [flag for flag in env.pop("XLA_FLAGS", "").split() if not flag.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(Path(__file__).parent)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def runs():
    return _run(1), _run(4)


def test_four_devices_are_used(runs):
    one, four = runs
    assert one["devices"] == 1 and one["mesh_devices"] == 1
    assert four["devices"] == 4 and four["mesh_devices"] == 4


def test_sharded_results_equal_one_device(runs):
    one, four = runs
    assert one["runs"].keys() == four["runs"].keys()
    for setting in one["runs"]:
        a, b = one["runs"][setting], four["runs"][setting]
        relative = assert_same_results(a, b, f"share_prefixes={setting}")
        diff = np.abs(np.asarray(b["loglik"]) - np.asarray(a["loglik"]))
        print(f"MULTIDEVICE setting={setting} requests={len(diff)} max_abs_loglik_diff={diff.max():.3g} "
              f"max_rel_loglik_diff={relative:.3g}")
