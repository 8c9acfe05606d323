"""Where mlflow_lmeval keeps its own files: ``$MLFLOW_LMEVAL_CACHE``, else ``~/.cache/mlflow_lmeval``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MLFLOW_LMEVAL_CACHE") or Path.home() / ".cache" / "mlflow_lmeval")
