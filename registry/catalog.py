"""The SQLite catalog (`catalog.db`): entries, tags and per-name version counters.

WAL mode with a busy timeout lets readers proceed while one writer works; every write runs in a
`BEGIN IMMEDIATE` transaction so two processes never compute the same next version. The schema
evolves through named migration functions, each applied once and recorded in `schema_version`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from adaptory.registry.entry import Entry, FileRecord
from adaptory.registry.errors import StorageError

BUSY_TIMEOUT_MS = 60_000
JSON_COLUMNS = (
    "base_fingerprint", "peft_config", "training_config", "dataset", "metrics",
    "loss_history", "parents", "extra",
)  # fmt: skip


def m001_entries(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE entries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            digest TEXT NOT NULL,
            method TEXT,
            task TEXT,
            base_model TEXT,
            base_fingerprint TEXT,
            peft_config TEXT NOT NULL,
            training_config TEXT NOT NULL DEFAULT '{}',
            dataset TEXT NOT NULL DEFAULT '{}',
            metrics TEXT NOT NULL DEFAULT '{}',
            loss_history TEXT NOT NULL DEFAULT '[]',
            parents TEXT NOT NULL DEFAULT '[]',
            description TEXT,
            extra TEXT NOT NULL DEFAULT '{}',
            files TEXT NOT NULL,
            created_at TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            UNIQUE (name, version)
        )
        """
    )
    conn.execute("CREATE INDEX entries_digest ON entries (digest)")


def m002_tags(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE tags (
            name TEXT NOT NULL,
            tag TEXT NOT NULL,
            entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
            PRIMARY KEY (name, tag)
        )
        """
    )
    conn.execute("CREATE INDEX tags_entry ON tags (entry_id)")


def m003_version_counters(conn: sqlite3.Connection) -> None:
    """Remember the highest version ever given per name, so a removed version is never reused."""
    conn.execute(
        "CREATE TABLE version_counters (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL)"
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_entries,
    m002_tags,
    m003_version_counters,
]


def now_iso() -> str:
    """The current time as ISO-8601 UTC, e.g. 2025-05-01T12:00:00.123456+00:00."""
    return datetime.now(UTC).isoformat()


class Catalog:
    """Connections to one `catalog.db`; a fresh connection per operation keeps it thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def initialize(self) -> list[str]:
        """Switch to WAL and apply pending migrations; return the names applied now."""
        conn = self.connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            with self._transaction(conn):
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                done = {row[0] for row in conn.execute("SELECT name FROM schema_version")}
                applied = []
                for migration in MIGRATIONS:
                    if migration.__name__ not in done:
                        migration(conn)
                        conn.execute(
                            "INSERT INTO schema_version (name, applied_at) VALUES (?, ?)",
                            (migration.__name__, now_iso()),
                        )
                        applied.append(migration.__name__)
                return applied
        finally:
            conn.close()

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        conn = self.connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """One `BEGIN IMMEDIATE` transaction: committed on success, rolled back on any exception."""
        conn = self.connect()
        try:
            with self._transaction(conn):
                yield conn
        finally:
            conn.close()

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StorageError(
                f"the catalog is busy or unwritable: {exc}; nothing was changed"
            ) from exc
        # SQLite may already have rolled back by itself (a full disk at COMMIT or mid-write):
        # roll back only what is still open, and report write failures as StorageError.
        try:
            yield
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StorageError(f"writing the catalog failed: {exc}; nothing was changed") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StorageError(f"writing the catalog failed: {exc}; nothing was changed") from exc

    # queries ------------------------------------------------------------------------------

    @staticmethod
    def next_version(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute(
            """
            SELECT max(coalesce((SELECT max(version) FROM entries WHERE name = ?), 0),
                       coalesce((SELECT last_version FROM version_counters WHERE name = ?), 0))
            """,
            (name, name),
        ).fetchone()
        return row[0] + 1

    @staticmethod
    def insert(conn: sqlite3.Connection, values: dict) -> int:
        """Insert one entry row (JSON columns given as Python values) and bump the name's counter."""
        row = {k: dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in values.items()}
        row["files"] = dumps(
            {k: {"sha256": v.sha256, "size": v.size} for k, v in row["files"].items()}
        )
        columns = ", ".join(row)
        marks = ", ".join(f":{column}" for column in row)
        cursor = conn.execute(f"INSERT INTO entries ({columns}) VALUES ({marks})", row)
        conn.execute(
            """
            INSERT INTO version_counters (name, last_version) VALUES (?, ?)
            ON CONFLICT (name) DO UPDATE SET last_version = max(last_version, excluded.last_version)
            """,
            (values["name"], values["version"]),
        )
        return cursor.lastrowid

    @staticmethod
    def set_tag(conn: sqlite3.Connection, name: str, tag: str, entry_id: int) -> None:
        conn.execute(
            "INSERT INTO tags (name, tag, entry_id) VALUES (?, ?, ?) "
            "ON CONFLICT (name, tag) DO UPDATE SET entry_id = excluded.entry_id",
            (name, tag, entry_id),
        )

    @staticmethod
    def remove_tag(conn: sqlite3.Connection, entry_id: int, tag: str) -> bool:
        return (
            conn.execute(
                "DELETE FROM tags WHERE entry_id = ? AND tag = ?", (entry_id, tag)
            ).rowcount
            > 0
        )

    @staticmethod
    def delete(conn: sqlite3.Connection, entry_id: int) -> None:
        conn.execute("DELETE FROM tags WHERE entry_id = ?", (entry_id,))
        conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))

    @staticmethod
    def update_fields(conn: sqlite3.Connection, entry_id: int, values: dict) -> None:
        row = {k: dumps(v) if k in JSON_COLUMNS else v for k, v in values.items()}
        assignments = ", ".join(f"{column} = :{column}" for column in row)
        conn.execute(f"UPDATE entries SET {assignments} WHERE id = :id", {**row, "id": entry_id})

    def select(self, conn: sqlite3.Connection, where: str = "", params: tuple = ()) -> list[Entry]:
        """Entries matching a SQL condition on `entries e`, ordered by name and version, with tags."""
        rows = conn.execute(
            f"SELECT e.* FROM entries e {'WHERE ' + where if where else ''} ORDER BY e.name, e.version",
            params,
        ).fetchall()
        if not rows:
            return []
        tags: dict[int, list[str]] = {}
        marks = ", ".join("?" for _ in rows)
        for tag_row in conn.execute(
            f"SELECT entry_id, tag FROM tags WHERE entry_id IN ({marks}) ORDER BY tag",
            tuple(row["id"] for row in rows),
        ):
            tags.setdefault(tag_row["entry_id"], []).append(tag_row["tag"])
        return [row_to_entry(row, tags.get(row["id"], [])) for row in rows]

    @staticmethod
    def names(conn: sqlite3.Connection) -> list[str]:
        return [row[0] for row in conn.execute("SELECT DISTINCT name FROM entries ORDER BY name")]

    @staticmethod
    def digests(conn: sqlite3.Connection) -> set[str]:
        return {row[0] for row in conn.execute("SELECT DISTINCT digest FROM entries")}


def dumps(value: object) -> str:
    """JSON text for a metadata value; numpy/torch scalars and paths become plain JSON."""
    return json.dumps(value, sort_keys=True, default=_to_plain)


def _to_plain(value: object) -> object:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (Path, datetime)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be stored as JSON")


def row_to_entry(row: sqlite3.Row, tags: list[str]) -> Entry:
    data = dict(row)
    for column in JSON_COLUMNS:
        data[column] = json.loads(data[column]) if data[column] is not None else None
    files = {name: FileRecord(**record) for name, record in json.loads(data.pop("files")).items()}
    return Entry(**data, tags=list(tags), files=files)
