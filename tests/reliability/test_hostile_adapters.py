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
from adaptory.registry.errors import (
    AdaptoryError,
    BadInput,
    ConfigError,
    IntegrityError,
    InvalidAdapter,
)
from adaptory.registry.testing import make_lora_folder, make_prefix_folder

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


# --- what used to import and then crash `import`, the runtime or the server ---------------------

LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
LORA_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _edit_weights(folder: Path, change) -> None:
    """Rewrite adapter_model.safetensors with `change(header, data) -> (header, data)`."""
    path = folder / "adapter_model.safetensors"
    header, data = _read_header(path)
    header, data = change(header, data)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _retype(dtype: str, convert):
    """Every tensor stored as `dtype`, its values converted with `convert(float32 array)`."""
    import numpy as np

    def change(header, data):
        out, offset = bytearray(), 0
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            begin, end = info["data_offsets"]
            values = convert(np.frombuffer(data[begin:end], dtype="<f4")).tobytes()
            header[name] = dict(info, dtype=dtype, data_offsets=[offset, offset + len(values)])
            out += values
            offset += len(values)
        return header, bytes(out)

    return change


def _poison(name: str, value: float, dtype: str = "<f4"):
    """Overwrite element 5 of tensor `name` with `value` (NaN or an infinity)."""
    import numpy as np

    def change(header, data):
        begin = header[name]["data_offsets"][0] + 5 * np.dtype(dtype).itemsize
        data = bytearray(data)
        data[begin : begin + np.dtype(dtype).itemsize] = np.array([value], dtype=dtype).tobytes()
        return header, bytes(data)

    return change


def _without(name: str):
    """Tensor `name` and its bytes removed, the others packed again."""

    def change(header, data):
        out, kept = bytearray(), {}
        for key in sorted(k for k in header if k not in ("__metadata__", name)):
            begin, end = header[key]["data_offsets"]
            kept[key] = dict(header[key], data_offsets=[len(out), len(out) + end - begin])
            out += data[begin:end]
        return kept, bytes(out)

    return change


def _many_tensors(count: int):
    def change(header, data):
        entries = b",".join(
            b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}' % (i, 4 * i, 4 * i + 4)
            for i in range(count)
        )
        return b"{" + entries + b"}", b"\0" * (4 * count)

    return change


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _refused_at_import(kind: str, folder: Path) -> str:
    """Build one folder that once got through `import` (or crashed it); return a fragment of the
    one-line refusal, which names the field or tensor."""
    if kind.startswith("prefix"):
        make_prefix_folder(folder)
    else:
        make_lora_folder(folder, hidden=64)
    config_path = folder / "adapter_config.json"
    cases = {
        # item 9: a raw traceback (exit 1) or a write before failing
        "task-type-not-a-string": (
            lambda: _config(folder, task_type=5),
            "'task_type' is an integer 5",
        ),
        "peft-type-not-a-string": (
            lambda: _config(folder, peft_type=["LORA"]),
            "peft_type is a list",
        ),
        "rank-pattern-a-list": (
            lambda: _config(folder, rank_pattern=["q_proj"]),
            "'rank_pattern' is a list",
        ),
        "config-nested-100k-deep": (
            lambda: config_path.write_text(
                '{"peft_type": "LORA", "x": ' + "[" * 10**5 + "]" * 10**5 + "}"
            ),
            "nested too deeply",
        ),
        "config-nested-40-deep": (
            lambda: _config(folder, auto_mapping={"a": _nested(40)}),
            "nested deeper than 32",
        ),
        "config-5000-digit-integer": (
            lambda: config_path.write_text(
                config_path.read_text().replace('"r": 4', '"r": ' + "9" * 5000)
            ),
            "too many digits",
        ),
        "base-model-an-object": (
            lambda: _config(folder, base_model_name_or_path={"a": 1}),
            "'base_model_name_or_path' is an object",
        ),
        "file-name-not-utf8": (
            lambda: os.close(
                os.open(os.fsencode(folder) + b"/notes-\xff.txt", os.O_CREAT | os.O_WRONLY)
            ),
            r"file name b'notes-\xff.txt' is not UTF-8",
        ),
        "base-model-a-lone-surrogate": (
            lambda: _config(folder, base_model_name_or_path="\ud800"),
            "the string '\\ud800' holds a lone surrogate escape",
        ),
        "tensor-name-a-lone-surrogate": (
            lambda: _edit_weights(
                folder,
                lambda h, d: ({("\udc00" if k == LORA_A else k): v for k, v in h.items()}, d),
            ),
            "the string '\\udc00' holds a lone surrogate escape",
        ),
        "header-nested-100k-deep": (
            lambda: _edit_weights(
                folder, lambda h, d: (b'{"a": ' + b"[" * 10**5 + b"]" * 10**5 + b"}", d)
            ),
            "nested too deeply",
        ),
        "nan-literal-in-config": (
            lambda: config_path.write_text(
                config_path.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')
            ),
            "NaN is not valid JSON",
        ),
        "huge-float-in-config": (
            lambda: config_path.write_text(
                config_path.read_text().replace('"lora_alpha": 8', '"lora_alpha": 1e999')
            ),
            "out of range",
        ),
        "unknown-task-type": (
            lambda: _config(folder, task_type="CAUSAL"),
            "task_type 'CAUSAL' is unknown",
        ),
        "rank-pattern-not-a-regex": (
            lambda: _config(folder, rank_pattern={"q_proj(": 4}),
            "not a valid regex",
        ),
        "peft-refuses-the-config": (
            lambda: _config(folder, layers_pattern="layers"),
            "PEFT's LoraConfig refuses it: When `layers_pattern` is specified",
        ),
        # item 8: imported, then a 500 (or garbage) when loaded or served
        "alpha-pattern-a-string": (
            lambda: _config(folder, alpha_pattern={"q_proj": "16"}),
            "alpha_pattern['q_proj'] is a string",
        ),
        "metadata-value-not-a-string": (
            lambda: _edit_weights(folder, lambda h, d: ({**h, "__metadata__": {"format": 1}}, d)),
            "__metadata__['format'] is an integer",
        ),
        "empty-tensor-with-huge-dims": (
            lambda: _edit_weights(
                folder,
                lambda h, d: (
                    {
                        **h,
                        "base_model.model.x.lora_A.weight": {
                            "dtype": "F32",
                            "shape": [0, 10**18, 10**18],
                            "data_offsets": [len(d), len(d)],
                        },
                    },
                    d,
                ),
            ),
            "'base_model.model.x.lora_A.weight' is empty",
        ),
        "integer-lora-weights": (
            lambda: _edit_weights(folder, _retype("I32", lambda a: (a * 100).astype("<i4"))),
            "is I32; adapter weights must be floating point",
        ),
        "bool-lora-weights": (
            lambda: _edit_weights(folder, _retype("BOOL", lambda a: a > 0)),
            "is BOOL; adapter weights must be floating point",
        ),
        "nan-in-f32-weights": (
            lambda: _edit_weights(folder, _poison(LORA_A, float("nan"))),
            f"tensor {LORA_A!r} holds NaN or infinite",
        ),
        "inf-in-f16-weights": (
            lambda: (
                _edit_weights(folder, _retype("F16", lambda a: a.astype("<f2"))),
                _edit_weights(folder, _poison(LORA_B, float("-inf"), "<f2")),
            ),
            f"tensor {LORA_B!r} holds NaN or infinite",
        ),
        "nan-in-bf16-weights": (
            lambda: (
                _edit_weights(
                    folder, _retype("BF16", lambda a: (a.view("<u4") >> 16).astype("<u2"))
                ),
                _edit_weights(folder, _poison(LORA_B, 0x7FC1, "<u2")),
            ),
            f"tensor {LORA_B!r} holds NaN or infinite",
        ),
        "nan-in-f64-weights": (
            lambda: (
                _edit_weights(folder, _retype("F64", lambda a: a.astype("<f8"))),
                _edit_weights(folder, _poison(LORA_A, float("inf"), "<f8")),
            ),
            f"tensor {LORA_A!r} holds NaN or infinite",
        ),
        "lora-rank-differs-from-the-config": (
            lambda: _config(folder, r=8, lora_alpha=16),
            "has rank 4 but the config says r=8",
        ),
        "lora-a-without-b": (
            lambda: _edit_weights(folder, _without(LORA_B)),
            "has lora_A but no lora_B",
        ),
        "prefix-without-num-layers": (
            lambda: _config(folder, num_layers=None),
            "num_layers is missing",
        ),
        "prefix-virtual-tokens-a-string": (
            lambda: _config(folder, num_virtual_tokens="16"),
            "'num_virtual_tokens' is a string '16'",
        ),
        "prefix-virtual-tokens-zero": (
            lambda: _config(folder, num_virtual_tokens=0),
            "num_virtual_tokens is an integer 0",
        ),
        "prefix-virtual-tokens-differ-from-the-weights": (
            lambda: _config(folder, num_virtual_tokens=4),
            "prompt_embeddings has shape [3, 256]; the config implies [4, 256]",
        ),
        "prefix-heads-do-not-divide-token-dim": (
            lambda: _config(folder, num_attention_heads=3),
            "not a multiple of num_attention_heads 3",
        ),
        # item 14: sizes refused before the header is parsed
        "header-over-16-mib": (
            lambda: _edit_weights(
                folder, lambda h, d: (json.dumps(h).encode() + b" " * (16 * 2**20), d)
            ),
            "over the 16 MiB limit",
        ),
        "over-100k-tensors": (
            lambda: _edit_weights(folder, _many_tensors(100_001)),
            "more than 100,000 tensors",
        ),
        "config-over-4-mib": (
            lambda: _config(folder, revision="x" * (4 * 2**20)),
            "larger than 4 MiB",
        ),
    }
    build, fragment = cases[kind]
    build()
    return fragment


REFUSED_AT_IMPORT = [
    "task-type-not-a-string", "peft-type-not-a-string", "rank-pattern-a-list",
    "config-nested-100k-deep", "config-nested-40-deep", "config-5000-digit-integer",
    "base-model-an-object", "base-model-a-lone-surrogate", "tensor-name-a-lone-surrogate",
    "file-name-not-utf8", "header-nested-100k-deep",
    "nan-literal-in-config", "huge-float-in-config", "unknown-task-type",
    "rank-pattern-not-a-regex", "peft-refuses-the-config", "alpha-pattern-a-string",
    "metadata-value-not-a-string", "empty-tensor-with-huge-dims", "integer-lora-weights",
    "bool-lora-weights", "nan-in-f32-weights", "inf-in-f16-weights", "nan-in-bf16-weights",
    "nan-in-f64-weights", "lora-rank-differs-from-the-config", "lora-a-without-b",
    "prefix-without-num-layers", "prefix-virtual-tokens-a-string", "prefix-virtual-tokens-zero",
    "prefix-virtual-tokens-differ-from-the-weights", "prefix-heads-do-not-divide-token-dim",
    "header-over-16-mib", "over-100k-tensors", "config-over-4-mib",
]  # fmt: skip


def _home_listing(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


@pytest.mark.parametrize("kind", REFUSED_AT_IMPORT)
def test_adapters_that_would_crash_or_fail_to_load_are_refused_at_import(kind, tmp_path):
    """Each is refused by the library and the CLI with one line naming the file and the field or
    tensor (exit 2, no traceback), and leaves nothing behind: no temp folder, no blob, no row."""
    home = tmp_path / "home"
    reg = Registry(home)
    good = reg.add(make_lora_folder(tmp_path / "good"), name="good")
    folder = tmp_path / "hostile"
    fragment = _refused_at_import(kind, folder)
    before = _home_listing(home)

    with pytest.raises(InvalidAdapter) as raised:
        reg.add(folder, name="evil")
    assert fragment in raised.value.message
    assert raised.value.exit_code == 2 and "\n" not in raised.value.message
    assert str(folder) in raised.value.message  # names the file
    result = CliRunner().invoke(cli, ["--home", str(home), "import", str(folder), "--name", "evil"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    lines = result.output.splitlines()
    assert lines[0].startswith("error:") and fragment in lines[0]
    assert len(lines) <= 2 and all(line.startswith("hint:") for line in lines[1:])

    assert _home_listing(home) == before  # nothing left, not even in tmp
    assert list((home / "blobs" / "tmp").iterdir()) == []
    assert sorted(p.name for p in (home / "blobs" / "sha256").iterdir()) == [good.digest]
    assert [e.ref for e in reg.list()] == ["good:1"]


def test_weights_poisoned_while_importing_are_refused_and_nothing_is_stored(tmp_path):
    """The staged copy is what gets stored, so it is validated again, values included: NaN written
    into the source between validation and copying is caught."""
    home = tmp_path / "home"
    reg = Registry(home)
    folder = make_lora_folder(tmp_path / "src", hidden=64)
    real_stage = reg.store.stage

    def poison_then_stage(src, names):
        _edit_weights(folder, _poison(LORA_A, float("nan")))
        return real_stage(src, names)

    reg.store.stage = poison_then_stage
    with pytest.raises(InvalidAdapter, match=f"changed while being imported .*{LORA_A}.* NaN"):
        reg.add(folder, name="moving")
    assert reg.list() == [] and _temp_and_blobs(home) == ([], [])


def test_text_metadata_of_another_type_is_refused_before_anything_is_written(tmp_path):
    """Text columns hold UTF-8 strings; anything else would fail in SQLite after the blob was
    published (an orphan blob), so it is refused first (a non-UTF-8 --description, say)."""
    home = tmp_path / "home"
    reg = Registry(home)
    for field in ("base_model", "method", "task", "description"):
        with pytest.raises(BadInput, match=f"{field} must be text"):
            reg.add(make_lora_folder(tmp_path / field), name="x", **{field: {"a": 1}})
        with pytest.raises(BadInput, match=rf"{field} is not UTF-8 text: a\\udcff"):
            reg.add(make_lora_folder(tmp_path / field), name="x", **{field: "a\udcff"})
    assert not home.exists() or _temp_and_blobs(home) == ([], [])


def test_a_staging_failure_after_copying_leaves_no_temp_folder(tmp_path):
    """stage() computes the digest inside its cleanup: a name that cannot be encoded (never
    passed by validation, which refuses it) fails there and still leaves nothing."""
    from adaptory.registry.store import BlobStore

    src = make_lora_folder(tmp_path / "src")
    bad = os.fsdecode(b"n\xff.txt")
    (src / bad).write_text("x")
    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(UnicodeEncodeError):
        store.stage(src, ["adapter_config.json", bad])
    assert list(store.temp.iterdir()) == []


def _temp_and_blobs(home: Path) -> tuple[list[str], list[str]]:
    return tuple(
        sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        for folder in (home / "blobs" / "tmp", home / "blobs" / "sha256")
    )


def _store_unchecked(reg: Registry, folder: Path, name: str, monkeypatch, **kwargs):
    """Store `folder` as an older Adaptory would have: only the folder's shape and JSON checked."""
    import adaptory.registry.registry as registry_module
    from adaptory.registry.adapter_files import AdapterFolder, scan_folder

    def old_validation(src):
        config = json.loads((Path(src) / "adapter_config.json").read_text())
        return AdapterFolder(config=config, files=scan_folder(Path(src)))

    with monkeypatch.context() as patch:
        patch.setattr(registry_module, "validate_adapter_folder", old_validation)
        patch.setattr(registry_module, "_check_unchanged", lambda *args: None)
        return reg.add(folder, name=name, **kwargs)


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
    from adaptory.adapters.bases.loading import load_base
    from adaptory.adapters.serving.runtime import Runtime

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


STORED_BEFORE_THE_CHECKS = [
    "alpha-pattern-a-string", "metadata-value-not-a-string", "empty-tensor-with-huge-dims",
    "integer-lora-weights", "bool-lora-weights", "nan-in-f32-weights", "nan-in-bf16-weights",
    "lora-rank-differs-from-the-config", "prefix-without-num-layers",
    "prefix-virtual-tokens-a-string", "prefix-virtual-tokens-zero",
    "prefix-virtual-tokens-differ-from-the-weights",
]  # fmt: skip


@pytest.mark.parametrize("kind", STORED_BEFORE_THE_CHECKS)
def test_hostile_adapters_stored_before_the_checks_are_refused_at_load_leaving_nothing(
    kind, tiny_runtime, tmp_path, tiny_llama_dir, monkeypatch
):
    """An entry an older Adaptory let in: loading it is a domain error naming it (a 4xx, never a
    raw exception), it is neither resident nor in the LoRA bank after, and the runtime goes on."""
    from adaptory.adapters.serving.runtime import GenerationRequest

    runtime, fingerprint = tiny_runtime
    reg = runtime.registry
    _refused_at_import(kind, tmp_path / "x")
    name = f"old-{kind}"
    entry = _store_unchecked(
        reg, tmp_path / "x", name, monkeypatch, task="causal-lm", base_fingerprint=fingerprint
    )
    slots = dict(runtime._bank.slots)

    with pytest.raises(AdaptoryError) as raised:
        runtime.load(name)
    assert isinstance(raised.value, InvalidAdapter | ConfigError), raised.value
    assert raised.value.message.startswith(entry.ref) and "\n" not in raised.value.message
    assert entry.ref not in runtime.resident()
    assert runtime._bank.slots == slots
    with pytest.raises(AdaptoryError):
        runtime.generate([GenerationRequest(prompt="the cat", adapter=name, max_new_tokens=2)])

    good = make_lora_folder(tmp_path / "good", hidden=64, seed=1)
    _register(reg, good, f"good-after-{kind}", fingerprint, tiny_llama_dir)
    [result] = runtime.generate(
        [GenerationRequest(prompt="the cat", adapter=f"good-after-{kind}", max_new_tokens=2)]
    )
    assert result.adapter == f"good-after-{kind}:1" and result.completion_tokens >= 1


@pytest.mark.parametrize(("heads", "token_dim"), [(2, 64), (8, 64), (4, 32)])
def test_a_prefix_for_other_heads_is_refused_at_load_and_leaves_nothing_resident(
    heads, token_dim, tiny_runtime, tmp_path, tiny_llama_dir
):
    """The tiny Llama has 4 key/value heads of size 16. A prefix made for another head layout is
    consistent in itself (import takes it) but cannot fit this base: refused at load (a 400 from
    /v1/adapters/load and from a completion), not resident after, never a 500 mid-batch."""
    from fastapi.testclient import TestClient

    from adaptory.adapters.serving.runtime import GenerationRequest
    from adaptory.adapters.serving.server import ServerSettings, create_app

    runtime, fingerprint = tiny_runtime
    reg = runtime.registry
    name = f"heads-{heads}-{token_dim}"
    folder = make_prefix_folder(tmp_path / "p", heads=heads, token_dim=token_dim)
    entry = _register(reg, folder, name, fingerprint, tiny_llama_dir)

    with pytest.raises(ConfigError, match=f"made for {heads} key/value heads") as raised:
        runtime.load(name)
    assert "this base has 4 of size 16" in raised.value.message
    assert entry.ref not in runtime.resident() and entry.ref not in runtime._bank.slots
    with pytest.raises(ConfigError, match="key/value heads"):
        runtime.generate([GenerationRequest(prompt="the cat", adapter=name, max_new_tokens=2)])

    app = create_app({str(tiny_llama_dir): runtime}, registry=reg, settings=ServerSettings())
    with TestClient(app) as client:
        loaded = client.post("/v1/adapters/load", json={"model": name})
        completion = client.post(
            "/v1/completions", json={"model": name, "prompt": "the cat", "max_tokens": 2}
        )
    for response in (loaded, completion):
        assert response.status_code == 400, response.text
        assert set(response.json()["error"]) == {"message", "type", "code"}
        assert "key/value heads" in response.json()["error"]["message"]
    assert entry.ref not in runtime.resident()

    fitting = make_prefix_folder(tmp_path / "fits", seed=2)
    _register(reg, fitting, f"fits-{name}", fingerprint, tiny_llama_dir)
    assert runtime.load(f"fits-{name}").num_virtual_tokens == 3


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("int32", "must be floating point"),
        ("bool", "must be floating point"),
        ("nan", "NaN or infinite"),
        ("alpha-string", "no LoRA scale"),
        ("alpha-inf", "LoRA scale"),
    ],
)
def test_the_lora_bank_refuses_unusable_weights_and_changes_nothing(
    case, fragment, tiny_runtime, tmp_path
):
    """The bank's own checks (it is used without the registry too): ConfigError, no slot used,
    the stacks unchanged."""
    import torch

    from adaptory.adapters.serving.lora_bank import LoraBank

    runtime, _ = tiny_runtime
    bank = LoraBank(runtime.model)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    gen = torch.Generator().manual_seed(0)
    good = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
            4, 64, generator=gen
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
            64, 4, generator=gen
        ),
    }
    bank.add("good", good, config)
    before = {path: (s.a.clone(), s.b.clone()) for path, s in bank._stacks.items()}
    state, bad_config = dict(good), dict(config)
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    if case == "int32":
        state[key_b] = (state[key_b] * 100).to(torch.int32)
    elif case == "bool":
        state[key_b] = state[key_b] > 0
    elif case == "nan":
        state[key_b] = state[key_b].clone()
        state[key_b][3, 1] = float("nan")
    elif case == "alpha-string":
        bad_config["alpha_pattern"] = {"q_proj": "sixteen"}
    else:
        bad_config["lora_alpha"] = float("inf")
    try:
        with pytest.raises(ConfigError, match=fragment):
            bank.add("bad", state, bad_config)
        assert bank.slots == {"good": 1} and bank._free == []
        for path, stack in bank._stacks.items():
            assert torch.equal(stack.a, before[path][0]) and torch.equal(stack.b, before[path][1])
    finally:
        bank.close()


def test_training_with_target_modules_the_base_lacks_is_a_clear_error(tmp_path, tiny_llama_dir):
    from adaptory.adapters.training.loop import TrainConfig, train_adapter

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
