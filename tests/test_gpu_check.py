"""The GPU check (``python -m benchmarks.gpu``) in its ``--tiny`` form, run as the lent GPU image
would run it: lm-eval, grain, mlflow and dvc cannot be imported there, so here they are blocked."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("lm_eval", "grain", "mlflow", "dvc")
BLOCKER = f"""
import sys

class _NotOnTheGpuImage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: the GPU image has none")
        return None

sys.meta_path.insert(0, _NotOnTheGpuImage())
"""
# bf16 weights: the engine's chunks and one full pass round differently, by far less than this;
# a state lost between chunks costs nats (7 in a planted test). bfloat16 keeps 8 significant bits
# (2^-9 = 2e-3 relative per rounding); a request's sum over its tokens can move by a few hundredths.
FULL_PASS_TOLERANCE = 0.05
TORCH_TOLERANCE = 0.5  # transformers runs the mLSTM cell in bf16, ours in float32


@pytest.fixture
def bare_image_env(tmp_path):
    """Environment whose Python (and every child it starts) cannot import the blocked packages."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_engine_and_loader_import_without_the_evaluation_stack(bare_image_env):
    code = (
        "import mlflow_lmeval.engine.loop, mlflow_lmeval.engine.fuse, mlflow_lmeval.response_cache\n"
        "import mlflow_lmeval.models.xlstm, mlflow_lmeval.models.hf, benchmarks.gpu\n"
        "try:\n    import grain\nexcept ImportError:\n    print('blocked')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=bare_image_env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "blocked"  # the blocker is in force, so the imports above proved something


def test_tiny_gpu_check(bare_image_env, tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "benchmarks.gpu", "--tiny", "--json", str(out),
               "--sections", "xlstm_125m,xlstm_7b_lambada"]
    run = subprocess.run(command, cwd=REPO, env=bare_image_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["tiny"] is True and set(result["sections"]) == {"xlstm_125m", "xlstm_7b_lambada"}
    assert result["targets"] == {"speedup_vs_naive": ">= 10.0", "fraction_of_bound": ">= 0.7",
                                 "engine_vs_torch_forward": ">= 2.0"}
    environment = result["environment"]
    assert environment["device_kind"] and environment["versions"]["jax"] and environment["versions"]["flax"]
    assert environment["batches_from"].startswith("a prefetch thread")  # grain was blocked in the children
    for name, section in result["sections"].items():
        assert section["status"] == "ok", (name, section["status"], section.get("errors"))
        assert positive(section["config"]["num_params"]) and section["config"]["dtype"] == "bfloat16"
        engine = section["engine"]
        for key in ("engine_model_tokens_per_s", "scored_tokens_per_s", "requests_per_s", "warmup_s", "model_tokens"):
            assert positive(engine[key]), (name, key, engine[key])
        assert engine["all_finite"]
        assert engine["model_tokens"] == section["workload"]["request_tokens"] - sum(
            section["workload"]["requests_per_kind"].values())  # one target fewer than tokens per request
        assert engine["traces_after_timed_runs"] == engine["traces_after_warmup"]  # compile kept out of the timing
        assert positive(section["bound"]["bound_tokens_per_s"]) and positive(section["fraction_of_bound"])
        assert result["summary"][name]["fraction_of_bound"] == section["fraction_of_bound"]

    small = result["sections"]["xlstm_125m"]
    assert positive(small["speedup_vs_naive"]) and positive(small["naive"]["workload_projected_s"])
    assert small["max_abs_loglik_diff_vs_full_pass"] < FULL_PASS_TOLERANCE
    # The sample is sensitive enough to its context for the equality above to mean something.
    assert small["context_effect_max_abs_loglik"] > 10 * FULL_PASS_TOLERANCE
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        assert "not importable" in small["torch"]["not_measured"]
        assert small.get("engine_vs_torch_forward") is None and small.get("max_abs_loglik_diff_vs_torch") is None
    else:
        assert positive(small["torch"]["torch_forward_tokens_per_s"]) and positive(small["engine_vs_torch_forward"])
        assert small["max_abs_loglik_diff_vs_torch"] < TORCH_TOLERANCE

    lambada = result["sections"]["xlstm_7b_lambada"]
    published = json.loads(gpu.XLSTM_7B_CONFIG.read_text())
    assert lambada["config"]["hf_config"]["weight_mode"] == published["weight_mode"]
    assert lambada["workload"]["requests_per_kind"]["rolling"] == 0
    assert positive(lambada["lambada_openai_projected_s"])
    # The same float64 division, through JSON (which keeps every bit): exact.
    assert lambada["lambada_openai_projected_s"] == 5153 / lambada["engine"]["requests_per_s"]
    assert lambada["torch"]["not_measured"]


def test_a_section_past_its_deadline_is_recorded_not_fatal(tmp_path):
    record = gpu.run_child("xlstm_125m", True, 1.0, tmp_path / "section.json")
    assert record["status"] == "timeout after 1 s"
