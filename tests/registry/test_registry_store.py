"""The blob store on its own, on real files: the digest formula, copying and hashing, staging,
publishing, checking and collecting, each checked against hashlib and the file system.

Fast (no PEFT, no torch): `make mutation` runs these first for registry/store.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from adaptory.registry.entry import FileRecord
from adaptory.registry.errors import StorageError
from adaptory.registry.store import (
    CHUNK,
    STALE_TEMP_SECONDS,
    BlobStore,
    copy_file,
    hash_file,
    manifest_digest,
    remove_tree,
)

SEED = 20240611


def _bytes(n: int, seed: int = SEED) -> bytes:
    return random.Random(seed).randbytes(n)


def _record(data: bytes) -> FileRecord:
    return FileRecord(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _adapter(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": _bytes(3000)}


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _published(store: BlobStore, tmp_path: Path, files=FILES):
    staged = store.stage(_adapter(tmp_path / "src", files), sorted(files))
    return staged, store.publish(staged)


# --- the digest --------------------------------------------------------------------------------


def test_the_digest_is_sha256_of_the_sorted_manifest_lines():
    files = {"b.bin": _record(b"bb"), "a.json": _record(b"a"), "a/c": _record(b"")}
    lines = "".join(f"{n}\0{files[n].sha256}\n" for n in ["a.json", "a/c", "b.bin"])
    assert manifest_digest(files) == hashlib.sha256(lines.encode()).hexdigest()
    assert manifest_digest(dict(reversed(files.items()))) == manifest_digest(files)


def test_the_digest_changes_with_any_name_or_content_but_not_with_sizes():
    files = {"a": _record(b"1"), "b": _record(b"2")}
    digest = manifest_digest(files)
    assert manifest_digest({"a": _record(b"1"), "c": _record(b"2")}) != digest
    assert manifest_digest({"a": _record(b"1"), "b": _record(b"3")}) != digest
    assert manifest_digest({"a": files["a"]}) != digest
    resized = {"a": files["a"], "b": FileRecord(files["b"].sha256, 99)}
    assert manifest_digest(resized) == digest  # the size is implied by the content


# --- copying and hashing -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 17])
def test_copy_file_copies_every_byte_and_reports_hashlib_sha256(tmp_path, size):
    data = _bytes(size)
    (tmp_path / "src").write_bytes(data)
    record = copy_file(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == data
    assert record == _record(data)
    assert hash_file(tmp_path / "dst") == _record(data)


def test_copy_file_never_follows_a_symlink_and_never_overwrites(tmp_path):
    (tmp_path / "secret").write_bytes(b"outside")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError):
        copy_file(tmp_path / "link", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    with pytest.raises(OSError):
        hash_file(tmp_path / "link")
    (tmp_path / "taken").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        copy_file(tmp_path / "secret", tmp_path / "taken")
    assert (tmp_path / "taken").read_bytes() == b"keep"


def test_copy_file_closes_what_it_opens(tmp_path):
    (tmp_path / "src").write_bytes(b"x" * 10)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        copy_file(tmp_path / "src", tmp_path / f"dst{i}")
        hash_file(tmp_path / f"dst{i}")
    assert len(os.listdir("/proc/self/fd")) == before


def test_remove_tree_removes_read_only_trees_and_ignores_missing_paths(tmp_path):
    tree = _adapter(tmp_path / "t", {"a": b"1", "b": b"2"})
    (tree / "sub").mkdir()
    (tree / "sub" / "c").write_bytes(b"3")
    for path in (tree / "a", tree / "b", tree / "sub" / "c"):
        os.chmod(path, 0o444)
    remove_tree(tree)
    assert not tree.exists()
    remove_tree(tmp_path / "never-there")  # no error


def test_remove_tree_removes_a_dangling_link_itself(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    remove_tree(tmp_path / "dangling")
    assert not (tmp_path / "dangling").is_symlink()


def test_remove_tree_of_a_link_removes_the_link_and_leaves_its_target_alone(tmp_path):
    outside = _adapter(tmp_path / "outside", {"f": b"keep"})
    os.chmod(outside, 0o755)
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    remove_tree(tmp_path / "link")
    assert (outside / "f").read_bytes() == b"keep"
    assert outside.stat().st_mode & 0o777 == 0o755
    assert not (tmp_path / "link").is_symlink()


def test_publishing_over_a_blob_swapped_for_a_link_leaves_no_link_and_no_chmod(store, tmp_path):
    staged, target = _published(store, tmp_path)
    outside = _adapter(tmp_path / "outside", FILES)
    os.chmod(outside, 0o755)
    remove_tree(target)
    target.symlink_to(outside, target_is_directory=True)
    again = store.stage(tmp_path / "src", sorted(FILES))
    assert store.publish(again) == target
    assert not target.is_symlink() and store.check(staged.digest, staged.files) == []
    assert outside.stat().st_mode & 0o777 == 0o755  # nothing outside the home was changed
    assert list(store.temp.iterdir()) == []  # the link was set aside and removed


# --- staging and publishing --------------------------------------------------------------------


def test_stage_copies_only_the_named_files_read_only_into_the_temp_area(store, tmp_path):
    src = _adapter(tmp_path / "src", {**FILES, "README.md": b"not part of it"})
    staged = store.stage(src, sorted(FILES))
    assert staged.path.parent == store.temp
    assert staged.path.name.startswith(f"import-{os.getpid()}-")
    assert sorted(p.name for p in staged.path.iterdir()) == sorted(FILES)
    for name, data in FILES.items():
        assert (staged.path / name).read_bytes() == data
        assert (staged.path / name).stat().st_mode & 0o777 == 0o444
    assert staged.files == {name: _record(data) for name, data in FILES.items()}
    assert staged.digest == manifest_digest(staged.files)
    assert staged.size_bytes == sum(len(d) for d in FILES.values())
    assert list(store.objects.iterdir()) == []  # nothing visible yet


def test_a_failed_stage_names_the_file_and_leaves_no_temp_folder(store, tmp_path):
    src = _adapter(tmp_path / "src", FILES)
    with pytest.raises(StorageError) as info:
        store.stage(src, [*sorted(FILES), "missing.bin"])
    assert f"copying {src / 'missing.bin'} failed" in info.value.message
    assert "nothing was changed" in info.value.message
    assert list(store.temp.iterdir()) == []


def test_a_stage_that_cannot_create_the_temp_area_is_a_storage_error(tmp_path):
    (tmp_path / "blobs").write_text("a file where the folder should be")
    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(StorageError, match="cannot create .*nothing was changed"):
        store.stage(_adapter(tmp_path / "src", FILES), sorted(FILES))


def test_publish_moves_the_staged_folder_to_its_digest(store, tmp_path):
    staged, target = _published(store, tmp_path)
    assert target == store.objects / staged.digest == store.path_for(staged.digest)
    assert not staged.path.exists()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == FILES
    assert store.check(staged.digest, staged.files) == []
    assert store.digests() == {staged.digest}


def test_publishing_the_same_files_again_keeps_the_intact_copy(store, tmp_path):
    first, target = _published(store, tmp_path)
    inode = target.stat().st_ino
    second = store.stage(tmp_path / "src", sorted(FILES))
    assert second.digest == first.digest
    assert store.publish(second) == target
    assert target.stat().st_ino == inode  # the existing folder was kept, not replaced
    assert not second.path.exists()
    assert list(store.temp.iterdir()) == []


def test_publishing_over_a_damaged_copy_replaces_it(store, tmp_path):
    first, target = _published(store, tmp_path)
    victim = target / "adapter_model.safetensors"
    os.chmod(victim, 0o644)
    victim.write_bytes(b"damaged")
    second = store.stage(tmp_path / "src", sorted(FILES))
    assert store.publish(second) == target
    assert store.check(first.digest, first.files) == []
    assert list(store.temp.iterdir()) == []  # the damaged copy was set aside and deleted


def test_a_failed_rename_is_a_storage_error_and_discards_the_staged_copy(store, tmp_path):
    staged = store.stage(_adapter(tmp_path / "src", FILES), sorted(FILES))
    os.rmdir(store.objects)
    store.objects.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot move the adapter into"):
        store.publish(staged)
    assert not staged.path.exists()


# --- checking ----------------------------------------------------------------------------------


def test_check_names_each_problem_exactly(store, tmp_path):
    files = {"a.bin": b"a" * 10, "b.bin": b"b" * 10, "c.bin": b"c" * 10, "d.bin": b"d" * 10,
             "e.bin": b"e" * 10}  # fmt: skip
    staged, target = _published(store, tmp_path, files)
    for name in files:
        os.chmod(target / name, 0o644)
    (target / "a.bin").unlink()
    (target / "b.bin").write_bytes(b"b" * 4)
    (target / "c.bin").write_bytes(b"c" * 11)
    (target / "d.bin").write_bytes(b"D" * 10)
    (target / "e.bin").unlink()
    (target / "e.bin").symlink_to(tmp_path / "src" / "e.bin")
    (target / "z.extra").write_bytes(b"")
    altered = hashlib.sha256(b"D" * 10).hexdigest()[:12]
    expected = hashlib.sha256(b"d" * 10).hexdigest()[:12]
    assert store.check(staged.digest, staged.files) == [
        "a.bin is missing",
        "b.bin is truncated (4 of 10 bytes)",
        "c.bin has grown (11 bytes, expected 10)",
        f"d.bin is altered (sha256 {altered}…, expected {expected}…)",
        "e.bin was replaced by a symlink",
        "z.extra is unexpected (not part of the stored adapter)",
    ]


def test_check_finds_every_alteration_that_keeps_the_size(store, tmp_path):
    """Sixteen different contents of the right size: each is reported, whichever way its hash
    compares with the stored one."""
    staged, target = _published(store, tmp_path)
    name = "adapter_model.safetensors"
    os.chmod(target / name, 0o644)
    for seed in range(16):
        (target / name).write_bytes(_bytes(len(FILES[name]), seed=seed))
        problems = store.check(staged.digest, staged.files)
        assert len(problems) == 1 and problems[0].startswith(f"{name} is altered"), (seed, problems)


def test_check_reports_a_blob_folder_linked_to_another_blob(store, tmp_path):
    """A link is refused even when it points at another blob inside the store."""
    first, target = _published(store, tmp_path)
    other_files = {**FILES, "adapter_model.safetensors": _bytes(3000, seed=1)}
    _, other = _published(store, tmp_path / "other", other_files)
    remove_tree(target)
    target.symlink_to(other, target_is_directory=True)
    (problem,) = store.check(first.digest, first.files)
    assert problem == f"blob folder {target} was replaced by a link to another blob"


def test_check_reports_a_missing_folder_and_a_folder_swapped_for_a_link(store, tmp_path):
    staged, target = _published(store, tmp_path)
    outside = _adapter(tmp_path / "outside", FILES)
    remove_tree(target)
    assert store.check(staged.digest, staged.files) == [f"blob folder {target} is missing"]
    target.symlink_to(outside, target_is_directory=True)
    assert store.check(staged.digest, staged.files) == [
        f"blob folder {target} was replaced by a link pointing outside the store"
    ]


def test_check_of_an_unreadable_file_names_it(store, tmp_path):
    staged, target = _published(store, tmp_path)
    (target / "adapter_config.json").unlink()
    (target / "adapter_config.json").mkdir()  # is_file() is False: reported as missing
    assert store.check(staged.digest, staged.files) == ["adapter_config.json is missing"]


def test_digests_of_an_empty_or_absent_store(store, tmp_path):
    assert store.digests() == set()
    staged, _ = _published(store, tmp_path)
    assert store.digests() == {staged.digest}


# --- collecting --------------------------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    for p in (*path.rglob("*"), path):
        os.utime(p, (when, when), follow_symlinks=False)


def test_collect_deletes_only_the_named_blobs_and_counts_their_bytes(store, tmp_path):
    keep, _ = _published(store, tmp_path / "k", {"a": b"x" * 5})
    drop, _ = _published(store, tmp_path / "d", {"a": b"y" * 7, "b": b"z" * 11})
    assert store.collect({drop.digest, "not-a-blob"}) == (1, 0, 18)
    assert store.digests() == {keep.digest}
    assert list(store.temp.iterdir()) == []  # the set-aside copy is gone too


def test_collect_removes_stale_and_set_aside_temp_folders_only(store, tmp_path):
    store.temp.mkdir(parents=True)
    stale = _adapter(store.temp / "import-1-stale", {"f": b"s" * 3})
    fresh = _adapter(store.temp / "import-2-fresh", {"f": b"f" * 4})
    mixed = _adapter(store.temp / "import-3-mixed", {"old": b"o", "new": b"n" * 2})
    _adapter(store.temp / "gc-123456789abc", {"f": b"g" * 5})
    _age(stale, STALE_TEMP_SECONDS + 60)
    _age(mixed, STALE_TEMP_SECONDS + 60)
    os.utime(mixed / "new")  # one file written just now keeps the folder; the fresh gc- one goes
    removed = store.collect(set())
    assert removed == (0, 2, 3 + 5)
    assert sorted(p.name for p in store.temp.iterdir()) == [fresh.name, mixed.name]


def test_collect_with_a_short_staleness_takes_everything_older(store, tmp_path):
    store.temp.mkdir(parents=True)
    folder = _adapter(store.temp / "import-9", {"f": b"1"})
    _age(folder, 10)
    assert store.collect(set(), stale_after=5) == (0, 1, 1)
    assert store.collect(set(), stale_after=5) == (0, 0, 0)
