"""A damaged home loses nothing: a deleted, emptied, truncated or bit-flipped catalog.db never
leads `gc` to delete a stored adapter, every command answers with one clear error (no traceback),
reads work on a read-only home, and `recover` brings every stored adapter back into a catalog."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptory.cli.main import cli
from adaptory.registry import Registry
from adaptory.registry.errors import AdaptoryError, CatalogDamaged, StorageError
from adaptory.registry.store import manifest_digest
from adaptory.registry.testing import make_lora_folder

DAMAGES = ("deleted", "emptied", "truncated", "garbage")


@pytest.fixture
def stocked(tmp_path):
    """A home with three live entries (one tagged) and one removed entry whose blob awaits gc."""
    home = tmp_path / "home"
    reg = Registry(home)
    live = [
        reg.add(
            make_lora_folder(tmp_path / f"src{i}", seed=i), name=f"a{i}", tags=["prod"] * (i == 0)
        )
        for i in range(3)
    ]
    removed = reg.remove(reg.add(make_lora_folder(tmp_path / "gone", seed=9), name="gone"))
    return home, live, removed


def blob_digests(home: Path) -> set[str]:
    return {p.name for p in (home / "blobs" / "sha256").iterdir()}


def damage(catalog: Path, how: str) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{catalog}{suffix}").unlink(missing_ok=True)
    data = catalog.read_bytes()
    if how == "deleted":
        catalog.unlink()
    elif how == "emptied":
        catalog.write_bytes(b"")
    elif how == "truncated":
        catalog.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        catalog.write_bytes(b"not a database at all" + data[21:])


def run(home: Path, *args: str):
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    # an AdaptoryError is rendered and becomes SystemExit; anything else is a raw traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args,
        result.output,
        result.exception,
    )
    return result


# --- the catalog deleted, emptied, truncated, overwritten ----------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_catalog_stops_every_command_and_deletes_nothing(stocked, tmp_path, how):
    home, live, removed = stocked
    before = blob_digests(home)
    assert before == {e.digest for e in live} | {removed.digest}
    damage(home / "catalog.db", how)
    src = make_lora_folder(tmp_path / "new", seed=5)
    for args in (
        ["list"], ["show", "a0"], ["verify"], ["gc"], ["gc", "--orphans"], ["tag", "a1", "x"],
        ["rm", "-y", "a1"], ["import", str(src), "--name", "new"], ["doctor", "--json"],
    ):  # fmt: skip
        result = run(home, *args)
        assert result.exit_code != 0, (how, args, result.output)
        if args[0] not in ("verify", "doctor"):  # those report damage as a finding (exit 1)
            assert result.exit_code == CatalogDamaged.exit_code, (how, args, result.output)
            assert "error:" in result.output and "catalog.db" in result.output
        assert blob_digests(home) == before, (how, args)
    # the damaged file is still there to be inspected or restored: nothing replaced it
    if how != "deleted":
        assert (home / "catalog.db").exists()
    assert not (home / "catalog.db").exists() or how != "deleted"


@pytest.mark.parametrize("how", DAMAGES)
def test_recover_brings_every_stored_adapter_back(stocked, how):
    home, live, removed = stocked
    damage(home / "catalog.db", how)
    result = run(home, "recover", "-y", "--json")
    assert result.exit_code == 0, result.output
    entries = Registry(home).list()
    assert {e.digest for e in entries} == {e.digest for e in live} | {removed.digest}
    assert all(e.name == f"recovered-{e.digest[:12]}" for e in entries)
    assert run(home, "verify").exit_code == 0
    if how != "deleted":  # the damaged file is kept beside the new one
        assert len(list(home.glob("catalog.db.damaged-*"))) == 1


def test_recover_on_a_sound_catalog_adds_only_the_blobs_it_does_not_know(stocked):
    home, live, removed = stocked
    with sqlite3.connect(home / "catalog.db") as conn:  # rows lost, the file still sound
        conn.execute("DELETE FROM entries WHERE name = 'a2'")
    assert run(home, "verify").exit_code == 1  # a stored adapter the catalog does not list
    assert run(home, "gc").exit_code == 0
    assert live[2].digest in blob_digests(home)  # kept: the catalog never released it
    result = Registry(home).recover()
    assert result.moved_aside is None
    assert [e.digest for e in result.recovered] == [live[2].digest]
    assert {e.name for e in Registry(home).list()} == {
        "a0",
        "a1",
        f"recovered-{live[2].digest[:12]}",
    }


# --- bit flips ---------------------------------------------------------------------------------


def _flip_in_page(db: Path, page: int, needle: bytes) -> None:
    """Flip the lowest bit of the first occurrence of `needle` inside one database page."""
    data = bytearray(db.read_bytes())
    size = int.from_bytes(data[16:18], "big")
    start = (page - 1) * size
    at = data.index(needle, start, start + size)
    data[at] ^= 0x01
    db.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_digest_index_makes_gc_refuse(stocked):
    """Reading digests through a damaged index once pointed gc at a live adapter."""
    home, live, _ = stocked
    db = home / "catalog.db"
    with sqlite3.connect(db) as conn:
        index_page = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'entries_digest'"
        ).fetchone()[0]
    _flip_in_page(db, index_page, live[1].digest.encode())
    with sqlite3.connect(db) as conn:  # the old query now misses a live digest
        via_index = {r[0] for r in conn.execute("SELECT DISTINCT digest FROM entries")}
    assert live[1].digest not in via_index
    before = blob_digests(home)
    reg = Registry(home)
    with pytest.raises(CatalogDamaged, match="gc refused"):
        reg.gc()
    assert blob_digests(home) == before
    problems = reg.verify()
    assert problems and problems[0].entry_ref == "catalog.db" and "integrity" in problems[0].message
    assert run(home, "gc").exit_code == CatalogDamaged.exit_code
    assert run(home, "doctor").exit_code == 1


def test_a_consistent_but_wrong_digest_makes_gc_refuse(stocked):
    """A row whose digest no longer matches its own file list (index and table agree): its real
    blob looks unreferenced, so gc must not run."""
    home, live, _ = stocked
    wrong = ("0" if live[0].digest[0] != "0" else "1") + live[0].digest[1:]
    with sqlite3.connect(home / "catalog.db") as conn:
        conn.execute("UPDATE entries SET digest = ? WHERE id = ?", (wrong, live[0].id))
    with sqlite3.connect(home / "catalog.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    before = blob_digests(home)
    with pytest.raises(CatalogDamaged, match="does not match its file list"):
        Registry(home).gc(orphans=True)
    assert blob_digests(home) == before


def _flip_rounds(home: Path, live: list, removed, rounds: int, seed: int) -> dict:
    """`rounds` copies of the catalog, each with one random bit flipped, each followed by verify
    and gc: count outcomes, and check after every round that no live adapter was deleted."""
    db = home / "catalog.db"
    pristine = db.read_bytes()
    spare = home.parent / "spare-blob"
    shutil.copytree(home / "blobs" / "sha256" / removed.digest, spare)
    live_digests = {e.digest for e in live}
    rng = random.Random(seed)
    print(f"bit-flip seed {seed}, {rounds} rounds, catalog {len(pristine)} bytes")
    # half the flips anywhere in the file (mostly free pages), half in bytes that hold data
    in_use = [i for i, byte in enumerate(pristine) if byte]
    outcomes = {"gc ran": 0, "gc refused": 0, "verify found damage": 0, "other error": 0}
    for i in range(rounds):
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        data = bytearray(pristine)
        if i % 2:
            bit = rng.choice(in_use) * 8 + rng.randrange(8)
        else:
            bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        db.write_bytes(bytes(data))
        reg = Registry(home)
        try:
            if reg.verify():
                outcomes["verify found damage"] += 1
        except AdaptoryError:
            outcomes["verify found damage"] += 1
        try:
            reg.gc()
            outcomes["gc ran"] += 1
        except CatalogDamaged:
            outcomes["gc refused"] += 1
        except AdaptoryError:
            outcomes["other error"] += 1
        missing = live_digests - blob_digests(home)
        assert not missing, f"round {i} (seed {seed}, bit {bit}): gc deleted live {missing}"
        if not (home / "blobs" / "sha256" / removed.digest).exists():
            shutil.copytree(spare, home / "blobs" / "sha256" / removed.digest)
    db.write_bytes(pristine)
    return outcomes


def test_random_bit_flips_in_the_catalog_never_cost_an_adapter(stocked):
    home, live, removed = stocked
    outcomes = _flip_rounds(home, live, removed, rounds=120, seed=20261204)
    print(outcomes)
    assert sum(outcomes.values()) >= 120


@pytest.mark.slow
def test_a_thousand_random_bit_flips_never_cost_an_adapter(stocked):
    home, live, removed = stocked
    outcomes = _flip_rounds(home, live, removed, rounds=1000, seed=1000)
    print(outcomes)
    assert outcomes["gc refused"] > 0  # the checks did fire on some flips


def test_bit_flips_through_the_cli_never_show_a_traceback(stocked):
    home, live, removed = stocked
    db = home / "catalog.db"
    pristine = db.read_bytes()
    rng = random.Random(7)
    for _ in range(15):
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        data = bytearray(pristine)
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        db.write_bytes(bytes(data))
        for args in (["list"], ["show", "a0"], ["verify"], ["gc"], ["doctor", "--json"]):
            run(home, *args)  # asserts no raw exception
        assert {e.digest for e in live} <= blob_digests(home)


# --- a catalog from before blob records ---------------------------------------------------------


def test_upgrading_an_old_catalog_keeps_removed_adapters_collectable(stocked):
    home, live, removed = stocked
    with sqlite3.connect(home / "catalog.db") as conn:  # back to the three-migration schema
        conn.execute("DROP TABLE pending_blobs")
        conn.execute("DROP TABLE released_blobs")
        conn.execute("DELETE FROM schema_version WHERE name = 'm004_blob_lifecycle'")
    result = Registry(home).gc()
    assert result.removed_blobs == 1 and result.kept_unknown == []
    assert blob_digests(home) == {e.digest for e in live}


def test_every_row_digest_matches_its_file_list(stocked):
    """The invariant the health check relies on, checked against the raw rows."""
    home, live, _ = stocked
    for entry in Registry(home).list():
        assert manifest_digest(entry.files) == entry.digest


# --- a read-only home --------------------------------------------------------------------------


def _in_read_only_child(home: Path, fn) -> int:
    """Run fn() in a forked child that cannot write `home` (an unprivileged uid when we are
    root: root ignores permission bits). Returns the child's exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn()
            code = 0
        except AssertionError as exc:
            print(f"assertion failed: {exc}", file=sys.stderr)
        except BaseException as exc:  # noqa: BLE001 - report anything in the child
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(sys.platform != "linux", reason="needs fork and setuid")
def test_reads_work_on_a_read_only_home_and_writes_fail_with_a_storage_error():
    root = Path(tempfile.mkdtemp(prefix="adaptory-ro-"))  # under /tmp, reachable by any uid
    try:
        os.chmod(root, 0o755)
        home = root / "home"
        reg = Registry(home)
        src = make_lora_folder(root / "src", seed=1)
        entry = reg.add(src, name="a", tags=["prod"])
        for path in [home, *home.rglob("*")]:
            os.chmod(path, 0o555 if path.is_dir() else 0o444)
        for path in [root / "src", *(root / "src").iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)

        def reads_and_writes():
            ro = Registry(home)
            assert [e.ref for e in ro.list()] == ["a:1"]
            assert ro.resolve("a:prod").digest == entry.digest
            assert ro.verify() == []
            assert ro.files("a").is_dir()
            runner = CliRunner()
            for args, code in (
                (["list", "--json"], 0), (["show", "a"], 0), (["verify"], 0),
                (["tag", "a", "x"], StorageError.exit_code),
                (["import", str(src), "--name", "b"], StorageError.exit_code),
                (["gc"], StorageError.exit_code),
            ):  # fmt: skip
                result = runner.invoke(cli, ["--home", str(home), *args])
                assert result.exit_code == code, (args, result.output, result.exception)
                assert result.exception is None or isinstance(result.exception, SystemExit)

        assert _in_read_only_child(home, reads_and_writes) == 0
    finally:
        for path in [root, *root.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root)
