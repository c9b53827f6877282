"""Content-addressed blob store: `blobs/sha256/<digest>/` holds one adapter folder, as PEFT wrote it.

Files are first copied into `blobs/tmp/<unique>/` (hashed while copied, fsynced), then the whole
folder is renamed into place, so a blob folder either exists complete or not at all. The digest
is the sha256 of a canonical manifest ("relpath\\0sha256(file)\\n", sorted by relpath), so two
imports of the same files share one folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from adaptory.registry.entry import FileRecord
from adaptory.registry.errors import StorageError

CHUNK = 1024 * 1024
STALE_TEMP_SECONDS = 3600
_GC_PREFIX = "gc-"


@dataclass(frozen=True)
class StagedBlob:
    """A complete copy of an adapter folder in the temp area, not yet visible in the store."""

    path: Path
    files: dict[str, FileRecord]
    digest: str

    @property
    def size_bytes(self) -> int:
        return sum(record.size for record in self.files.values())


def manifest_digest(files: dict[str, FileRecord]) -> str:
    """The blob digest: sha256 over "relpath\\0sha256\\n" lines sorted by relpath."""
    manifest = "".join(f"{name}\0{files[name].sha256}\n" for name in sorted(files))
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


def copy_file(src: Path, dst: Path) -> FileRecord:
    """Copy one regular file (never following a symlink), hashing the bytes as they are written."""
    digest, size = hashlib.sha256(), 0
    src_fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        with os.fdopen(src_fd, "rb", closefd=False) as reader, open(dst, "xb") as writer:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
            writer.flush()
            os.fsync(writer.fileno())
    finally:
        os.close(src_fd)
    return FileRecord(sha256=digest.hexdigest(), size=size)


def hash_file(path: Path) -> FileRecord:
    """sha256 and size of a stored file, refusing to follow a symlink."""
    digest, size = hashlib.sha256(), 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(sha256=digest.hexdigest(), size=size)


def remove_tree(path: Path) -> None:
    """Delete a folder even when its files are read-only (blob files are stored 0444)."""

    def make_writable_and_retry(func, target, _exc_info):
        if os.path.islink(target):  # never chmod through a link: that changes its target
            os.unlink(target)
            return
        os.chmod(target, stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
        func(target)

    if path.is_symlink():  # a link (dangling or not) in place of a folder: remove the link only
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return newest


class BlobStore:
    """The `blobs/` folder of a registry home: staging, publishing, checking and collecting."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "sha256"
        self.temp = self.root / "tmp"

    def path_for(self, digest: str) -> Path:
        return self.objects / digest

    def stage(self, src: Path, names: list[str]) -> StagedBlob:
        """Copy `names` from `src` into a fresh temp folder; StorageError (and no leftovers) on failure."""
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.temp.mkdir(parents=True, exist_ok=True)
            tmp = self.temp / f"import-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            tmp.mkdir()
        except OSError as exc:
            raise StorageError(
                f"cannot create {self.temp}: {exc.strerror or exc}; nothing was changed",
                hint="check free space and permissions of the registry home",
            ) from exc
        try:
            files = {name: self._copy_in(src, tmp, name) for name in names}
            _fsync_dir(tmp)
            return StagedBlob(path=tmp, files=files, digest=manifest_digest(files))
        except BaseException:
            remove_tree(tmp)
            raise

    @staticmethod
    def _copy_in(src: Path, tmp: Path, name: str) -> FileRecord:
        try:
            record = copy_file(src / name, tmp / name)
            os.chmod(tmp / name, 0o444)
        except OSError as exc:
            raise StorageError(
                f"copying {src / name} failed: {exc.strerror or exc}; nothing was changed",
                hint="free some disk space (or fix permissions) and import again",
            ) from exc
        return record

    def discard(self, staged: StagedBlob) -> None:
        remove_tree(staged.path)

    def publish(self, staged: StagedBlob) -> Path:
        """Move a staged folder to `sha256/<digest>/`; reuse an intact existing copy. Call under the lock."""
        target = self.path_for(staged.digest)
        if target.exists():
            if not self.check(staged.digest, staged.files):
                self.discard(staged)
                return target
            self._set_aside(target)
        try:
            os.rename(staged.path, target)
        except OSError as exc:
            self.discard(staged)
            raise StorageError(
                f"cannot move the adapter into {target}: {exc.strerror or exc}; nothing was changed"
            ) from exc
        _fsync_dir(self.objects)
        return target

    def _set_aside(self, blob: Path) -> None:
        """Move a (damaged or unreferenced) blob into the temp area, then delete it."""
        aside = self.temp / f"{_GC_PREFIX}{uuid.uuid4().hex[:12]}"
        os.rename(blob, aside)
        remove_tree(aside)

    def check(self, digest: str, files: dict[str, FileRecord]) -> list[str]:
        """Re-hash a blob against its manifest; one message per missing, truncated or altered file."""
        folder = self.path_for(digest)
        if folder.is_symlink() or (
            folder.exists() and not folder.resolve().is_relative_to(self.objects.resolve())
        ):  # never read an adapter through a link, even to another blob
            inside = folder.resolve().is_relative_to(self.objects.resolve())
            where = "to another blob" if inside else "pointing outside the store"
            return [f"blob folder {folder} was replaced by a link {where}"]
        if not folder.is_dir():
            return [f"blob folder {folder} is missing"]
        problems = []
        for name in sorted(files):
            problem = self._check_file(folder / name, name, files[name])
            if problem:
                problems.append(problem)
        present = {item.name for item in folder.iterdir()}
        problems += [
            f"{name} is unexpected (not part of the stored adapter)"
            for name in sorted(present - set(files))
        ]
        return problems

    @staticmethod
    def _check_file(path: Path, name: str, expected: FileRecord) -> str | None:
        if path.is_symlink():
            return f"{name} was replaced by a symlink"
        if not path.is_file():
            return f"{name} is missing"
        try:
            actual = hash_file(path)
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
        if actual.size < expected.size:
            return f"{name} is truncated ({actual.size} of {expected.size} bytes)"
        if actual.size > expected.size:
            return f"{name} has grown ({actual.size} bytes, expected {expected.size})"
        if actual.sha256 != expected.sha256:
            return f"{name} is altered (sha256 {actual.sha256[:12]}…, expected {expected.sha256[:12]}…)"
        return None

    def digests(self) -> set[str]:
        """The digests of every blob folder in the store."""
        try:
            return {p.name for p in self.objects.iterdir()} if self.objects.is_dir() else set()
        except OSError as exc:
            raise StorageError(f"cannot list {self.objects}: {exc.strerror or exc}") from exc

    def collect(
        self, garbage: set[str], *, stale_after: float = STALE_TEMP_SECONDS
    ) -> tuple[int, int, int]:
        """Delete the blobs named in `garbage` and stale temp folders; return (blobs, temp
        folders, bytes). The caller decides what is garbage; call under the lock."""
        removed_blobs = removed_temp = freed = 0
        if self.objects.is_dir():
            for blob in sorted(self.objects.iterdir()):
                if blob.name not in garbage:
                    continue
                freed += _tree_size(blob)
                self._set_aside(blob)
                removed_blobs += 1
        if self.temp.is_dir():
            cutoff = time.time() - stale_after
            for tmp in sorted(self.temp.iterdir()):
                if tmp.name.startswith(_GC_PREFIX) or _newest_mtime(tmp) < cutoff:
                    freed += _tree_size(tmp)
                    remove_tree(tmp)
                    removed_temp += 1
        return removed_blobs, removed_temp, freed
