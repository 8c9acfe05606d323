"""lm-eval's cache of built requests, keyed on everything that builds them.

lm-eval keys its ``cache_requests`` pickles by task name, shots, rank, chat settings and
tokenizer name only, so a task whose documents or YAML changed under the same name would be
scored with the old requests (or crash on a different document count). Here each task's
requests get a directory of their own under ``<cache root>/lm_eval_requests/<key>``, where the
key digests:

- the task's resolved config (after includes), with any function in it by its source code;
- a digest of its evaluation documents and, with shots, of its few-shot documents;
- the shots, the few-shot seed, the system instruction, the chat template (its text, and the
  special tokens it sees) and the tokenizer;
- the lm-eval version.

What it leaves out: ``limit``. With the cache on, lm-eval builds and stores every document's
requests and slices them to the limit as it reads them, so one entry serves every limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lm_eval.caching.cache as lm_eval_cache
import pyarrow as pa
from lm_eval.api.task import Task

# The few-shot sampler's seed we pass lm-eval (its own default), so the key can name it.
FEWSHOT_SEED = 1234


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a task config; a callable is named and its source digested, so an
    edited ``!function`` helper rebuilds the requests."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value):
        try:
            source = inspect.getsource(value)
        except (OSError, TypeError):
            source = repr(value)
        name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
        return {"callable": name, "source_sha256": hashlib.sha256(source.encode()).hexdigest()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def documents_digest(docs) -> str:
    """sha256 of a document collection: a ``datasets.Dataset`` through its Arrow data, else JSON."""
    digest = hashlib.sha256()
    if hasattr(docs, "with_format") and hasattr(docs, "features"):
        table = docs.with_format("arrow")[:]  # the visible rows only, after any select/shuffle
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    else:
        digest.update(json.dumps(list(docs), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def request_key(task, *, num_fewshot, system_instruction, chat_template, tokenizer: str, documents: str) -> str:
    """32 hex chars naming one task's built requests (see the module docstring)."""
    shots = 0 if num_fewshot is None else num_fewshot
    described = {
        "config": _plain(task.dump_config()),
        "documents": documents,
        "fewshot_documents": documents_digest(task.fewshot_docs()) if shots and task.fewshot_docs() is not None else None,
        "num_fewshot": shots,
        "fewshot_seed": FEWSHOT_SEED,
        "system_instruction": system_instruction,
        "chat_template": chat_template,
        "tokenizer": tokenizer,
        "lm_eval": version("lm_eval"),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def keyed_request_cache(root: Path | None, *, chat_template, tokenizer: str) -> Iterator[dict[str, str]]:
    """While active, every task's ``build_all_requests`` records its documents' digest in the
    yielded dict (task name -> ``sha256:<hex>``, for the evaluation's identity) and, with a
    ``root``, reads and writes lm-eval's request cache in the directory of its own key.
    ``chat_template`` describes the template in use, its text and the special tokens it sees
    (``JaxLM.chat_identity``; None: none); ``root`` None: no caching."""
    original = Task.build_all_requests
    documents: dict[str, str] = {}

    def build_all_requests(task, **kwargs):
        digest = documents[task.config.task] = "sha256:" + documents_digest(task.eval_docs)
        if root is None:
            return original(task, **kwargs)
        key = request_key(task, num_fewshot=task.config.num_fewshot, system_instruction=kwargs.get("system_instruction"),
                          chat_template=chat_template, tokenizer=tokenizer, documents=digest)
        saved = lm_eval_cache.PATH
        lm_eval_cache.PATH = str(root / key)  # lm-eval reads the module global on every load and save
        try:
            return original(task, **kwargs)
        finally:
            lm_eval_cache.PATH = saved

    Task.build_all_requests = build_all_requests
    try:
        yield documents
    finally:
        Task.build_all_requests = original
