"""The registry: a home folder holding `catalog.db` and `blobs/`, and every operation on it.

`add` validates a PEFT folder, stages a hashed copy, then (under `home/.lock`) records the
digest as pending, renames the copy into the blob store and inserts the row in one SQLite
transaction; an entry is visible only once that transaction commits, so a crash at any point
leaves the whole entry or nothing. `gc` deletes a blob only when no entry references it and the
catalog says why (pending from an `add` that never finished, released by `rm`); it refuses to
run on a damaged catalog, and a catalog is never created over a home that already has blobs.
Reads take no lock and write nothing, so they work on a read-only home.
"""

from __future__ import annotations

import difflib
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from adaptory.registry.adapter_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_weights,
    read_config,
    serving_refusal,
    validate_adapter_folder,
)
from adaptory.registry.catalog import Catalog, now_iso
from adaptory.registry.entry import Entry
from adaptory.registry.errors import (
    AdapterNotFound,
    BadInput,
    CatalogDamaged,
    IntegrityError,
    InvalidAdapter,
    StorageError,
)
from adaptory.registry.maintenance import GcResult, Problem, Recovery, Unreferenced
from adaptory.registry.refs import parse_ref, validate_name, validate_tag
from adaptory.registry.store import BlobStore, StagedBlob

LOCK_TIMEOUT_SECONDS = 600
METHODS = {"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "IA3": "ia3"}
TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}


def method_from_peft_type(peft_type: str | None) -> str | None:
    """Adaptory's method name for a PEFT peft_type ("LORA" -> "lora", "PREFIX_TUNING" -> "prefix")."""
    if not peft_type:
        return None
    return METHODS.get(peft_type, peft_type.lower().replace("_", "-"))


def task_from_task_type(task_type: str | None) -> str | None:
    """Adaptory's task name for a PEFT task_type ("CAUSAL_LM" -> "causal-lm")."""
    if not task_type:
        return None
    return TASKS.get(task_type, task_type.lower().replace("_", "-"))


def _pause_for_tests(stage: str) -> None:
    """Sleep at a named stage of `add` when ADAPTORY_TEST_PAUSE_AT says so (crash-safety tests)."""
    if os.environ.get("ADAPTORY_TEST_PAUSE_AT") == stage:
        print(f"ADAPTORY_PAUSED {stage}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("ADAPTORY_TEST_PAUSE_SECONDS", "60")))


class Registry:
    """A registry home (`catalog.db` + `blobs/`); created on first write.

    (~340 lines: every read and write of entries, which share the home's lock and catalog
    connections; keeping the registry sound — gc, verify, recover — is in maintenance.py.)"""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.catalog = Catalog(self.home / "catalog.db")
        self.store = BlobStore(self.home / "blobs")
        self._ready = False

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    # setup ---------------------------------------------------------------------------------

    def _lock(self) -> filelock.FileLock:
        return filelock.FileLock(str(self.home / ".lock"), timeout=LOCK_TIMEOUT_SECONDS)

    def _locked(self):
        try:
            return self._lock().acquire()
        except filelock.Timeout as exc:
            raise StorageError(
                f"the registry at {self.home} stayed locked for {LOCK_TIMEOUT_SECONDS} s",
                hint="another adaptory process is writing; try again when it has finished",
            ) from exc
        except OSError as exc:  # a read-only home cannot hold the lock file
            raise StorageError(
                f"cannot write to the registry home {self.home}: {exc.strerror or exc}",
                hint="reading works on a read-only home; writing needs write permission",
            ) from exc

    def _ensure_ready(self) -> None:
        """Before a write: create the home and the catalog (WAL) and apply migrations, once per
        Registry object; never create a catalog over a home that already holds adapters."""
        if self._ready:
            return
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the registry home {self.home}: {exc.strerror or exc}"
            ) from exc
        with self._locked():
            self._refuse_to_replace_a_catalog()
            applied = self.catalog.initialize()
            if "m004_blob_lifecycle" in applied and "m001_entries" not in applied:
                self._release_blobs_unreferenced_before_upgrade()
        self._ready = True

    def _refuse_to_replace_a_catalog(self) -> None:
        """A missing, emptied or table-less catalog next to stored blobs is damage, not a new home:
        creating an empty catalog there would make `list` show nothing and `gc` delete them all."""
        if self.catalog.exists():
            with self.catalog.reading(read_only=not self.catalog.writable()) as conn:
                if self.catalog.version(conn):
                    return
        count = len(self.store.digests())
        if count:
            what = "has no tables" if self.catalog.exists() else "is missing or empty"
            raise CatalogDamaged(
                f"{self.catalog.path} {what}, but {self.store.objects} holds {count} stored "
                f"adapter{'s' if count != 1 else ''}; refusing to start a new catalog over them",
                hint="nothing was changed; restore catalog.db from a backup, or run `adaptory "
                "recover` to start a new catalog listing them as recovered-<digest>",
            )

    def _release_blobs_unreferenced_before_upgrade(self) -> None:
        """Catalogs made before blob records existed: what was garbage then stays collectable."""
        with self.catalog.writing() as conn:
            for digest in self.store.digests() - self.catalog.digests(conn):
                self.catalog.mark_released(conn, digest)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A catalog connection for reads: no lock, nothing written unless migrations are due,
        read-only (immutable) when the home cannot be written, an empty catalog when none exists."""
        if not self.catalog.exists():
            self._refuse_to_replace_a_catalog()
            with self.catalog.empty() as conn:
                yield conn
            return
        writable = self.catalog.writable()
        if writable and not self._ready:
            self._ensure_ready()  # applies pending migrations
        with self.catalog.reading(read_only=not writable) as conn:
            yield conn

    # writing -------------------------------------------------------------------------------

    def add(
        self,
        src_dir: Path,
        *,
        name: str,
        method: str | None = None,
        task: str | None = None,
        base_model: str | None = None,
        base_fingerprint: dict | None = None,
        training_config: dict | None = None,
        dataset: dict | None = None,
        metrics: dict | None = None,
        loss_history: list | None = None,
        parents: list[dict] | None = None,
        tags: Iterable[str] = (),
        description: str | None = None,
        extra: dict | None = None,
        servable: bool = False,
    ) -> Entry:
        """Store a PEFT adapter folder as the next version of `name`; return the new entry.
        With `servable`, refuse an adapter that no base could serve (`serving_refusal`)."""
        validate_name(name)
        tags = [validate_tag(tag) for tag in dict.fromkeys(tags)]
        src_dir = Path(src_dir)
        folder = validate_adapter_folder(src_dir)
        config = folder.config
        if servable and (reason := serving_refusal(folder)):
            raise InvalidAdapter(
                f"{src_dir}: {reason}",
                hint="Adaptory serves and merges LoRA and prefix-tuning adapters; to keep it "
                "anyway: adaptory import --store-only",
            )
        values = {
            "name": name,
            "method": method or method_from_peft_type(config.get("peft_type")),
            "task": task or task_from_task_type(config.get("task_type")),
            "base_model": base_model or config.get("base_model_name_or_path"),
            "base_fingerprint": base_fingerprint,
            "peft_config": config,
            "training_config": training_config or {},
            "dataset": dataset or {},
            "metrics": metrics or {},
            "loss_history": list(loss_history or []),
            "parents": list(parents or []),
            "description": description,
            "extra": extra or {},
        }
        _check_text(values, ("method", "task", "base_model", "description"))
        _check_storable(values)
        self._ensure_ready()
        staged = self.store.stage(src_dir, folder.files)
        try:
            _check_unchanged(staged, src_dir, config)
            _pause_for_tests("staged")
            with self._locked():
                with self.catalog.writing() as conn:
                    self.catalog.mark_pending(conn, staged.digest)
                self.store.publish(staged)
                _pause_for_tests("published")
                with self.catalog.writing() as conn:
                    version = self.catalog.next_version(conn, name)
                    row = {
                        **values,
                        "version": version,
                        "digest": staged.digest,
                        "files": staged.files,
                        "created_at": now_iso(),
                        "size_bytes": staged.size_bytes,
                    }
                    entry_id = self.catalog.insert(conn, row)
                    self.catalog.mark_referenced(conn, staged.digest)
                    for tag in tags:
                        self.catalog.set_tag(conn, name, tag, entry_id)
                    _pause_for_tests("inserted")
        finally:
            if staged.path.exists():
                self.store.discard(staged)
        return self._by_id(entry_id)

    def tag(self, ref: str | Entry, tag: str) -> Entry:
        """Point `tag` at this entry, moving it from another version of the same name if needed."""
        validate_tag(tag)
        self._ensure_ready()
        with self.catalog.writing() as conn:
            entry = self._resolve_in(conn, ref)
            self.catalog.set_tag(conn, entry.name, tag, entry.id)
        return self._by_id(entry.id)

    def untag(self, ref: str | Entry, tag: str) -> Entry:
        """Remove `tag` from this entry; AdapterNotFound if the entry does not carry it."""
        validate_tag(tag)
        self._ensure_ready()
        with self.catalog.writing() as conn:
            entry = self._resolve_in(conn, ref)
            if not self.catalog.remove_tag(conn, entry.id, tag):
                carried = ", ".join(entry.tags) or "none"
                raise AdapterNotFound(
                    f"{entry.ref} has no tag {tag!r}", hint=f"its tags: {carried}"
                )
        return self._by_id(entry.id)

    def remove(self, ref: str | Entry) -> Entry:
        """Delete the entry's row and tags; its files stay in the store until `gc`."""
        self._ensure_ready()
        with self.catalog.writing() as conn:
            entry = self._resolve_in(conn, ref)
            self.catalog.delete(conn, entry.id)
            self.catalog.mark_released(conn, entry.digest)
        return entry

    def update(
        self,
        ref_or_entry: str | Entry,
        *,
        metrics: dict | None = None,
        extra: dict | None = None,
        description: str | None = None,
    ) -> Entry:
        """Merge new keys into the entry's metrics/extra (e.g. eval results) and set a description."""
        self._ensure_ready()
        with self.catalog.writing() as conn:
            entry = self._resolve_in(conn, ref_or_entry)
            changes: dict = {}
            if metrics:
                changes["metrics"] = {**entry.metrics, **metrics}
            if extra:
                changes["extra"] = {**entry.extra, **extra}
            if description is not None:
                changes["description"] = description
            _check_storable(changes)
            if changes:
                self.catalog.update_fields(conn, entry.id, changes)
        return self._by_id(entry.id)

    def gc(self, *, orphans: bool = False) -> GcResult:
        """Delete unreferenced blobs the catalog released (or never finished adding) and temp
        folders older than an hour, under the lock. With `orphans`, also blobs the catalog has no
        record of. Refuses on a damaged catalog, or when an entry's own blob is missing (a
        damaged digest: one of the unreferenced blobs may be that entry's)."""
        from adaptory.registry import maintenance

        return maintenance.gc(self, orphans=orphans)

    def recover(self) -> Recovery:
        """Re-catalog stored adapters the catalog has lost. On a sound catalog, each unknown blob
        becomes an entry; on a missing or damaged one, the old file is moved aside (kept, never
        deleted), a new catalog is started and every stored adapter becomes an entry. Entries
        are named `recovered-<digest[:12]>`; metadata that lived only in the catalog is gone."""
        from adaptory.registry import maintenance

        return maintenance.recover(self)

    def catalog_problems_or_missing(self) -> list[str]:
        from adaptory.registry import maintenance

        return maintenance.catalog_problems_or_missing(self)

    def unreferenced(self) -> Unreferenced:
        """Blob folders no entry references, split by whether `gc` would delete them."""
        from adaptory.registry import maintenance

        return maintenance.unreferenced(self)

    def catalog_problems(self) -> list[str]:
        """SQLite's integrity check and each row's digest against its file list ([] if sound)."""
        from adaptory.registry import maintenance

        return maintenance.catalog_problems(self)

    # reading -------------------------------------------------------------------------------

    def resolve(self, ref: str | Entry) -> Entry:
        """The entry a reference names: `NAME` (latest), `NAME:3` or `NAME:tag`."""
        with self._reading() as conn:
            return self._resolve_in(conn, ref)

    def list(
        self,
        *,
        base: str | None = None,
        task: str | None = None,
        tag: str | None = None,
        name: str | None = None,
    ) -> list[Entry]:
        """Entries ordered by name and version, optionally filtered by base model, task, tag, name."""
        conditions, params = [], []
        for column, value in (("base_model", base), ("task", task), ("name", name)):
            if value is not None:
                conditions.append(f"e.{column} = ?")
                params.append(value)
        if tag is not None:
            conditions.append("e.id IN (SELECT entry_id FROM tags WHERE tag = ?)")
            params.append(tag)
        with self._reading() as conn:
            return self.catalog.select(conn, " AND ".join(conditions), tuple(params))

    def files(self, entry_or_ref: str | Entry, *, verify: bool = True) -> Path:
        """The blob folder of an entry; with `verify`, re-hash it and raise IntegrityError on damage."""
        entry = entry_or_ref if isinstance(entry_or_ref, Entry) else self.resolve(entry_or_ref)
        if verify:
            problems = self.store.check(entry.digest, entry.files)
            if problems:
                raise IntegrityError(
                    f"{entry.ref}: {'; '.join(problems)}",
                    hint=f"the stored files no longer match digest {entry.digest[:12]}…; "
                    "re-import the adapter (`adaptory verify` lists all damage)",
                )
        return self.store.path_for(entry.digest)

    def verify(self, ref: str | None = None) -> list[Problem]:
        """Check the catalog (SQLite's integrity check, each row's digest) and re-hash every
        entry's files (or one entry's); one Problem per damaged entry or catalog fault."""
        from adaptory.registry import maintenance

        return maintenance.verify(self, ref)

    # helpers -------------------------------------------------------------------------------

    def _by_id(self, entry_id: int) -> Entry:
        with self._reading() as conn:
            found = self.catalog.select(conn, "e.id = ?", (entry_id,))
        if not found:
            raise AdapterNotFound(f"entry #{entry_id} no longer exists")
        return found[0]

    def _resolve_in(self, conn, ref: str | Entry) -> Entry:
        if isinstance(ref, Entry):
            found = self.catalog.select(conn, "e.id = ?", (ref.id,))
            if not found:
                raise AdapterNotFound(f"{ref.ref} no longer exists", hint="it was removed")
            return found[0]
        parsed = parse_ref(ref)
        if parsed.version is not None:
            found = self.catalog.select(
                conn, "e.name = ? AND e.version = ?", (parsed.name, parsed.version)
            )
        elif parsed.tag is not None:
            found = self.catalog.select(
                conn,
                "e.id IN (SELECT entry_id FROM tags WHERE name = ? AND tag = ?)",
                (parsed.name, parsed.tag),
            )
        else:
            found = self.catalog.select(conn, "e.name = ?", (parsed.name,))
        if found:
            return found[-1]
        raise self._not_found(conn, ref, parsed.name)

    def _not_found(self, conn, ref: str, name: str) -> AdapterNotFound:
        versions = self.catalog.select(conn, "e.name = ?", (name,))
        if versions:
            listed = ", ".join(str(e.version) for e in versions)
            tags = sorted({t for e in versions for t in e.tags})
            hint = f"{name} has versions {listed}" + (
                f" and tags {', '.join(tags)}" if tags else ""
            )
            return AdapterNotFound(f"no adapter {ref!r}", hint=hint)
        close = difflib.get_close_matches(name, self.catalog.names(conn), n=3, cutoff=0.5)
        hint = (
            f"did you mean {', '.join(close)}?" if close else "`adaptory list` shows what is stored"
        )
        return AdapterNotFound(f"no adapter named {name!r}", hint=hint)


def _check_storable(values: dict) -> None:
    """Refuse metadata that cannot be stored as JSON before anything is written."""
    from adaptory.registry.catalog import dumps

    for key, value in values.items():
        try:
            dumps(value)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"{key}: {exc}") from None


def _check_text(values: dict, keys: Iterable[str]) -> None:
    """Refuse what a text column cannot hold (not a string, not UTF-8) before anything is written."""
    for key in keys:
        value = values.get(key)
        if value is not None and not isinstance(value, str):
            kind = type(value).__name__
            raise BadInput(f"{key} must be text, not {kind}", hint="pass a string or leave it out")
        try:
            (value or "").encode("utf-8")
        except UnicodeEncodeError:
            shown = value.encode("utf-8", "backslashreplace").decode()
            raise BadInput(f"{key} is not UTF-8 text: {shown}") from None


def _check_unchanged(staged: StagedBlob, src_dir: Path, config: dict) -> None:
    """Refuse a copy that differs from what was validated (the folder changed while importing):
    the copy is what gets stored, so it is validated again, weights included."""
    try:
        copied = read_config(staged.path / CONFIG_FILE)
        check_weights(staged.path / WEIGHTS_FILE, copied)
    except InvalidAdapter as exc:
        raise InvalidAdapter(f"{src_dir} changed while being imported ({exc})") from None
    if copied != config:
        raise InvalidAdapter(f"{src_dir / CONFIG_FILE} changed while being imported")
