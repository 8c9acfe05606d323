"""One publisher at a time per tracking store, among the processes of one machine.

MLflow has no atomic "find or create". Two publishers that both look for an evaluation's run (or
a checkpoint's LoggedModel) before either has created it both create one, and the first process
to open a new SQLite file migrates its schema, so several at once fail with "duplicate column".
An exclusive ``flock`` per store closes both races on this machine. The kernel drops the lock
when its holder dies, so a killed publisher never leaves it held. Publishers on other machines do
not see this lock; publish.py converges their duplicates instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..paths import cache_root
from .uri import sqlite_file

WAIT_NOTICE_S = 5.0  # say why we are waiting once the wait is long enough to puzzle someone


def lock_path(uri: str) -> Path:
    """Beside a local SQLite file (every process that opens it sees the same lock); for other
    stores, one file per URI under the cache root."""
    database = sqlite_file(uri)
    if database is not None and os.access(database.parent, os.W_OK):
        return database.with_name(database.name + ".lmeval-lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
    return cache_root() / "locks" / f"{digest}.lock"


@contextlib.contextmanager
def store_lock(uri: str, label: str) -> Iterator[None]:
    """Hold the store's lock for the block; ``label`` names the store in the waiting notice.

    Not reentrant: flock belongs to the open file, so a nested acquire would wait for itself.
    """
    path = lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        started, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and time.monotonic() - started > WAIT_NOTICE_S:
                    print(f"waiting for another publisher to finish with {label} (lock {path})", file=sys.stderr)
                    told = True
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
