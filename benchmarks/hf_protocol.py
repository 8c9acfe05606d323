"""What both sides of B7 share: the child's answer prefix, digests, and the per-request recorder.

Standard library only, so that the hf child (``hf_child.py``, torch) and the parent
(``hf_backend.py``, JAX) import it alike.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

PROTOCOL = "B7JSON "  # prefix of the child's answer lines; lm-eval and transformers print too


def _sha256_files(files) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):  # 100 M float32 parameters are 400 MB
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def weights_digest(directory: Path) -> dict:
    """Digests of the safetensors files and of the tokenizer files in a save_pretrained directory."""
    directory = Path(directory)
    return {
        "safetensors": _sha256_files(sorted(directory.glob("*.safetensors"))),
        "tokenizer": _sha256_files([directory / "tokenizer.json", directory / "tokenizer_config.json"]),
    }


def requests_digest(pairs) -> str:
    """sha256 of the sorted (context tokens, continuation tokens) pairs a model was asked to score."""
    rows = sorted(json.dumps([[int(t) for t in context], [int(t) for t in continuation]]) for context, continuation in pairs)
    return "sha256:" + hashlib.sha256("\n".join(rows).encode()).hexdigest()


def metrics_of(output: dict) -> dict:
    return {task: {k: v for k, v in row.items() if not k.endswith("_stderr,none") and k != "alias"}
            for task, row in output["results"].items()}


class ResponseRecorder:
    """Wraps an lm-eval LM's ``loglikelihood`` and ``loglikelihood_rolling`` (instance attributes,
    which lm-eval's evaluator calls): every request's [loglik, is_greedy or None] by its arguments."""

    def __init__(self, lm):
        self.reset()
        for name in ("loglikelihood", "loglikelihood_rolling"):
            setattr(lm, name, self._wrap(name, getattr(lm, name)))

    def reset(self) -> None:
        self.responses: dict[str, list] = {}
        self.seconds: dict[str, float] = {}  # by method: where a side spends its time, per request type

    def _wrap(self, name, method):
        def recorded(requests, *args, **kwargs):
            start = time.perf_counter()
            results = method(requests, *args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            for request, result in zip(requests, results):
                pair = isinstance(result, (tuple, list))
                self.responses[json.dumps([name, *request.args])] = (
                    [float(result[0]), bool(result[1])] if pair else [float(result), None])
            return results
        return recorded
