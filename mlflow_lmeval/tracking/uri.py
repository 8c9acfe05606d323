"""Where the tracking store is: the project root, an absolute tracking URI, a SQLite store's file (pure)."""

from __future__ import annotations

import os
from pathlib import Path

_SQLITE = "sqlite:///"


def project_root(start: str | os.PathLike | None = None) -> Path:
    """``DVC_ROOT`` if set (DVC points it at the real repo even in ``exp run --temp`` copies), else
    the nearest directory up from ``start``/cwd holding ``.dvc`` or ``.git``, else one holding
    ``dvc.yaml``, else cwd.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for markers in ((".dvc", ".git"), ("dvc.yaml",)):
        for directory in (here, *here.parents):
            if any((directory / marker).exists() for marker in markers):
                return directory
    return here


def sqlite_parts(uri: str) -> tuple[str, str] | None:
    """(database path as written, ``?query`` or "") of a ``sqlite:///`` URI; None for other stores.

    ``sqlite:////abs/mlflow.db`` has the path ``/abs/mlflow.db``; ``sqlite:///mlflow.db`` a relative one.
    """
    if not uri.startswith(_SQLITE):
        return None
    path, sep, query = uri[len(_SQLITE):].partition("?")
    return path, sep + query


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store with an absolute path; None for any other store."""
    parts = sqlite_parts(uri)
    if parts is None or not parts[0].startswith("/"):
        return None
    return Path(parts[0])


def _absolute_uri(uri: str) -> str:
    """Make a local store URI absolute (relative to DVC_ROOT inside a stage, else cwd)."""
    base = Path(os.environ.get("DVC_ROOT") or os.getcwd())
    parts = sqlite_parts(uri)
    if parts is not None:
        path, query = parts
        if path and not path.startswith("/") and path != ":memory:":
            return f"{_SQLITE}{(base / path).resolve()}{query}"
        return uri
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return (base / uri).resolve().as_uri()
    return uri


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """explicit > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<project root>/mlflow.db``; always absolute.

    Also turns MLflow's telemetry off unless the user asked for it.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"{_SQLITE}{project_root() / 'mlflow.db'}"
    return _absolute_uri(str(uri))
