"""A persistent cache of scored pieces and generations, so an interrupted evaluation resumes.

Results are written batch by batch in SQLite's WAL mode, so a ``kill -9`` loses at most the batch
in flight. Keys hold everything that decides a result: the checkpoint fingerprint and the scoring
mode (in a namespace), and the request's tokens. Settings that do not change a score (chunk and
batch size, workers) are not part of the key, so they can change between attempts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import UserError
from .paths import cache_root

# 2: a piece also stores its loss by position (engine/positions.py), without which a cached
# response could not give results.json the same table as a fresh one.
SCHEMA_VERSION = 2
FILE_NAME = "responses.sqlite"
# Written into the SQLite header (PRAGMA application_id, bytes 68-71), before anything else: the
# header survives a torn page, so a damaged cache still shows it is ours and may be moved aside.
# Any other file given as the cache (a user's database, a text file) is refused, never replaced.
APPLICATION_ID = int.from_bytes(b"lmev", "big")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_TABLES = ("pieces", "generations")


def default_path() -> Path:
    return cache_root() / FILE_NAME


def cache_file(path: str | os.PathLike | None = None) -> Path:
    """The cache file that ``path`` names: a directory stands for the ``responses.sqlite`` in it,
    like the default ``$MLFLOW_LMEVAL_CACHE``."""
    path = Path(path) if path else default_path()
    return path / FILE_NAME if path.is_dir() else path


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing. Without a ``-wal`` file (a cache closed cleanly) SQLite's
    read-only mode would still create ``-wal`` and ``-shm`` files and leave them, so it is opened
    immutable; with one (a writer running, or killed), read-only reads what the log holds."""
    wal = Path(str(path) + "-wal").exists()
    return sqlite3.connect(f"{path.absolute().as_uri()}?{'mode=ro' if wal else 'immutable=1'}", uri=True)


def _is_older_cache(path: Path) -> bool:
    """A cache from before APPLICATION_ID: its ``meta`` table has our ``schema`` row, beside a ``pieces``
    table (every schema had one; an old one may lack the tables added since)."""
    try:
        with contextlib.closing(_read_only(path)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return {"meta", "pieces"} <= tables and db.execute("SELECT 1 FROM meta WHERE name = 'schema'").fetchone() is not None
    except sqlite3.Error:
        return False


def check_ours(path: Path) -> None:
    """A one-line UserError unless ``path`` is missing, empty, or a cache this module wrote; only
    such a file may be written into, or moved aside when damaged."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
    except FileNotFoundError:
        return
    except OSError as error:
        raise UserError(f"cannot read the response cache {path}: {error.strerror or error}") from None
    if not header:  # SQLite's empty database: a cache whose process stopped before its first write
        return
    is_sqlite = header.startswith(_SQLITE_MAGIC) and len(header) == 100
    if is_sqlite and (int.from_bytes(header[68:72], "big") == APPLICATION_ID or _is_older_cache(path)):
        return
    what = "a SQLite database of something else" if is_sqlite else "not a SQLite file"
    raise UserError(f"{path} is not a response cache ({what}); it is left as it is: name a new file, "
                    f"or a directory to hold {FILE_NAME} (--cache_path)")


def _count(db: sqlite3.Connection) -> int:
    return sum(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in _TABLES)


def describe(path: str | os.PathLike | None = None) -> str:
    """One line on the cache at ``path`` (``cache info``), read only: nothing is created, moved or changed."""
    path = cache_file(path)
    if not path.exists():
        return f"{path}: no response cache yet"
    check_ours(path)
    if path.stat().st_size == 0:
        return f"{path}: 0 cached responses"
    try:
        with contextlib.closing(_read_only(path)) as db:
            schema = (db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() or [None])[0]
            count = _count(db)
    except sqlite3.DatabaseError as error:
        return f"{path}: damaged ({error}); the next evaluation moves it aside and starts a new cache"
    if schema != str(SCHEMA_VERSION):
        return f"{path}: written with schema {schema}, not {SCHEMA_VERSION}; the next evaluation moves it aside"
    return f"{path}: {count} cached responses"


def namespace(fingerprint: str, mode: str, scale_logits: bool, dtype: str) -> str:
    """Everything outside the request that decides its score."""
    return hashlib.sha256(json.dumps([SCHEMA_VERSION, fingerprint, mode, scale_logits, dtype]).encode()).hexdigest()[:32]


def request_key(namespace_: str, *parts) -> bytes:
    """A digest of the namespace and the request's parts (token lists, strings, numbers)."""
    digest = hashlib.sha256(namespace_.encode())
    for part in parts:
        if isinstance(part, (list, tuple, np.ndarray)):
            digest.update(b"t" + np.asarray(part, np.int64).tobytes() + b"|")
        else:
            digest.update(b"s" + json.dumps(part).encode() + b"|")
    return digest.digest()


class ResponseCache:
    """``pieces``: (key, sequence_idx) -> (loglik, num_tokens, greedy, loss by position);
    ``generations``: key -> tokens."""

    def __init__(self, path: str | os.PathLike | None = None):
        """``path``: the cache file, or a directory for its ``responses.sqlite`` (default: $MLFLOW_LMEVAL_CACHE)."""
        self.path = cache_file(path)
        check_ours(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the response cache directory {self.path.parent}: {error.strerror}") from None
        self._db = self._open_checked()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        # First, while a new file is still in rollback mode, so the id reaches the main file's header at once.
        if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS pieces (
                namespace TEXT, key BLOB, sequence_idx INTEGER, loglik REAL, num_tokens INTEGER, greedy INTEGER,
                positions TEXT, PRIMARY KEY (key, sequence_idx));
            CREATE TABLE IF NOT EXISTS generations (namespace TEXT, key BLOB PRIMARY KEY, tokens TEXT);
            """
        )
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        return db

    def _open_checked(self) -> sqlite3.Connection:
        """Open the cache; a torn or corrupt file of ours (``check_ours``) is moved aside and rebuilt, never trusted."""
        try:
            db = self._connect()
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
            (schema,) = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if verdict == "ok" and schema == str(SCHEMA_VERSION):
                return db
            db.close()
            what = f"was damaged ({verdict})" if verdict != "ok" else f"was written with schema {schema}, not {SCHEMA_VERSION}"
        except sqlite3.DatabaseError as error:
            what = f"was damaged ({error})"
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.replace(Path(str(aside) + suffix))
        warnings.warn(f"response cache {self.path} {what}; moved to {aside.name} and rebuilt")
        return self._connect()

    def get_pieces(self, keys: Iterable[tuple[bytes, int]]) -> dict[tuple[bytes, int], tuple[float, int, bool, str]]:
        """(key, sequence_idx) -> (loglik, num_tokens, greedy, positions) of the stored pieces."""
        found = {}
        keys = list(keys)
        for start in range(0, len(keys), 400):
            block = keys[start : start + 400]
            where = " OR ".join(["(key = ? AND sequence_idx = ?)"] * len(block))
            rows = self._db.execute(
                f"SELECT key, sequence_idx, loglik, num_tokens, greedy, positions FROM pieces WHERE {where}",
                [value for pair in block for value in pair],
            )
            for key, sequence_idx, loglik, num_tokens, greedy, positions in rows:
                found[(key, sequence_idx)] = (loglik, num_tokens, bool(greedy), positions)
        return found

    def put_pieces(self, namespace_: str, rows: Iterable[tuple[bytes, int, float, int, bool, str]]) -> None:
        """Rows of (key, sequence_idx, loglik, num_tokens, greedy, positions: ``positions.encode``'s
        text). One transaction: a batch is either wholly in the cache or not at all."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO pieces VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(namespace_, key, int(seq), float(loglik), int(n), int(bool(greedy)), str(positions))
                 for key, seq, loglik, n, greedy, positions in rows],
            )

    def get_generations(self, keys: list[bytes]) -> dict[bytes, list[int]]:
        found = {}
        for start in range(0, len(keys), 800):
            block = keys[start : start + 800]
            rows = self._db.execute(f"SELECT key, tokens FROM generations WHERE key IN ({','.join('?' * len(block))})", block)
            found.update((key, json.loads(tokens)) for key, tokens in rows)
        return found

    def put_generations(self, namespace_: str, rows: Iterable[tuple[bytes, list[int]]]) -> None:
        """One transaction per finished batch of generations."""
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO generations VALUES (?, ?, ?)",
                                 [(namespace_, key, json.dumps(tokens)) for key, tokens in rows])

    def count(self) -> int:
        return _count(self._db)

    def clear(self) -> int:
        removed = self.count()
        with self._transaction():
            self._db.execute("DELETE FROM pieces")
            self._db.execute("DELETE FROM generations")
        self._db.execute("VACUUM")
        return removed

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
