"""The Registry library: versions, tags, removal, integrity checks, gc and metadata updates."""

import errno
import json
import os

import pytest

from adaptory.registry import Entry, Registry
from adaptory.registry.errors import AdapterNotFound, IntegrityError, InvalidName, StorageError
from adaptory.registry.testing import make_lora_folder


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "home")


@pytest.fixture
def folders(tmp_path):
    return [make_lora_folder(tmp_path / f"src{i}", seed=i) for i in range(3)]


def writable(path):
    os.chmod(path, 0o644)
    return path


def test_registry_creates_its_home_on_the_first_write_and_reads_write_nothing(tmp_path, folders):
    home = tmp_path / "home"
    reg = Registry(home)
    assert reg.list() == []
    assert not home.exists()  # a read never creates anything
    reg.add(folders[0], name="a")
    assert (home / "catalog.db").is_file()
    import sqlite3

    with sqlite3.connect(home / "catalog.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = [r[0] for r in conn.execute("SELECT name FROM schema_version ORDER BY name")]
    assert names == [
        "m001_entries", "m002_tags", "m003_version_counters", "m004_blob_lifecycle",
    ]  # fmt: skip
    assert Registry(home).catalog.initialize() == []


def test_add_fills_defaults_from_the_adapter_config(reg, folders):
    entry = reg.add(folders[0], name="demo", metrics={"accuracy": 0.5}, tags=["prod"])
    assert isinstance(entry, Entry)
    assert (entry.name, entry.version, entry.ref) == ("demo", 1, "demo:1")
    assert (entry.method, entry.task, entry.base_model) == ("lora", "causal-lm", "tiny-llama")
    assert entry.peft_config == json.loads((folders[0] / "adapter_config.json").read_text())
    assert entry.tags == ["prod"] and entry.metrics == {"accuracy": 0.5}
    assert entry.size_bytes == sum(p.stat().st_size for p in folders[0].iterdir())
    assert set(entry.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert entry.created_at.endswith("+00:00")
    data = entry.to_dict()
    json.dumps(data)
    assert data["ref"] == "demo:1" and data["digest"] == entry.digest
    blob = reg.files(entry)
    assert blob == reg.home / "blobs" / "sha256" / entry.digest
    assert sorted(p.name for p in blob.iterdir()) == sorted(entry.files)


def test_versions_increment_per_name_and_are_never_reused(reg, folders):
    assert [reg.add(folders[i % 3], name="a").version for i in range(3)] == [1, 2, 3]
    assert reg.add(folders[0], name="b").version == 1
    assert reg.resolve("a").version == 3
    reg.remove("a:3")
    assert reg.resolve("a").version == 2
    assert reg.add(folders[1], name="a").version == 4
    assert [(e.name, e.version) for e in reg.list()] == [("a", 1), ("a", 2), ("a", 4), ("b", 1)]


def test_identical_files_share_one_blob(reg, folders):
    one, two = reg.add(folders[0], name="a"), reg.add(folders[0], name="b")
    assert one.digest == two.digest
    assert len(list((reg.home / "blobs" / "sha256").iterdir())) == 1


def test_tags_move_between_versions_and_can_be_removed(reg, folders):
    reg.add(folders[0], name="a", tags=["prod"])
    reg.add(folders[1], name="a")
    reg.add(folders[0], name="other", tags=["prod"])
    assert reg.resolve("a:prod").version == 1
    moved = reg.tag("a:2", "prod")
    assert moved.tags == ["prod"] and reg.resolve("a:1").tags == []
    assert reg.resolve("a:prod").version == 2
    assert reg.resolve("other:prod").version == 1
    assert [e.ref for e in reg.list(tag="prod")] == ["a:2", "other:1"]
    assert reg.untag("a:prod", "prod").tags == []
    with pytest.raises(AdapterNotFound, match="no adapter 'a:prod'"):
        reg.resolve("a:prod")
    with pytest.raises(AdapterNotFound, match="has no tag 'prod'"):
        reg.untag("a:2", "prod")
    with pytest.raises(InvalidName, match="is a number"):
        reg.tag("a:2", "2")


def test_resolve_hints_at_close_names_and_existing_versions(reg, folders):
    reg.add(folders[0], name="sentiment")
    with pytest.raises(AdapterNotFound) as info:
        reg.resolve("sentimnt")
    assert "sentiment" in info.value.hint
    with pytest.raises(AdapterNotFound) as info:
        reg.resolve("sentiment:7")
    assert "versions 1" in info.value.hint


def test_list_filters_by_base_task_tag_and_name(reg, folders, tmp_path):
    reg.add(folders[0], name="a")
    reg.add(folders[1], name="b", base_model="other-base", task="seq-cls", tags=["x"])
    assert [e.name for e in reg.list(base="tiny-llama")] == ["a"]
    assert [e.name for e in reg.list(task="seq-cls")] == ["b"]
    assert [e.name for e in reg.list(tag="x")] == ["b"]
    assert [e.name for e in reg.list(name="a")] == ["a"]


def test_remove_keeps_the_blob_until_gc_and_gc_keeps_referenced_blobs(reg, folders):
    keep = reg.add(folders[0], name="keep")
    gone = reg.add(folders[1], name="gone", tags=["t"])
    shared = reg.add(folders[0], name="shared")
    reg.remove("gone")
    reg.remove("shared")
    assert reg.store.path_for(gone.digest).is_dir()
    result = reg.gc()
    assert result.removed_blobs == 1 and result.freed_bytes == gone.size_bytes
    assert not reg.store.path_for(gone.digest).exists()
    assert reg.store.path_for(keep.digest).is_dir() and shared.digest == keep.digest
    assert reg.verify() == []
    assert reg.gc().removed_blobs == 0


def test_gc_removes_only_stale_temp_folders(reg, folders):
    reg.add(folders[0], name="a")
    fresh, stale = reg.home / "blobs" / "tmp" / "fresh", reg.home / "blobs" / "tmp" / "stale"
    for folder in (fresh, stale):
        folder.mkdir()
        (folder / "x").write_bytes(b"123")
    two_hours_ago = os.path.getmtime(stale) - 7200
    os.utime(stale / "x", (two_hours_ago, two_hours_ago))
    os.utime(stale, (two_hours_ago, two_hours_ago))
    result = reg.gc()
    assert (result.removed_temp, result.removed_blobs) == (1, 0)
    assert fresh.exists() and not stale.exists()


def test_files_and_verify_catch_a_flipped_byte_and_a_truncated_file(reg, folders):
    flipped = reg.add(folders[0], name="flipped")
    truncated = reg.add(folders[1], name="truncated")
    reg.add(folders[2], name="fine")
    weights = writable(reg.store.path_for(flipped.digest) / "adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    config = writable(reg.store.path_for(truncated.digest) / "adapter_config.json")
    config.write_bytes(config.read_bytes()[:10])

    with pytest.raises(IntegrityError) as info:
        reg.files("flipped")
    assert (
        "flipped:1" in info.value.message
        and "adapter_model.safetensors is altered" in info.value.message
    )
    with pytest.raises(
        IntegrityError, match=r"truncated:1: adapter_config.json is truncated \(10 of"
    ):
        reg.files(truncated)
    assert reg.files("fine").is_dir()
    assert reg.files("flipped", verify=False).is_dir()

    problems = reg.verify()
    assert [p.entry_ref for p in problems] == ["flipped:1", "truncated:1"]
    assert "adapter_model.safetensors" in problems[0].message
    assert reg.verify("fine") == []


def test_a_missing_file_and_an_extra_file_are_reported(reg, folders):
    entry = reg.add(folders[0], name="a")
    blob = reg.store.path_for(entry.digest)
    (blob / "adapter_config.json").unlink()
    (blob / "adapter_model.bin").write_bytes(b"pickle")
    message = reg.verify()[0].message
    assert "adapter_config.json is missing" in message
    assert "adapter_model.bin is unexpected" in message


def test_importing_again_repairs_a_damaged_blob(reg, folders):
    entry = reg.add(folders[0], name="a")
    weights = writable(reg.store.path_for(entry.digest) / "adapter_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-4])
    assert reg.verify()
    reg.add(folders[0], name="a")
    assert reg.verify() == []


def test_update_merges_metrics_and_extra(reg, folders):
    entry = reg.add(folders[0], name="a", metrics={"loss": 1.0}, extra={"k": 1})
    updated = reg.update(entry, metrics={"accuracy": 0.9}, extra={"j": 2}, description="better")
    assert updated.metrics == {"loss": 1.0, "accuracy": 0.9}
    assert updated.extra == {"k": 1, "j": 2} and updated.description == "better"
    assert reg.resolve("a:1").metrics == updated.metrics


def test_disk_full_during_copy_changes_nothing(reg, folders, monkeypatch):
    reg.add(folders[0], name="a")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("adaptory.registry.store.copy_file", full)
    with pytest.raises(StorageError, match="nothing was changed"):
        reg.add(folders[1], name="a")
    assert [e.ref for e in reg.list()] == ["a:1"]
    assert list((reg.home / "blobs" / "tmp").iterdir()) == []
    assert len(list((reg.home / "blobs" / "sha256").iterdir())) == 1


def test_export_peft_writes_the_files_and_a_model_card(reg, folders, tmp_path):
    from adaptory.registry.errors import BadInput
    from adaptory.registry.export import export_peft

    (folders[0] / "README.md").write_text("---\nlicense: mit\n---\nhand-written notes\n")
    entry = reg.add(
        folders[0],
        name="a",
        tags=["prod"],
        metrics={"accuracy": 0.75},
        loss_history=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
        training_config={"lr": 0.001},
    )
    out = export_peft(reg, entry, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        folders[0] / "adapter_model.safetensors"
    ).read_bytes()
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert 'base_model: "tiny-llama"' in front and "library_name: peft" in front
    assert '- "adaptory"\n- "lora"\n- "causal-lm"\n- "prod"' in front
    assert "accuracy: 0.75" in card and "lr: 0.001" in card and "first 2, last 1, min 1" in card
    assert "hand-written notes" in card
    with pytest.raises(BadInput, match="not empty"):
        export_peft(reg, entry, out)
    assert export_peft(reg, entry, out, force=True) == out
