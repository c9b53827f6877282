"""The SQLite catalog (`catalog.db`): entries, tags, per-name version counters and the life
cycle of blobs (which digests an `add` is about to publish, which ones `rm` released).

WAL mode with a busy timeout lets readers proceed while one writer works; every write runs in a
`BEGIN IMMEDIATE` transaction so two processes never compute the same next version. The schema
evolves through named migration functions, each applied once and recorded in `schema_version`.
A catalog that SQLite reports as corrupt raises `CatalogDamaged`, never a raw sqlite3 error, and
`health()` checks both SQLite's own structures and every row's digest against its file list.
Kept as one module (~530 lines): the schema, its migrations and all the SQL run against it.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from adaptory.registry.entry import Entry, FileRecord
from adaptory.registry.errors import CatalogDamaged, StorageError

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


def m004_blob_lifecycle(conn: sqlite3.Connection) -> None:
    """Record which blobs may be deleted: `gc` removes a blob only when no entry references it
    AND the catalog says why it exists unreferenced (an `add` that never finished, an `rm`).
    A blob the catalog knows nothing about (a lost or damaged catalog) is never collected."""
    conn.execute("CREATE TABLE pending_blobs (digest TEXT PRIMARY KEY, since TEXT NOT NULL)")
    conn.execute("CREATE TABLE released_blobs (digest TEXT PRIMARY KEY, since TEXT NOT NULL)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_entries,
    m002_tags,
    m003_version_counters,
    m004_blob_lifecycle,
]


def now_iso() -> str:
    """The current time as ISO-8601 UTC, e.g. 2025-05-01T12:00:00.123456+00:00."""
    return datetime.now(UTC).isoformat()


def damaged(path: Path, exc: BaseException) -> CatalogDamaged:
    """The error for a catalog SQLite (or its JSON columns) cannot read."""
    return CatalogDamaged(
        f"{path} is damaged ({exc})",
        hint="nothing was changed and no stored adapter was deleted; restore catalog.db from a "
        "backup, or run `adaptory recover` (docs/REGISTRY.md, 'A damaged catalog')",
    )


class Catalog:
    """Connections to one `catalog.db`; a fresh connection per operation keeps it thread-safe.
    (~330 lines on purpose: every SQL statement against the catalog lives in this class.)

    On a home this process cannot write (a read-only mount, another user's files) reads still
    work: SQLite cannot create WAL's shared-memory file there, so the file is opened immutable.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        """Whether a catalog file with any content is there (SQLite treats 0 bytes as new)."""
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def writable(self) -> bool:
        folder_ok = os.access(self.path.parent, os.W_OK)
        return folder_ok and (not self.path.exists() or os.access(self.path, os.W_OK))

    def connect(self, *, read_only: bool = False) -> sqlite3.Connection:
        try:
            if read_only:
                uri = f"{self.path.resolve().as_uri()}?immutable=1"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            else:
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
                )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if _is_corruption(exc):
                raise damaged(self.path, exc) from exc
            raise StorageError(f"cannot open {self.path}: {exc}") from exc
        return conn

    def version(self, conn: sqlite3.Connection) -> list[str]:
        """Names of the migrations this catalog has had ([] for a new, empty file)."""
        try:
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone():
                return []
            return [row[0] for row in conn.execute("SELECT name FROM schema_version")]
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            raise self._read_error(exc) from exc

    def pending_migrations(self, conn: sqlite3.Connection) -> list[str]:
        done = set(self.version(conn))
        return [m.__name__ for m in MIGRATIONS if m.__name__ not in done]

    def initialize(self) -> list[str]:
        """Switch to WAL and apply pending migrations; return the names applied now."""
        conn = self.connect()
        try:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
                if _is_corruption(exc):
                    raise damaged(self.path, exc) from exc
                raise StorageError(f"cannot open {self.path}: {exc}") from exc
            with self._transaction(conn):
                if not self.version(conn):
                    _create_schema_version(conn)
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

    def check_schema(self, conn: sqlite3.Connection) -> None:
        """CatalogDamaged unless the tables and indexes are exactly what the recorded migrations
        create: a flipped bit in sqlite_master's SQL text passes SQLite's integrity check."""
        applied = self.version(conn)
        try:
            actual = _schema(conn)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            raise self._read_error(exc) from exc
        if actual == _expected_schema(tuple(applied)):
            return
        unknown = sorted(set(applied) - {m.__name__ for m in MIGRATIONS})
        reason = (
            f"it records migrations this Adaptory does not know ({', '.join(unknown)}): written "
            "by a newer Adaptory, or damaged"
            if unknown
            else "its tables differ from what its migrations create"
        )
        raise damaged(self.path, reason)

    @contextmanager
    def reading(self, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
        conn = self.connect(read_only=read_only)
        try:
            self.check_schema(conn)
            yield conn
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            raise self._read_error(exc) from exc
        finally:
            conn.close()

    def _read_error(self, exc: Exception):
        if _is_corruption(exc):
            return damaged(self.path, exc)
        return StorageError(f"reading {self.path} failed: {exc}")

    @staticmethod
    @contextmanager
    def empty() -> Iterator[sqlite3.Connection]:
        """An in-memory catalog with the current schema: what a home without a catalog holds."""
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            _create_schema_version(conn)
            for migration in MIGRATIONS:
                migration(conn)
            yield conn
        finally:
            conn.close()

    def health(self, conn: sqlite3.Connection) -> list[str]:
        """What is wrong with this catalog: SQLite's integrity check (pages, indexes against
        their tables), then every entry row's JSON columns and its digest against its file list
        (a flipped bit in a digest would otherwise point gc at a live adapter)."""
        from adaptory.registry.store import manifest_digest

        problems: list[str] = []
        try:
            problems = [
                row[0] for row in conn.execute("PRAGMA integrity_check(20)") if row[0] != "ok"
            ]
            if problems:
                return [f"SQLite integrity check: {p}" for p in problems]
            for row in conn.execute("SELECT * FROM entries NOT INDEXED").fetchall():
                where = f"entry #{row['id']} ({row['name']}:{row['version']})"
                try:
                    entry = row_to_entry(row, [])
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    problems.append(f"{where}: unreadable metadata ({exc})")
                    continue
                if (
                    not isinstance(entry.digest, str)
                    or manifest_digest(entry.files) != entry.digest
                ):
                    problems.append(f"{where}: its digest does not match its file list")
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            problems.append(f"SQLite: {exc}")
        return problems

    @contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """One `BEGIN IMMEDIATE` transaction: committed on success, rolled back on any exception."""
        conn = self.connect()
        try:
            self.check_schema(conn)
            with self._transaction(conn):
                yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            raise self._write_error(exc, "the catalog is busy or unwritable") from exc
        # SQLite may already have rolled back by itself (a full disk at COMMIT or mid-write):
        # roll back only what is still open, and report write failures as StorageError.
        try:
            yield
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            _rollback(conn)
            raise self._write_error(exc, "writing the catalog failed") from exc
        except BaseException:
            _rollback(conn)
            raise
        try:
            conn.execute("COMMIT")
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            _rollback(conn)
            raise self._write_error(exc, "writing the catalog failed") from exc

    def _write_error(self, exc: Exception, what: str):
        if _is_corruption(exc):
            return damaged(self.path, exc)
        return StorageError(
            f"{what}: {exc}; nothing was changed",
            hint="check free space and permissions of the registry home",
        )

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
        entries = []
        for row in rows:
            try:
                entries.append(row_to_entry(row, tags.get(row["id"], [])))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise damaged(self.path, f"entry #{row['id']}: unreadable metadata: {exc}") from exc
        return entries

    @staticmethod
    def names(conn: sqlite3.Connection) -> list[str]:
        return [row[0] for row in conn.execute("SELECT DISTINCT name FROM entries ORDER BY name")]

    @staticmethod
    def digests(conn: sqlite3.Connection) -> set[str]:
        """Every digest an entry references, read by a table scan: a damaged index on `digest`
        must not hide a live adapter from gc."""
        return {row[0] for row in conn.execute("SELECT digest FROM entries NOT INDEXED")}

    @staticmethod
    def collectable(conn: sqlite3.Connection) -> set[str]:
        """Digests the catalog knows to be garbage once unreferenced: released by `rm`, or
        published by an `add` that never committed."""
        return {
            row[0]
            for row in conn.execute(
                "SELECT digest FROM released_blobs UNION SELECT digest FROM pending_blobs"
            )
        }

    @staticmethod
    def mark_pending(conn: sqlite3.Connection, digest: str) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO pending_blobs (digest, since) VALUES (?, ?)", (digest, now_iso())
        )

    @staticmethod
    def mark_referenced(conn: sqlite3.Connection, digest: str) -> None:
        conn.execute("DELETE FROM pending_blobs WHERE digest = ?", (digest,))
        conn.execute("DELETE FROM released_blobs WHERE digest = ?", (digest,))

    @staticmethod
    def mark_released(conn: sqlite3.Connection, digest: str) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO released_blobs (digest, since) VALUES (?, ?)",
            (digest, now_iso()),
        )

    @staticmethod
    def forget_blobs(conn: sqlite3.Connection, digests: set[str]) -> None:
        for digest in digests:
            conn.execute("DELETE FROM pending_blobs WHERE digest = ?", (digest,))
            conn.execute("DELETE FROM released_blobs WHERE digest = ?", (digest,))

    @staticmethod
    def has_history(conn: sqlite3.Connection) -> bool:
        """Whether entries were ever added to this catalog (names keep their version counters)."""
        return conn.execute("SELECT 1 FROM version_counters LIMIT 1").fetchone() is not None


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


def _create_schema_version(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE schema_version (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")


def _schema(conn: sqlite3.Connection) -> list[tuple]:
    return [
        tuple(row)
        for row in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master "
            "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
        )
    ]


@functools.cache
def _expected_schema(applied: tuple[str, ...]) -> list[tuple]:
    """sqlite_master's rows for a catalog that has had the migrations named in `applied`."""
    if not applied:
        return []
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        _create_schema_version(conn)
        for migration in MIGRATIONS:
            if migration.__name__ in applied:
                migration(conn)
        return _schema(conn)
    finally:
        conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # SQLite rolls back an unfinished transaction when the connection closes


def _is_corruption(exc: BaseException) -> bool:
    """sqlite3 raises a bare DatabaseError for corrupt files ("malformed", "not a database"),
    OperationalError for busy/locked/IO trouble and IntegrityError for a broken constraint (a
    caller's mistake, not a damaged file); only the first is damage, as is text that is not
    UTF-8 (UnicodeDecodeError while fetching a TEXT column)."""
    text = str(exc).lower()
    return not isinstance(exc, _NOT_DAMAGE) or any(
        word in text for word in ("malformed", "not a database", "corrupt")
    )


_NOT_DAMAGE = (
    sqlite3.OperationalError,
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
)


def row_to_entry(row: sqlite3.Row, tags: list[str]) -> Entry:
    data = dict(row)
    for column in JSON_COLUMNS:
        data[column] = json.loads(data[column]) if data[column] is not None else None
    files = {name: FileRecord(**record) for name, record in json.loads(data.pop("files")).items()}
    return Entry(**data, tags=list(tags), files=files)
