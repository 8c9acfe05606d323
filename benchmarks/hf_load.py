"""Loading a Hugging Face xLSTM checkpoint: peak memory against the parameters, and the fingerprint's cost.

    python -m benchmarks.hf_load --json OUT.json [--quick]

A random xLSTM of transformers' layout (NX-AI's xLSTM-7b vocabulary and ratios, width 1024, 24
blocks: 407 M parameters) is written as a ``save_pretrained``-style directory: config.json,
float32 safetensors shards of at most ``SHARD_BYTES`` with their index (numpy and
safetensors.numpy; no torch), and the test fixture's tokenizer. A fresh child process (started
through a small shell, as in ``benchmarks.memory``) imports JAX, then resets its RSS high-water
mark (VmHWM, ``/proc/self/clear_refs``) and calls ``models.hf.load_hf_checkpoint``; the peak is
compared with the bytes of the loaded parameters. The same child then times the checkpoint
fingerprint (sha256 over config, weights and tokenizer) against a plain read of the same files
and against sha256 of bytes already in memory; the files were just written, so they are read
from the page cache (a cold read adds the disk's time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import common
from .memory import reset_peak, run_child, status_kb

# transformers' xLSTMConfig defaults (the 7b) with a smaller width and depth.
HF_CONFIG = {
    "model_type": "xlstm",
    "architectures": ["xLSTMForCausalLM"],
    "vocab_size": 50304,
    "hidden_size": 1024,
    "embedding_dim": 1024,
    "num_hidden_layers": 24,
    "num_blocks": 24,
    "num_heads": 4,
    "qk_dim_factor": 0.5,
    "v_dim_factor": 1.0,
    "ffn_proj_factor": 2.667,
    "ffn_round_up_to_multiple_of": 64,
    "use_bias": False,
    "weight_mode": "single",
    "chunk_size": 64,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}
SHARD_BYTES = 256 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FIXTURE = common.REPO / "tests" / "fixtures" / "hf_xlstm" / "single"
TARGET_RATIO = 1.3


def write_checkpoint(directory: Path, seed: int = 0) -> dict:
    """Random float32 weights for HF_CONFIG, in shards, tensor order as transformers names them."""
    from safetensors.numpy import save_file

    from mlflow_lmeval.models import hf, xlstm

    directory.mkdir(parents=True, exist_ok=True)
    shapes = xlstm.hf_parameter_shapes(xlstm.XLSTMConfig.from_hf(HF_CONFIG))
    rng = np.random.default_rng(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):
        nbytes = 4 * int(np.prod(shapes[name]))
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for index, names in enumerate(groups, start=1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        # One shard in memory at a time; the values only need to be finite.
        tensors = {name: (rng.standard_normal(shapes[name], dtype=np.float32) * 0.02) for name in names}
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(4 * int(np.prod(shape)) for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / hf.INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
    (directory / hf.CONFIG_FILE).write_text(json.dumps(HF_CONFIG, indent=1), encoding="utf-8")
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE / name, directory / name)
    return {"shards": len(groups), "parameters": sum(int(np.prod(s)) for s in shapes.values()),
            "weight_file_bytes": sum((directory / f).stat().st_size for f in set(weight_map.values()))}


def _median_seconds(function, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return common.median(times), times


def child(directory: str, repeats: int) -> dict:
    import jax

    from mlflow_lmeval.models import hf

    jax.devices()  # the runtime's own memory is not the loader's
    path = Path(directory)
    rss_before = status_kb("VmRSS")
    reset = reset_peak()
    start = time.perf_counter()
    checkpoint = hf.load_hf_checkpoint(path)
    jax.block_until_ready(checkpoint.model.params)
    load_s = time.perf_counter() - start
    peak = status_kb("VmHWM") if reset else None
    rss_after = status_kb("VmRSS")
    leaves = jax.tree.leaves(checkpoint.model.params)
    param_bytes = sum(leaf.nbytes for leaf in leaves)

    weights = hf.weight_files(path)
    files = hf._identity_files(path, weights)
    file_bytes = sum(file.stat().st_size for file in files)

    def read_only():
        for file in files:
            with open(file, "rb") as handle:
                while handle.read(1 << 20):
                    pass

    block = np.random.default_rng(0).bytes(256 * 2**20)
    fingerprint_s, fingerprint_all = _median_seconds(lambda: hf.fingerprint(files), repeats)
    read_s, _read_all = _median_seconds(read_only, repeats)
    sha_s, _ = _median_seconds(lambda: hashlib.sha256(block).digest(), repeats)
    gb = file_bytes / 1e9
    return {
        "parameters": sum(leaf.size for leaf in leaves),
        "param_bytes": param_bytes,
        "param_dtypes": sorted({str(leaf.dtype) for leaf in leaves}),
        "rss_before_load_mb": rss_before / 1024,
        "peak_rss_during_load_mb": peak / 1024 if peak else None,
        "rss_after_load_mb": rss_after / 1024,
        "peak_rss_over_param_bytes": peak * 1024 / param_bytes if peak else None,
        "peak_growth_over_param_bytes": (peak - rss_before) * 1024 / param_bytes if peak else None,
        "load_s": load_s,
        "fingerprint": {
            "files": len(files),
            "bytes": file_bytes,
            "seconds": fingerprint_s,
            "seconds_all": fingerprint_all,
            "seconds_per_gb": fingerprint_s / gb,
            "plain_read_seconds_per_gb": read_s / gb,
            "sha256_in_memory_seconds_per_gb": sha_s / (len(block) / 1e9),
        },
    }


def run(work: Path, quick: bool = False) -> dict:
    """Write the checkpoint under ``work``, measure in a fresh process, remove the checkpoint."""
    load_at_start = list(os.getloadavg())
    directory = work / "hf_xlstm_407m"
    start = time.perf_counter()
    written = write_checkpoint(directory)
    write_s = time.perf_counter() - start
    try:
        measured = run_child("benchmarks.hf_load", str(directory), "--repeats", "1" if quick else "3")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ratio = measured["peak_rss_over_param_bytes"]
    return {
        "hf_config": HF_CONFIG,
        "checkpoint": {**written, "shard_bytes_max": SHARD_BYTES, "file_dtype": "float32", "write_s": write_s},
        "load_dtype": "float32",
        **measured,
        "targets": {"peak_rss_over_param_bytes": f"<= {TARGET_RATIO}"},
        "holds": None if ratio is None else bool(ratio <= TARGET_RATIO),
        "load_average": {"start": load_at_start, "end": list(os.getloadavg())},
        "definitions": {
            "peak_rss_over_param_bytes": "the child's RSS high-water mark (VmHWM, reset right before "
            "load_hf_checkpoint; so JAX's runtime, about rss_before_load_mb, is included) / bytes of the loaded "
            "parameters",
            "peak_growth_over_param_bytes": "(that peak - RSS just before loading) / parameter bytes: what loading "
            "itself adds; 1.0 is the parameters alone",
            "fingerprint.seconds_per_gb": "median seconds of models.hf.fingerprint over the checkpoint's identity "
            "files / their size in GB (1e9 bytes), page cache warm; plain_read_* reads the same files without "
            "hashing, sha256_in_memory_* hashes 256 MiB already in memory",
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--quick", action="store_true", help="one fingerprint repeat instead of three")
    parser.add_argument("--child", action="store_true", help="measure one directory (run by run())")
    parser.add_argument("directory", nargs="?", help="--child: the checkpoint directory")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.directory, args.repeats)))
        return
    if not args.json:
        parser.error("give --json OUT.json")
    work = Path(tempfile.mkdtemp(prefix="mlflow_lmeval_hf_load_"))
    try:
        result = run(work, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"command": " ".join(["python", "-m", "benchmarks.hf_load", *(argv if argv is not None else sys.argv[1:])]),
              "machine": common.machine_info(), "hf_load": result}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"peak RSS {result['peak_rss_during_load_mb']:.0f} MB for {result['param_bytes'] / 2**20:.0f} MB of "
          f"parameters: {result['peak_rss_over_param_bytes']:.3f}x (loading adds "
          f"{result['peak_growth_over_param_bytes']:.3f}x); fingerprint {result['fingerprint']['seconds_per_gb']:.2f} s/GB")


if __name__ == "__main__":
    main()
