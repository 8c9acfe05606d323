"""One entry point for every checkpoint format, told apart by the file each one holds:

    metadata.json   ours (``models/checkpoint.py``, written by ``save_checkpoint``)
    config.json     a Hugging Face ``save_pretrained`` directory (``models/hf.py``)

Importing this module imports neither format's loader (nor JAX) until a checkpoint is loaded:
JAX alone took 1.9-3.4 s to import on this machine, and telling formats apart needs none of it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..errors import UserError

OURS = "mlflow_lmeval"
HUGGING_FACE = "hf"
# checkpoint.METADATA_FILE and hf.CONFIG_FILE, named here so that telling formats apart stays cheap
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.json"


def require_directory(path: Path) -> None:
    """A one-line UserError unless ``path`` is a directory: a checkpoint of any format is one."""
    if path.is_dir():
        return
    if path.exists():
        raise UserError(f"not a checkpoint: {path} is a file; a checkpoint is a directory "
                        f"(holding {METADATA_FILE} or {CONFIG_FILE})")
    raise UserError(f"checkpoint not found: {path}")


def checkpoint_format(path: str | os.PathLike) -> str:
    """``OURS`` or ``HUGGING_FACE``; a one-line UserError for a directory of neither kind."""
    path = Path(path)
    require_directory(path)
    if (path / METADATA_FILE).is_file():
        return OURS
    if (path / CONFIG_FILE).is_file():
        return HUGGING_FACE
    raise UserError(f"not a checkpoint: {path} has neither {METADATA_FILE} (mlflow_lmeval) "
                    f"nor {CONFIG_FILE} (Hugging Face)")


def load_any(path: str | os.PathLike, *, dtype: Any = "float32"):
    """A ``Checkpoint`` or an ``HFCheckpoint``: both offer ``model``, ``tokenizer``, ``path``,
    ``step``, ``fingerprint``, ``mlflow_run_id`` and ``logits(tokens)``.

    ``dtype`` ("float32" or "bfloat16") is the weights' dtype in memory: a Hugging Face checkpoint
    is read straight into it; ours, saved in float32, is cast after loading.
    """
    if checkpoint_format(path) == HUGGING_FACE:
        from .hf import load_hf_checkpoint

        return load_hf_checkpoint(path, dtype=dtype)
    from .checkpoint import load_checkpoint
    from .protocol import cast_floating

    checkpoint = load_checkpoint(path)
    # Saved in float32; another dtype is a cast of the same weights (so the fingerprint is unchanged).
    return checkpoint if dtype in ("float32", None) else dataclasses.replace(
        checkpoint, params=cast_floating(checkpoint.params, dtype))
