"""The catalog on its own, on a real SQLite file: migrations, schema checks, transactions, every
query, and the JSON columns, each checked with raw sqlite3 reads of the same file.

Fast (no PEFT, no torch): `make mutation` runs these first for registry/catalog.py.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from adaptory.registry.catalog import (
    BUSY_TIMEOUT_MS,
    MIGRATIONS,
    Catalog,
    _is_corruption,
    dumps,
    m001_entries,
    m002_tags,
    now_iso,
)
from adaptory.registry.entry import FileRecord
from adaptory.registry.errors import CatalogDamaged, StorageError
from adaptory.registry.store import manifest_digest

NAMES = ["m001_entries", "m002_tags", "m003_version_counters", "m004_blob_lifecycle"]


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    cat = Catalog(tmp_path / "catalog.db")
    cat.initialize()
    return cat


def raw(cat: Catalog, sql: str, params: tuple = ()) -> list[tuple]:
    """The oracle: a plain sqlite3 connection of its own to the same file."""
    conn = sqlite3.connect(cat.path)
    try:
        return [tuple(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def values(name: str = "a", version: int = 1, **over) -> dict:
    files = over.pop("files", {"adapter_model.safetensors": FileRecord("ab" * 32, 10)})
    row = {
        "name": name,
        "version": version,
        "digest": manifest_digest(files),
        "method": "lora",
        "task": "causal-lm",
        "base_model": "tiny",
        "base_fingerprint": {"weights": "w", "tokenizer": "t"},
        "peft_config": {"r": 4, "alpha": 8},
        "training_config": {},
        "dataset": {},
        "metrics": {"loss": 0.5},
        "loss_history": [{"step": 1, "loss": 0.5}],
        "parents": [],
        "description": None,
        "extra": {"labels": ["b", "a"]},
        "files": files,
        "created_at": "2025-01-01T00:00:00+00:00",
        "size_bytes": 10,
    }
    row.update(over)
    return row


def add(cat: Catalog, **kwargs) -> int:
    with cat.writing() as conn:
        return cat.insert(conn, values(**kwargs))


# --- the file and its migrations --------------------------------------------------------------


def test_exists_only_for_a_file_with_content(tmp_path):
    cat = Catalog(tmp_path / "catalog.db")
    assert not cat.exists()
    cat.path.write_bytes(b"")
    assert not cat.exists()  # SQLite treats an empty file as a new database
    cat.initialize()
    assert cat.exists()


def test_initialize_applies_every_migration_once_in_order(tmp_path):
    cat = Catalog(tmp_path / "catalog.db")
    assert [m.__name__ for m in MIGRATIONS] == NAMES
    assert cat.initialize() == NAMES
    assert cat.initialize() == []
    assert raw(cat, "SELECT name FROM schema_version ORDER BY name") == [(n,) for n in NAMES]
    assert raw(cat, "PRAGMA journal_mode") == [("wal",)]
    tables = {r[0] for r in raw(cat, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"entries", "tags", "version_counters", "pending_blobs", "released_blobs"} <= tables
    applied_at = raw(cat, "SELECT applied_at FROM schema_version")
    assert all(datetime.fromisoformat(a).utcoffset() == timedelta(0) for (a,) in applied_at)


def test_an_old_catalog_gets_only_its_missing_migrations(tmp_path):
    path = tmp_path / "catalog.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    for migration in (m001_entries, m002_tags):
        migration(conn)
        conn.execute("INSERT INTO schema_version VALUES (?, 'then')", (migration.__name__,))
    conn.close()
    cat = Catalog(path)
    with cat.reading() as conn:
        assert cat.version(conn) == NAMES[:2]
        assert cat.pending_migrations(conn) == NAMES[2:]
    assert cat.initialize() == NAMES[2:]
    with cat.reading() as conn:
        assert cat.pending_migrations(conn) == []


def test_a_new_empty_file_has_no_version_and_every_migration_pending(tmp_path):
    cat = Catalog(tmp_path / "catalog.db")
    conn = cat.connect()
    try:
        assert cat.version(conn) == []
        assert cat.pending_migrations(conn) == NAMES
    finally:
        conn.close()


def test_connections_wait_for_writers_and_enforce_foreign_keys(catalog):
    conn = catalog.connect()
    try:
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS == 60_000
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.isolation_level is None  # transactions are explicit
        assert isinstance(conn.execute("SELECT 1 AS one").fetchone()["one"], int)
    finally:
        conn.close()


def test_a_read_only_connection_reads_and_cannot_write(catalog):
    add(catalog)
    with catalog.reading(read_only=True) as conn:
        assert [e.ref for e in catalog.select(conn)] == ["a:1"]
        with pytest.raises(sqlite3.DatabaseError):
            conn.execute("DELETE FROM entries")
    assert raw(catalog, "SELECT count(*) FROM entries") == [(1,)]


def test_the_in_memory_empty_catalog_has_the_current_schema(catalog):
    with Catalog.empty() as conn:
        assert catalog.version(conn) == []  # no rows recorded, but the tables are there
        assert catalog.select(conn) == [] and catalog.names(conn) == []
        assert catalog.next_version(conn, "a") == 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {
        r[0] for r in raw(catalog, "SELECT name FROM sqlite_master WHERE type='table'")
    }


# --- schema checks ----------------------------------------------------------------------------


def test_an_intact_schema_passes(catalog):
    with catalog.reading() as conn:
        catalog.check_schema(conn)


@pytest.mark.parametrize(
    "extra",
    [
        "CREATE TABLE intruder (x)",
        "CREATE TABLE zz_last (x)",
        "CREATE VIEW every_name AS SELECT name FROM entries",
        "CREATE TRIGGER forget AFTER INSERT ON entries BEGIN DELETE FROM tags; END",
    ],
)
def test_an_extra_table_view_or_trigger_is_damage(catalog, extra):
    """Wherever it sorts among the schema's objects (zz_last, the view and trigger after it)."""
    raw_conn = sqlite3.connect(catalog.path)
    raw_conn.execute(extra)
    raw_conn.commit()
    raw_conn.close()
    with pytest.raises(CatalogDamaged) as info:
        with catalog.reading():
            pass
    assert "its tables differ from what its migrations create" in info.value.message
    assert str(catalog.path) in info.value.message


def test_a_catalog_from_a_newer_adaptory_names_the_unknown_migration(catalog):
    raw_conn = sqlite3.connect(catalog.path)
    raw_conn.execute("INSERT INTO schema_version VALUES ('m999_future', 'later')")
    raw_conn.execute("CREATE TABLE future (x)")  # what that migration made
    raw_conn.commit()
    raw_conn.close()
    with pytest.raises(CatalogDamaged) as info:
        with catalog.writing():
            pass
    assert "records migrations this Adaptory does not know (m999_future)" in info.value.message
    assert "written by a newer Adaptory, or damaged" in info.value.message


def test_a_file_that_is_not_a_database_is_damage_not_a_sqlite_error(tmp_path):
    path = tmp_path / "catalog.db"
    path.write_bytes(b"this is not a database, " * 200)
    cat = Catalog(path)
    for open_it in (cat.reading, cat.writing, cat.initialize):
        with pytest.raises(CatalogDamaged) as info:
            with open_it() if open_it is not cat.initialize else _call(open_it):
                pass
        assert f"{path} is damaged" in info.value.message
        assert "adaptory recover" in info.value.hint


class _call:
    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        return self.fn()

    def __exit__(self, *exc):
        return False


def test_health_of_a_clean_catalog_is_empty_and_a_bad_digest_is_named(catalog):
    first = add(catalog)
    with catalog.reading() as conn:
        assert catalog.health(conn) == []
    raw_conn = sqlite3.connect(catalog.path)
    raw_conn.execute("UPDATE entries SET digest = ? WHERE id = ?", ("0" * 64, first))
    raw_conn.execute("INSERT INTO entries (name, version, digest, peft_config, files, created_at, "
                     "size_bytes) VALUES ('b', 1, 'x', '{not json', '{}', 'now', 0)")  # fmt: skip
    raw_conn.commit()
    raw_conn.close()
    with catalog.reading() as conn:
        problems = catalog.health(conn)
    assert problems[0] == f"entry #{first} (a:1): its digest does not match its file list"
    assert problems[1].startswith("entry #2 (b:1): unreadable metadata (")
    assert len(problems) == 2


# --- transactions -----------------------------------------------------------------------------


def test_writing_commits_on_success_and_rolls_back_on_any_exception(catalog):
    add(catalog, name="kept")
    with pytest.raises(RuntimeError):
        with catalog.writing() as conn:
            catalog.insert(conn, values(name="lost"))
            raise RuntimeError("stop")
    assert raw(catalog, "SELECT name FROM entries") == [("kept",)]
    assert raw(catalog, "SELECT name, last_version FROM version_counters") == [("kept", 1)]


def test_a_failed_statement_is_a_storage_error_and_nothing_is_written(catalog):
    add(catalog)
    with pytest.raises(StorageError) as info:
        with catalog.writing() as conn:
            catalog.insert(conn, values(name="b"))
            conn.execute("INSERT INTO nowhere VALUES (1)")
    assert info.value.message == (
        "writing the catalog failed: no such table: nowhere; nothing was changed"
    )
    assert not isinstance(info.value, CatalogDamaged)
    assert raw(catalog, "SELECT name FROM entries") == [("a",)]


def test_a_commit_that_fails_is_a_storage_error_and_nothing_is_written(catalog):
    add(catalog)
    with pytest.raises(StorageError) as info:
        with catalog.writing() as conn:
            conn.execute("PRAGMA defer_foreign_keys = ON")  # the check moves to COMMIT
            catalog.insert(conn, values(name="b"))
            catalog.set_tag(conn, "b", "best", 999)  # no entry #999
    assert info.value.message == (
        "writing the catalog failed: FOREIGN KEY constraint failed; nothing was changed"
    )
    assert not isinstance(info.value, CatalogDamaged)
    assert raw(catalog, "SELECT name FROM entries") == [("a",)]
    assert raw(catalog, "SELECT count(*) FROM tags") == [(0,)]


def test_a_constraint_violation_is_not_reported_as_damage(catalog):
    add(catalog)
    with pytest.raises(StorageError) as info:
        with catalog.writing() as conn:
            catalog.insert(conn, values(name="a"))  # UNIQUE (name, version)
    assert not isinstance(info.value, CatalogDamaged), info.value.message


def test_a_busy_catalog_is_a_storage_error(catalog):
    other = sqlite3.connect(catalog.path, isolation_level=None, timeout=0)
    other.execute("BEGIN EXCLUSIVE")
    conn = catalog.connect()
    conn.execute("PRAGMA busy_timeout = 0")  # do not wait the minute out
    try:
        with pytest.raises(StorageError, match="the catalog is busy or unwritable"):
            with catalog._transaction(conn):
                pass
    finally:
        conn.close()
        other.execute("ROLLBACK")
        other.close()


# --- queries ----------------------------------------------------------------------------------


def test_next_version_never_reuses_a_removed_version(catalog):
    with catalog.writing() as conn:
        assert catalog.next_version(conn, "a") == 1
        ids = [catalog.insert(conn, values("a", v)) for v in (1, 2, 3)]
        catalog.insert(conn, values("b", 1))
        assert catalog.next_version(conn, "a") == 4
        assert catalog.next_version(conn, "b") == 2
        catalog.delete(conn, ids[2])
        assert catalog.next_version(conn, "a") == 4
    assert raw(catalog, "SELECT name, last_version FROM version_counters ORDER BY name") == [
        ("a", 3),
        ("b", 1),
    ]


def test_a_lower_version_never_lowers_the_counter(catalog):
    with catalog.writing() as conn:
        catalog.insert(conn, values("a", 5))
        catalog.insert(conn, values("a", 2))
        assert catalog.next_version(conn, "a") == 6
    assert raw(catalog, "SELECT last_version FROM version_counters") == [(5,)]


def test_a_name_with_only_a_counter_continues_after_it(catalog):
    with catalog.writing() as conn:
        catalog.delete(conn, catalog.insert(conn, values("a", 7)))
        assert catalog.names(conn) == []
        assert catalog.next_version(conn, "a") == 8
        assert catalog.has_history(conn)


def test_insert_stores_json_columns_as_sorted_json_and_files_as_records(catalog):
    entry_id = add(catalog, base_fingerprint=None)
    row = raw(catalog, "SELECT id, peft_config, extra, files, base_fingerprint, description "
                       "FROM entries")[0]  # fmt: skip
    assert row[0] == entry_id
    assert row[1] == json.dumps({"r": 4, "alpha": 8}, sort_keys=True) == '{"alpha": 8, "r": 4}'
    assert json.loads(row[2]) == {"labels": ["b", "a"]}  # lists keep their order
    assert json.loads(row[3]) == {"adapter_model.safetensors": {"sha256": "ab" * 32, "size": 10}}
    assert row[4] is None and row[5] is None  # NULL, not the text "null"


def test_select_round_trips_every_field_and_orders_by_name_then_version(catalog):
    with catalog.writing() as conn:
        ids = {
            (n, v): catalog.insert(conn, values(n, v))
            for n, v in (("b", 2), ("a", 1), ("b", 1), ("a", 10), ("a", 2))
        }
        catalog.set_tag(conn, "a", "zeta", ids[("a", 1)])
        catalog.set_tag(conn, "a", "alpha", ids[("a", 1)])
        catalog.set_tag(conn, "b", "prod", ids[("b", 2)])
    with catalog.reading() as conn:
        entries = catalog.select(conn)
        assert [e.ref for e in entries] == ["a:1", "a:2", "a:10", "b:1", "b:2"]
        first = entries[0]
        assert first.tags == ["alpha", "zeta"] and entries[4].tags == ["prod"]
        assert entries[1].tags == []
        expected = values("a", 1)
        for field in ("digest", "method", "peft_config", "extra", "loss_history", "files",
                      "base_fingerprint", "created_at", "size_bytes", "description"):  # fmt: skip
            assert getattr(first, field) == expected[field], field
        assert first.id == ids[("a", 1)]
        only = catalog.select(conn, "e.name = ? AND e.version > ?", ("a", 1))
        assert [e.ref for e in only] == ["a:2", "a:10"]
        assert catalog.select(conn, "e.name = ?", ("nobody",)) == []
        assert catalog.names(conn) == ["a", "b"]


def test_an_unreadable_row_is_damage_naming_the_entry(catalog):
    entry_id = add(catalog)
    raw_conn = sqlite3.connect(catalog.path)
    raw_conn.execute("UPDATE entries SET metrics = '{oops' WHERE id = ?", (entry_id,))
    raw_conn.commit()
    raw_conn.close()
    with catalog.reading() as conn:
        with pytest.raises(CatalogDamaged, match=f"entry #{entry_id}: unreadable metadata"):
            catalog.select(conn)


def test_tags_move_and_are_removed_and_deleting_an_entry_drops_its_tags(catalog):
    with catalog.writing() as conn:
        one, two = catalog.insert(conn, values("a", 1)), catalog.insert(conn, values("a", 2))
        catalog.set_tag(conn, "a", "prod", one)
        catalog.set_tag(conn, "a", "prod", two)  # moves
        catalog.set_tag(conn, "a", "old", one)
    assert raw(catalog, "SELECT tag, entry_id FROM tags ORDER BY tag") == [("old", one),
                                                                          ("prod", two)]  # fmt: skip
    with catalog.writing() as conn:
        assert catalog.remove_tag(conn, two, "prod") is True
        assert catalog.remove_tag(conn, two, "prod") is False
        assert catalog.remove_tag(conn, two, "old") is False  # on another entry
        catalog.delete(conn, one)
    assert raw(catalog, "SELECT count(*) FROM tags") == [(0,)]
    assert raw(catalog, "SELECT version FROM entries") == [(2,)]


def test_update_fields_dumps_json_columns_and_keeps_the_rest(catalog):
    entry_id = add(catalog)
    with catalog.writing() as conn:
        catalog.update_fields(conn, entry_id, {"metrics": {"b": 1, "a": 2}, "description": "hi"})
    assert raw(catalog, "SELECT metrics, description, method FROM entries") == [
        ('{"a": 2, "b": 1}', "hi", "lora")
    ]


def test_digests_and_the_blob_life_cycle(catalog):
    add(catalog, name="a", files={"f": FileRecord("1" * 64, 1)})
    add(catalog, name="b", files={"f": FileRecord("2" * 64, 1)})
    live = {r[0] for r in raw(catalog, "SELECT digest FROM entries")}
    with catalog.writing() as conn:
        assert catalog.digests(conn) == live and len(live) == 2
        assert catalog.collectable(conn) == set()
        catalog.mark_pending(conn, "p1")
        catalog.mark_pending(conn, "p1")  # twice is once
        catalog.mark_pending(conn, "p2")
        catalog.mark_released(conn, "r1")
        catalog.mark_released(conn, "p2")
        assert catalog.collectable(conn) == {"p1", "p2", "r1"}
        catalog.mark_referenced(conn, "p2")  # no longer pending nor released
        assert catalog.collectable(conn) == {"p1", "r1"}
        catalog.forget_blobs(conn, {"p1", "r1", "unknown"})
        assert catalog.collectable(conn) == set()
        catalog.mark_pending(conn, "p3")
    assert raw(catalog, "SELECT digest FROM pending_blobs") == [("p3",)]
    assert raw(catalog, "SELECT count(*) FROM released_blobs") == [(0,)]
    (since,) = raw(catalog, "SELECT since FROM pending_blobs")[0]
    assert datetime.fromisoformat(since).utcoffset() == timedelta(0)


def test_a_fresh_catalog_has_no_history(catalog):
    with catalog.reading() as conn:
        assert catalog.has_history(conn) is False
    add(catalog)
    with catalog.reading() as conn:
        assert catalog.has_history(conn) is True


# --- JSON values ------------------------------------------------------------------------------


def test_dumps_turns_scalars_paths_and_collections_into_plain_json():
    import numpy as np

    value = {
        "z": np.float32(0.5),
        "a": np.arange(3),
        "p": Path("/x/y"),
        "s": {3, 1, 2},
        "f": frozenset({"b", "a"}),
        "t": (1, "two"),
        "d": datetime(2025, 1, 2, 3, 4, 5),
    }
    assert json.loads(dumps(value)) == {
        "z": 0.5, "a": [0, 1, 2], "p": "/x/y", "s": [1, 2, 3], "f": ["a", "b"],
        "t": [1, "two"], "d": "2025-01-02 03:04:05",
    }  # fmt: skip
    assert list(json.loads(dumps(value))) == sorted(value)


def test_dumps_prefers_tolist_over_item():
    class Both:
        def tolist(self):
            return [1, 2]

        def item(self):
            return 3

    class ItemOnly:
        def item(self):
            return 4

    assert dumps({"a": Both(), "b": ItemOnly()}) == '{"a": [1, 2], "b": 4}'


def test_dumps_refuses_what_it_cannot_store_by_type_and_value():
    with pytest.raises(TypeError, match=r"^object value <object object at .*> cannot be stored"):
        dumps({"x": object()})


def test_now_iso_is_utc_with_microseconds():
    stamp = now_iso()
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0) and stamp.endswith("+00:00")


def test_writable_needs_an_existing_writable_folder(tmp_path):
    assert Catalog(tmp_path / "catalog.db").writable()  # no file yet: the folder decides
    assert not Catalog(tmp_path / "missing" / "catalog.db").writable()
    cat = Catalog(tmp_path / "catalog.db")
    cat.initialize()
    assert cat.writable()


def test_a_failed_read_is_a_storage_error_naming_the_file(catalog):
    with pytest.raises(StorageError) as info:
        with catalog.reading() as conn:
            conn.execute("SELECT * FROM nowhere")
    assert info.value.message == f"reading {catalog.path} failed: no such table: nowhere"
    assert not isinstance(info.value, CatalogDamaged)


def test_a_one_byte_catalog_exists(tmp_path):
    cat = Catalog(tmp_path / "catalog.db")
    cat.path.write_bytes(b"S")  # what a truncated catalog.db may keep
    assert cat.exists()  # any content: the registry then calls it damage ("has no tables")


def test_a_catalog_that_cannot_be_opened_is_a_storage_error_not_damage(tmp_path):
    cat = Catalog(tmp_path / "missing" / "catalog.db")
    with pytest.raises(StorageError) as info:
        cat.connect()
    assert info.value.message.startswith(f"cannot open {cat.path}: ")
    assert not isinstance(info.value, CatalogDamaged)
    assert not cat.path.parent.exists()


def test_reading_sees_what_another_open_connection_committed_to_the_wal(catalog):
    # A server keeps catalog.db open, so a commit stays in the WAL file (no checkpoint);
    # a reader that ignored the WAL would miss the entry (and gc could delete its blob).
    other = sqlite3.connect(catalog.path, isolation_level=None)
    try:
        other.execute("PRAGMA wal_autocheckpoint = 0")
        assert other.execute("SELECT count(*) FROM entries").fetchone() == (0,)
        with catalog.writing() as conn:
            catalog.insert(conn, values(name="in-wal"))
        assert Path(f"{catalog.path}-wal").stat().st_size > 0
        with catalog.reading() as conn:
            assert [e.ref for e in catalog.select(conn)] == ["in-wal:1"]
            assert catalog.digests(conn) == {
                r[0] for r in raw(catalog, "SELECT digest FROM entries")
            }
    finally:
        other.close()


def test_health_goes_on_past_an_unreadable_row(catalog):
    raw_conn = sqlite3.connect(catalog.path)
    raw_conn.execute("INSERT INTO entries (name, version, digest, peft_config, files, created_at, "
                     "size_bytes) VALUES ('b', 1, 'x', '{not json', '{}', 'now', 0)")  # fmt: skip
    raw_conn.commit()
    raw_conn.close()
    later = add(catalog)
    raw_conn = sqlite3.connect(catalog.path)  # a digest above the true one, which sorts lower
    raw_conn.execute("UPDATE entries SET digest = ? WHERE id = ?", ("f" * 64, later))
    raw_conn.commit()
    raw_conn.close()
    with catalog.reading() as conn:
        problems = catalog.health(conn)
    assert problems[0].startswith("entry #1 (b:1): unreadable metadata (")
    assert problems[1:] == [f"entry #{later} (a:1): its digest does not match its file list"]


def test_health_reports_every_line_of_sqlites_integrity_check(catalog):
    # A NULL in a NOT NULL column (slipped in by dropping the constraint from the schema text
    # and putting it back): SQLite's check says "NULL value in entries.created_at", a line
    # that sorts before "ok".
    first = add(catalog)
    sql = raw(catalog, "SELECT sql FROM sqlite_master WHERE name = 'entries'")[0][0]
    relaxed = sql.replace("created_at TEXT NOT NULL", "created_at TEXT")
    assert relaxed != sql
    conn = sqlite3.connect(catalog.path, isolation_level=None)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'entries'", (relaxed,))
    conn.close()
    conn = sqlite3.connect(catalog.path, isolation_level=None)  # reads the relaxed schema
    conn.execute("UPDATE entries SET created_at = NULL WHERE id = ?", (first,))
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'entries'", (sql,))
    conn.close()
    expected = [r[0] for r in raw(catalog, "PRAGMA integrity_check") if r[0] != "ok"]
    assert expected == ["NULL value in entries.created_at"]  # the oracle found the damage
    with catalog.reading() as conn:
        assert catalog.health(conn) == [f"SQLite integrity check: {p}" for p in expected]


def test_only_damage_counts_as_corruption():
    assert _is_corruption(sqlite3.DatabaseError("database disk image is malformed"))
    assert _is_corruption(sqlite3.DatabaseError("file is not a database"))
    assert _is_corruption(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert _is_corruption(sqlite3.OperationalError("database disk image is malformed"))
    assert not _is_corruption(sqlite3.OperationalError("database is locked"))
    assert not _is_corruption(sqlite3.IntegrityError("UNIQUE constraint failed: entries.name"))
