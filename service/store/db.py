"""SQLite in WAL mode with versioned migrations, one namespace per owner (events, greeter, car_finder, ...).

Each namespace has an ordered list of migrations; `user_version`-style bookkeeping lives in `schema_migrations`,
so a database written by an older build is brought forward and one from a newer build is refused.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from service.rpc_errors import UnavailableError

_CORE = "core"


class StoreError(RuntimeError):
    """The store cannot do what was asked (disk full, read-only, newer schema); the message says why."""


class StoreUnavailableError(StoreError, UnavailableError):
    """Writes are refused (disk full or read-only); reads may still work."""


class Database:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrations: dict[str, list[str]] = {}
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._close_hooks: list = []
        self._pragmas: list[str] = []

    def add_close_hook(self, hook) -> None:
        """`hook()` runs at the start of close(), while connections still work (writers commit what is queued)."""
        self._close_hooks.append(hook)

    def register_migrations(self, namespace: str, migrations: list[str]) -> None:
        """Migrations are append-only: never edit one that has shipped, add the next."""
        known = self._migrations.get(namespace)
        if known is not None and known != migrations[: len(known)]:
            raise StoreError(f"migrations for {namespace!r} registered twice with different contents")
        self._migrations[namespace] = list(migrations)

    def connect(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not cross threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed event survives power loss, not just a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            self._local.pragmas = 0
            with self._lock:
                self._all.append(conn)
        if self._local.pragmas < len(self._pragmas):
            with self._lock:
                pending = self._pragmas[self._local.pragmas:]
                self._local.pragmas = len(self._pragmas)
            for pragma in pending:
                conn.execute(f"PRAGMA {pragma}")
        return conn

    def migrate(self) -> dict[str, int]:
        """Apply pending migrations of every registered namespace; returns the versions now in force."""
        conn = self.connect()
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "namespace TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        versions = {}
        for namespace, migrations in self._migrations.items():
            row = conn.execute("SELECT version FROM schema_migrations WHERE namespace=?", (namespace,)).fetchone()
            current = row["version"] if row else 0
            if current > len(migrations):
                raise StoreError(f"database {self.path} has {namespace} schema v{current}, "
                                 f"newer than this build knows (v{len(migrations)})")
            for version, sql in enumerate(migrations[current:], start=current + 1):
                with self.transaction() as tx:
                    tx.executescript_in_tx(sql)
                    tx.execute("INSERT INTO schema_migrations(namespace, version) VALUES(?, ?) "
                               "ON CONFLICT(namespace) DO UPDATE SET version=excluded.version", (namespace, version))
            versions[namespace] = len(migrations)
        return versions

    def transaction(self) -> _Transaction:
        return _Transaction(self.connect())

    def pragma_everywhere(self, pragma: str) -> None:
        """A PRAGMA (e.g. `query_only=ON` for maintenance or a fault test) for every thread's connection: each
        applies it on its next use (sqlite3 connections may not be touched from another thread)."""
        with self._lock:
            self._pragmas.append(pragma)

    def close(self) -> None:
        for hook in list(self._close_hooks):
            hook()
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()


class _Transaction:
    """`with db.transaction() as tx:` BEGIN IMMEDIATE ... COMMIT, mapping disk errors to StoreUnavailableError."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> _Transaction:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _map_error(exc) from exc
        return self

    def execute(self, sql: str, params=()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.OperationalError as exc:
            raise _map_error(exc) from exc

    def executescript_in_tx(self, sql: str) -> None:
        # executescript() would COMMIT first; run statement by statement inside our transaction instead.
        for statement in _split_sql(sql):
            self.execute(statement)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.OperationalError as commit_exc:
                self._rollback()
                raise _map_error(commit_exc) from commit_exc
        self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL on COMMIT): only roll back what is open.
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.OperationalError:
                pass


def _split_sql(sql: str) -> list[str]:
    statements, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip():
        statements.append(buf.strip())
    return statements


def _map_error(exc: sqlite3.OperationalError) -> StoreError:
    text = str(exc).lower()
    if "disk is full" in text or "database or disk is full" in text:
        return StoreUnavailableError(f"data disk is full: {exc}")
    if "readonly" in text or "read-only" in text or "attempt to write" in text:
        return StoreUnavailableError(f"data store is read-only: {exc}")
    return StoreError(str(exc))
