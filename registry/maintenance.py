"""Keeping a registry sound: `verify` (the catalog's health and every stored file's digest),
`gc` (deleting only what the catalog released), `recover` (re-cataloguing stored adapters a lost
catalog no longer lists) and the unreferenced blobs between them. Functions over a Registry."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from adaptory.registry.catalog import now_iso
from adaptory.registry.entry import Entry
from adaptory.registry.errors import AdaptoryError, CatalogDamaged, StorageError


@dataclass(frozen=True)
class Problem:
    """One damaged entry found by `verify`: its reference and what is wrong with which file."""

    entry_ref: str
    message: str

    def __str__(self) -> str:
        return f"{self.entry_ref}: {self.message}"


@dataclass(frozen=True)
class GcResult:
    """What `gc` deleted (unreferenced blob folders, stale temp folders, bytes freed) and the
    unreferenced blobs it kept because the catalog does not know why they are there."""

    removed_blobs: int
    freed_bytes: int
    removed_temp: int = 0
    kept_unknown: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Recovery:
    """What `recover` did: where the old catalog went, the entries it made, what it skipped."""

    moved_aside: Path | None
    recovered: list[Entry]
    skipped: list[str]


@dataclass(frozen=True)
class Unreferenced:
    """Blob folders no entry references: `collectable` ones the catalog released or never
    finished adding (`gc` deletes them); `unknown` ones it has no record of (a lost or replaced
    catalog; `gc --orphans` deletes them, `import` re-catalogs one)."""

    collectable: list[str]
    unknown: list[str]


def gc(registry, *, orphans: bool = False) -> GcResult:
    """Delete unreferenced blobs the catalog released (or never finished adding) and temp
    folders older than an hour, under the lock. With `orphans`, also blobs the catalog has no
    record of. Refuses on a damaged catalog, or when an entry's own blob is missing (a
    damaged digest: one of the unreferenced blobs may be that entry's)."""
    registry._ensure_ready()
    with registry._locked():
        with registry.catalog.reading() as conn:
            damage = registry.catalog.health(conn)
            if damage:
                raise CatalogDamaged(
                    f"gc refused: {registry.catalog.path} is damaged ({damage[0]})",
                    hint="nothing was deleted; `adaptory verify` lists the damage",
                )
            referenced = registry.catalog.digests(conn)
            known = registry.catalog.collectable(conn)
            history = registry.catalog.has_history(conn)
        stored = registry.store.digests()
        unreferenced = stored - referenced
        garbage = unreferenced & known
        unknown = unreferenced - known
        if orphans and unknown:
            check_orphans_deletable(registry, referenced, stored, history)
            garbage, unknown = unreferenced, set()
        blobs, temp, freed = registry.store.collect(garbage)
        with registry.catalog.writing() as conn:
            registry.catalog.forget_blobs(
                conn, (known & referenced) | (known - registry.store.digests())
            )
    return GcResult(
        removed_blobs=blobs, freed_bytes=freed, removed_temp=temp, kept_unknown=sorted(unknown)
    )


def check_orphans_deletable(registry, referenced: set, stored: set, history: bool) -> None:
    missing = sorted(referenced - stored)
    if missing:
        raise CatalogDamaged(
            f"gc --orphans refused: {len(missing)} entr{'y' if len(missing) == 1 else 'ies'} "
            f"point at blobs that are not there (e.g. {missing[0][:12]}…), so an "
            "unreferenced blob may be one of them",
            hint="nothing was deleted; `adaptory verify` lists the damaged entries",
        )
    if not referenced and not history:
        raise CatalogDamaged(
            "gc --orphans refused: this catalog has never held an entry, so every stored "
            "blob would be deleted",
            hint="nothing was deleted; if the catalog was lost, restore it or re-import the "
            "blobs first (docs/REGISTRY.md, 'A damaged catalog')",
        )


def recover(registry) -> Recovery:
    """Re-catalog stored adapters the catalog has lost. On a sound catalog, each unknown blob
    becomes an entry; on a missing or damaged one, the old file is moved aside (kept, never
    deleted), a new catalog is started and every stored adapter becomes an entry. Entries
    are named `recovered-<digest[:12]>`; metadata that lived only in the catalog is gone."""
    moved_aside = None
    if registry.catalog.exists() and not catalog_problems_or_missing(registry):
        digests = unreferenced(registry).unknown
    else:
        moved_aside = move_catalog_aside(registry)
        digests = sorted(registry.store.digests())
    recovered, skipped = [], []
    for digest in digests:
        folder = registry.store.path_for(digest)
        try:
            recovered.append(
                registry.add(
                    folder,
                    name=f"recovered-{digest[:12]}",
                    description=f"recovered on {now_iso()[:10]} from blobs/sha256/{digest}",
                )
            )
        except AdaptoryError as exc:
            skipped.append(f"{digest[:12]}…: {exc.message}")
    return Recovery(moved_aside=moved_aside, recovered=recovered, skipped=skipped)


def catalog_problems_or_missing(registry) -> list[str]:
    try:
        with registry.catalog.reading(read_only=not registry.catalog.writable()) as conn:
            if not registry.catalog.version(conn):
                return ["the catalog has no tables"]
    except CatalogDamaged as exc:
        return [exc.message]
    return catalog_problems(registry)


def move_catalog_aside(registry) -> Path | None:
    """Rename catalog.db (and its WAL files) to catalog.db.damaged-<time>; start a new one."""
    registry.home.mkdir(parents=True, exist_ok=True)
    with registry._locked():
        stamp = now_iso()[:19].replace(":", "")
        aside = None
        for suffix in ("", "-wal", "-shm"):
            path = Path(f"{registry.catalog.path}{suffix}")
            if path.exists():
                target = Path(f"{registry.catalog.path}.damaged-{stamp}{suffix}")
                try:
                    os.rename(path, target)
                except OSError as exc:
                    raise StorageError(
                        f"cannot move {path} aside: {exc.strerror or exc}; nothing was changed"
                    ) from exc
                aside = aside or target
        registry.catalog.initialize()
        registry._ready = True
    return aside


def unreferenced(registry) -> Unreferenced:
    """Blob folders no entry references, split by whether `gc` would delete them."""
    with registry._reading() as conn:
        referenced = registry.catalog.digests(conn)
        known = registry.catalog.collectable(conn) if _has_table(conn, "pending_blobs") else set()
    loose = registry.store.digests() - referenced
    return Unreferenced(collectable=sorted(loose & known), unknown=sorted(loose - known))


def catalog_problems(registry) -> list[str]:
    """SQLite's integrity check and each row's digest against its file list ([] if sound)."""
    if not registry.catalog.exists():
        registry._refuse_to_replace_a_catalog()
        return []
    try:
        with registry._reading() as conn:
            return registry.catalog.health(conn)
    except CatalogDamaged as exc:
        return [exc.message]


def verify(registry, ref: str | None = None) -> list[Problem]:
    """Check the catalog (SQLite's integrity check, each row's digest) and re-hash every
    entry's files (or one entry's); one Problem per damaged entry or catalog fault."""
    problems: list[Problem] = []
    if ref is None:
        problems = [Problem("catalog.db", p) for p in catalog_problems(registry)]
        if problems and any(
            p.message.startswith(("SQLite", str(registry.catalog.path))) for p in problems
        ):
            return problems  # rows cannot be trusted (or read) on a corrupt file
    entries = [registry.resolve(ref)] if ref is not None else registry.list()
    checked: dict[str, list[str]] = {}
    for entry in entries:
        if entry.digest not in checked:
            checked[entry.digest] = registry.store.check(entry.digest, entry.files)
        found = checked[entry.digest]
        if found:
            problems.append(Problem(entry.ref, "; ".join(found)))
    return problems


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        is not None
    )
