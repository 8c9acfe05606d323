"""Tracking failures as one-line errors: unreachable (exit 3) or rejected (exit 4).

MLflow and its HTTP library fail with long, nested exceptions that may carry credentials; every
failure that leaves this package is translated here into a short line without secrets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import UserError
from .redact import redact_uri, scrub_text


class TrackingError(UserError):
    """Publishing failed for another reason (MLflow refused a value, a run is missing, a local
    file could not be staged); the results stay on disk."""

    exit_code = 4


class TrackingUnavailable(TrackingError):
    """The tracking server is unreachable or refused our credentials."""

    exit_code = 3


class TrackingWarning(UserWarning):
    """A tracking failure that training survives (the results wait in a spool)."""


_UNAVAILABLE_HINTS = (
    "max retries exceeded", "connection refused", "failed to establish a new connection",
    "failed with timeout", "timed out", "remotedisconnected", "connection aborted",
    "connection reset", "name or service not known", "unable to open database file",
    "error code 401", "error code 403", "unauthorized", "unauthenticated", "permission_denied",
    "customer_unauthorized", "api request to",
)


def _is_unavailable(error: BaseException) -> bool:
    """Is this a dead/unreachable/unauthorised server rather than a rejected request?"""
    # requests imported lazily: 0.2-0.8 s measured on this machine, and only ever needed after MLflow
    # (which imports it) has failed.
    import requests

    seen = error
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                             ConnectionError, TimeoutError)):
            return True
        code = getattr(seen, "error_code", None)
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(error).lower()
    return any(hint in text for hint in _UNAVAILABLE_HINTS)


def _one_line(error: BaseException, limit: int = 240) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = scrub_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REASONS = (  # (hint in the error's text, what to say), first match wins
    (("error code 401", "unauthorized", "unauthenticated"), "401 unauthorized"),
    (("error code 403", "permission_denied", "forbidden"), "403 forbidden"),
    (("connection refused", "failed to establish a new connection"), "connection refused"),
    (("timed out", "timeout"), "timed out"),
    (("name or service not known", "nodename nor servname", "temporary failure in name resolution"), "host not found"),
    (("unable to open database file",), "cannot open the database file"),
    (("connection reset", "remotedisconnected", "connection aborted"), "connection dropped"),
)


def unavailable_reason(error: BaseException) -> str:
    """A few words for why a server could not be used: refused, timed out, 401, ..."""
    text = str(error).lower()
    for hints, reason in _REASONS:
        if any(hint in text for hint in hints):
            return reason
    return _one_line(error, 60)


def tracking_error(error: BaseException, uri: str, doing: str) -> TrackingError:
    """Translate an MLflow/HTTP failure into a one-line TrackingUnavailable or TrackingError.

    An unreachable server gets a short reason, not the HTTP library's whole exception."""
    if isinstance(error, TrackingError):
        return error
    where = redact_uri(uri)
    if _is_unavailable(error):
        return TrackingUnavailable(f"tracking server {where} unreachable or refused access ({unavailable_reason(error)}) while {doing}")
    return TrackingError(f"{doing} failed (tracking URI {where}): {_one_line(error)}")


@contextlib.contextmanager
def translated(uri: str, doing: str) -> Iterator[None]:
    """Raise any tracking failure inside the block as ``tracking_error``; UserErrors pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        raise tracking_error(error, uri, doing) from error
