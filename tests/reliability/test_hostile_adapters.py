"""Hostile adapters: each is refused with a clear error, and nothing outside the home is read or
written. A sentinel file outside the home (unique content, atime set before its mtime so that any
read moves it, relatime or not) and a FIFO (opening it would block) are the symlink targets; a
planted pickle would create a marker file if it were ever unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptory.cli.main import cli
from adaptory.registry import Registry
from adaptory.registry.errors import AdaptoryError, ConfigError, IntegrityError, InvalidAdapter
from adaptory.registry.testing import make_lora_folder

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, atime and O_NOFOLLOW")
SECRET = b"SENTINEL-7f3a9c1e-outside-the-home"


class Outside:
    """Files outside the home that must never be read (atime, content) or written."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.root = root
        self.sentinel = root / "sentinel.safetensors"
        self.sentinel.write_bytes(SECRET * 64)
        self.fifo = root / "fifo"
        os.mkfifo(self.fifo)
        self.marker = root / "pickle-ran"
        stat_ = self.sentinel.stat()
        os.utime(self.sentinel, ns=(stat_.st_mtime_ns - 10**10, stat_.st_mtime_ns))
        self.before = self.sentinel.stat()

    def assert_untouched(self, home: Path) -> None:
        after = self.sentinel.stat()
        assert after.st_atime_ns == self.before.st_atime_ns, "the sentinel outside was read"
        assert after.st_mtime_ns == self.before.st_mtime_ns
        assert self.sentinel.read_bytes() == SECRET * 64
        os.utime(self.sentinel, ns=(self.before.st_atime_ns, self.before.st_mtime_ns))
        assert not self.marker.exists(), "a pickle was unpickled"
        assert sorted(p.name for p in self.root.iterdir()) == ["fifo", "sentinel.safetensors"]
        for path in home.rglob("*") if home.exists() else ():
            if path.is_file() and not path.is_symlink():
                assert SECRET not in path.read_bytes(), f"{path} holds bytes from outside"


class Bomb:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def outside(tmp_path):
    out = Outside(tmp_path / "outside")
    control = tmp_path / "control"
    control.write_bytes(b"x")
    st = control.stat()
    os.utime(control, ns=(st.st_mtime_ns - 10**10, st.st_mtime_ns))
    control.read_bytes()
    if control.stat().st_atime_ns == st.st_mtime_ns - 10**10:
        pytest.skip("this filesystem does not update atime (noatime); cannot prove no read")
    return out


@pytest.fixture(autouse=True)
def no_blocking_forever():
    """Opening the FIFO would block: fail the test after 20 s instead of hanging."""

    def timeout(*_):
        raise TimeoutError("blocked, probably opening the FIFO outside the home")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _hostile(kind: str, folder: Path, out: Outside) -> str:
    """Build one hostile folder; return a fragment the refusal must contain."""
    make_lora_folder(folder)
    weights = folder / "adapter_model.safetensors"
    if kind == "unknown-field":
        _config(folder, exec_on_load="import os; os.system('id')")
        return "fields unknown to LoraConfig"
    if kind == "absurd-rank":
        _config(folder, r=10**9)
        return "is absurd"
    if kind == "negative-rank-pattern":
        _config(folder, rank_pattern={"q_proj": -1})
        return "is absurd"
    if kind == "lying-header-size":
        _write_safetensors(
            weights,
            {"w": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 64]}},
            b"0" * 64,
        )
        return "needs 4194304 bytes"
    if kind == "lying-header-offsets":
        _write_safetensors(
            weights, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**40]}}, b"0" * 16
        )
        return "lies outside the file"
    if kind == "huge-header-length":
        weights.write_bytes(struct.pack("<Q", 2**62) + b"{}")
        return "header claims"
    if kind == "weights-symlink-outside":
        weights.unlink()
        weights.symlink_to(out.sentinel)
        return "symlink"
    if kind == "readme-symlink-to-fifo":
        (folder / "README.md").symlink_to(out.fifo)
        return "symlink"
    if kind == "folder-symlink-outside":
        target = out.root.parent / "real-folder"
        folder.rename(target)
        folder.symlink_to(target)
        return "not a directory"
    if kind == "pickle-beside":
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(Bomb(out.marker)))
        return "pickle"
    if kind == "pickle-only":
        weights.unlink()
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(Bomb(out.marker)))
        return "pickle"
    if kind == "fifo-in-folder":
        os.mkfifo(folder / "notes.txt")
        return "not a regular file"
    if kind == "config-not-json":
        (folder / "adapter_config.json").write_bytes(b"\xff\xfe{not json")
        return "adapter_config.json"
    raise AssertionError(kind)


KINDS = [
    "unknown-field", "absurd-rank", "negative-rank-pattern", "lying-header-size",
    "lying-header-offsets", "huge-header-length", "weights-symlink-outside",
    "readme-symlink-to-fifo", "folder-symlink-outside", "pickle-beside", "pickle-only",
    "fifo-in-folder", "config-not-json",
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_folders_are_refused_by_the_library_and_the_cli(kind, tmp_path, outside):
    home = tmp_path / "home"
    reg = Registry(home)
    reg.add(make_lora_folder(tmp_path / "good"), name="good")
    folder = tmp_path / "hostile"
    fragment = _hostile(kind, folder, outside)
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))

    with pytest.raises(InvalidAdapter, match=fragment) as raised:
        reg.add(folder, name="evil")
    assert raised.value.exit_code == 2 and "\n" not in raised.value.message
    result = CliRunner().invoke(cli, ["--home", str(home), "import", str(folder), "--name", "evil"])
    assert result.exit_code == 2, result.output
    assert result.output.lstrip().startswith("error:") and "Traceback" not in result.output

    assert [e.ref for e in reg.list()] == ["good:1"]
    after = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert [p for p in after if p not in before and not p.startswith("catalog.db")] == []
    assert reg.verify() == []
    outside.assert_untouched(home)


# --- damage planted inside the blob store after import -----------------------------------------


def _plant(kind: str, blob: Path, out: Outside) -> None:
    os.chmod(blob, 0o755)
    weights = blob / "adapter_model.safetensors"
    if kind == "pickle-planted":
        (blob / "adapter_model.bin").write_bytes(pickle.dumps(Bomb(out.marker)))
    elif kind == "weights-replaced-by-symlink":
        os.chmod(weights, 0o644)
        weights.unlink()
        weights.symlink_to(out.sentinel)
    elif kind == "weights-replaced-by-lying-header":
        os.chmod(weights, 0o644)
        size = weights.stat().st_size
        header = {"w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4 * 10**6]}}
        raw = json.dumps(header).encode()
        weights.write_bytes((struct.pack("<Q", len(raw)) + raw).ljust(size, b"\0"))
    elif kind == "config-rewritten":
        config = blob / "adapter_config.json"
        os.chmod(config, 0o644)
        config.write_text(config.read_text().replace('"r": 4', '"r": 5'))
    elif kind == "fifo-planted":
        os.mkfifo(blob / "extra")
    else:
        raise AssertionError(kind)


PLANTED = [
    "pickle-planted", "weights-replaced-by-symlink", "weights-replaced-by-lying-header",
    "config-rewritten", "fifo-planted",
]  # fmt: skip


@pytest.mark.parametrize("kind", PLANTED)
def test_damage_planted_in_the_store_is_caught_by_verify_and_files(kind, tmp_path, outside):
    home = tmp_path / "home"
    reg = Registry(home)
    entry = reg.add(make_lora_folder(tmp_path / "a"), name="victim")
    _plant(kind, reg.files(entry, verify=False), outside)

    problems = reg.verify()
    assert [p.entry_ref for p in problems] == ["victim:1"], problems
    with pytest.raises(IntegrityError) as raised:
        reg.files("victim")
    assert raised.value.exit_code == 4
    result = CliRunner().invoke(cli, ["--home", str(home), "verify"])
    assert result.exit_code != 0 and "victim:1" in result.output
    outside.assert_untouched(home)
    # importing the same files again repairs the blob
    reg.add(make_lora_folder(tmp_path / "again"), name="victim")
    assert reg.verify() == []
    outside.assert_untouched(home)


# --- refused at load time: the runtime and training ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_runtime(tmp_path_factory, tiny_llama_dir):
    from adaptory.adapters.base import load_base
    from adaptory.adapters.runtime import Runtime

    reg = Registry(tmp_path_factory.mktemp("hostile-rt") / "home")
    fingerprint = load_base(str(tiny_llama_dir), task="causal-lm").fingerprint.to_dict()
    return Runtime(str(tiny_llama_dir), registry=reg, max_adapters=2), fingerprint


def _register(reg, folder, name, fingerprint, base):
    return reg.add(
        folder, name=name, task="causal-lm", base_model=str(base), base_fingerprint=fingerprint
    )


def test_target_modules_the_base_lacks_are_refused_at_load(tiny_runtime, tmp_path, tiny_llama_dir):
    runtime, fingerprint = tiny_runtime
    folder = make_lora_folder(tmp_path / "x", hidden=64, target_modules=("no_such_proj",))
    _register(runtime.registry, folder, "missing-target", fingerprint, tiny_llama_dir)
    with pytest.raises(ConfigError, match="no module .*no_such_proj"):
        runtime.load("missing-target")
    assert "missing-target:1" not in runtime.resident()


def test_a_planted_pickle_is_refused_at_load_and_never_unpickled(
    tiny_runtime, tmp_path, tiny_llama_dir, outside
):
    runtime, fingerprint = tiny_runtime
    reg = runtime.registry
    entry = _register(
        reg, make_lora_folder(tmp_path / "p", hidden=64), "planted", fingerprint, tiny_llama_dir
    )
    _plant("pickle-planted", reg.files(entry, verify=False), outside)
    with pytest.raises(IntegrityError, match="unexpected"):
        runtime.load("planted")
    outside.assert_untouched(reg.home)


def test_a_symlink_planted_in_the_store_is_refused_at_load(
    tiny_runtime, tmp_path, tiny_llama_dir, outside
):
    runtime, fingerprint = tiny_runtime
    reg = runtime.registry
    entry = _register(
        reg, make_lora_folder(tmp_path / "s", hidden=64), "linked", fingerprint, tiny_llama_dir
    )
    _plant("weights-replaced-by-symlink", reg.files(entry, verify=False), outside)
    with pytest.raises(IntegrityError, match="symlink"):
        runtime.load("linked")
    outside.assert_untouched(reg.home)


def test_lora_shapes_that_do_not_fit_the_base_are_refused_at_load(
    tiny_runtime, tmp_path, tiny_llama_dir
):
    """Right module names, wrong width (32 instead of the base's 64): refused when loading, not
    discovered by a matrix-multiply error in the middle of a batch shared with other requests."""
    runtime, fingerprint = tiny_runtime
    folder = make_lora_folder(tmp_path / "w", hidden=32)
    _register(runtime.registry, folder, "wrong-width", fingerprint, tiny_llama_dir)
    with pytest.raises(AdaptoryError, match="wrong-width") as raised:
        runtime.load("wrong-width")
    assert "expects" in raised.value.message  # names the layer and both shapes
    assert "wrong-width:1" not in runtime.resident()


def test_training_with_target_modules_the_base_lacks_is_a_clear_error(tmp_path, tiny_llama_dir):
    from adaptory.adapters.train import TrainConfig, train_adapter

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "completion": " sat"}) + "\n" * 1)
    config = TrainConfig(
        base=str(tiny_llama_dir), data=str(data), name="t", target_modules=["no_such_proj"],
        max_steps=1, eval_split=0,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no_such_proj") as raised:
        train_adapter(config, registry=Registry(tmp_path / "home"), show_progress=False)
    assert "q_proj" in raised.value.hint  # says what the base does have
    assert Registry(tmp_path / "home").list() == []


def test_blob_store_entries_are_plain_read_only_files(tmp_path):
    reg = Registry(tmp_path / "home")
    entry = reg.add(make_lora_folder(tmp_path / "a"), name="a")
    for path in reg.files(entry).iterdir():
        mode = path.lstat().st_mode
        assert stat.S_ISREG(mode) and not mode & 0o222, path


def test_blob_folder_swapped_for_a_link_outside_the_home_is_refused(tmp_path):
    """A whole blob folder replaced by a symlink to a copy outside the home: verify names it and
    loading refuses it, even though the files behind the link hash correctly."""
    import shutil

    reg = Registry(tmp_path / "home")
    entry = reg.add(make_lora_folder(tmp_path / "src"), name="swapped")
    blob = reg.files(entry)
    outside = tmp_path / "outside-copy"
    shutil.copytree(blob, outside)
    for path in blob.iterdir():
        path.chmod(0o644)
    shutil.rmtree(blob)
    blob.symlink_to(outside, target_is_directory=True)
    problems = reg.verify()
    assert len(problems) == 1 and "outside the store" in problems[0].message
    with pytest.raises(IntegrityError, match="outside the store"):
        reg.files(entry)
