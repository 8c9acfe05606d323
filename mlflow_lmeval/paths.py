"""Where mlflow_lmeval keeps its own files: ``$MLFLOW_LMEVAL_CACHE``, else ``~/.cache/mlflow_lmeval``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MLFLOW_LMEVAL_CACHE") or Path.home() / ".cache" / "mlflow_lmeval")


def writable_directory_problem(directory: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``directory`` (made if missing), or None when they can.

    Found by trying: the missing directories are made and a byte is written in a file there, then
    both are removed again, so the check leaves nothing behind. Permission bits alone pass root on a
    read-only mount or under /proc.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        return "it is a file, not a directory"
    missing = [d for d in (directory, *directory.parents) if not d.exists()]  # the deepest first
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:  # one byte: a full disk fails here, not after the run
            probe.write(b"\0")
            probe.flush()
    except OSError as error:
        return error.strerror or str(error)
    finally:
        for made in missing:
            with contextlib.suppress(OSError):  # another process may have written into it meanwhile
                made.rmdir()
    return None
