"""The exit codes docs/TROUBLESHOOTING.md documents, one real failure each, through the CLI:
2 bad input, 3 not found, 4 altered or damaged storage, 5 base mismatch, 6 storage, 1 damage
found by `verify`; each with its one-line message and no traceback, and nothing stored lost."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptory.cli.main import cli
from adaptory.registry import Registry
from adaptory.registry.testing import make_lora_folder

FINGERPRINT = {"weights": "a" * 64, "tokenizer": "b" * 64, "quant": "nf4+dq"}


def run(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), *args])


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    reg = Registry(home)
    reg.add(make_lora_folder(tmp_path / "a", seed=1), name="a", base_model="tiny",
            base_fingerprint=FINGERPRINT)  # fmt: skip
    other = {**FINGERPRINT, "weights": "c" * 64}
    reg.add(make_lora_folder(tmp_path / "b", seed=2), name="b", base_model="tiny",
            base_fingerprint=other)  # fmt: skip
    return home


def _fails(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def _entries(home: Path) -> list[str]:
    return [e.ref for e in Registry(home).list()]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["show", "a:b:c"], ["more than one ':'"]),
        (["show", "--", "-bad"], ["must start with a letter or digit"]),
        (["tag", "a:1", "3"], ["tag '3' is a number"]),
        (["merge", "a", "--name", "m", "--method", "linear"], ["at least two"]),
        (["merge", "a", "a", "--name", "m", "--method", "average"], ["average"]),
        (["import", "/nonexistent/folder", "--name", "x"], ["/nonexistent/folder"]),
    ],
    ids=["two colons", "bad name", "numeric tag", "one parent", "unknown method", "no folder"],
)
def test_bad_input_exits_2(home, args, needles):
    before = _entries(home)
    _fails(run(home, *args), 2, *needles)
    assert _entries(home) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["show", "nope"], "nope"),
        (["show", "a:9"], "a:9"),
        (["show", "a:prod"], "prod"),
        (["rm", "nope"], "nope"),
        (["export", "nope", "--out", "x"], "nope"),
    ],  # fmt: skip
    ids=["name", "version", "tag", "rm", "export"],
)
def test_not_found_exits_3(home, args, needle):
    _fails(run(home, *args), 3, needle)
    assert _entries(home) == ["a:1", "b:1"]


def test_altered_stored_files_exit_4_and_verify_exits_1(home, tmp_path):
    reg = Registry(home)
    blob = reg.files(reg.resolve("a"), verify=False) / "adapter_model.safetensors"
    os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    _fails(run(home, "export", "a", "--out", str(tmp_path / "out")), 4, "a:1")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    _fails(run(home, "verify"), 1, "a:1")
    assert _entries(home) == ["a:1", "b:1"]


def test_a_damaged_catalog_exits_4(home):
    catalog = home / "catalog.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{catalog}{suffix}").unlink(missing_ok=True)
    catalog.write_bytes(b"garbage" * 1000)
    _fails(run(home, "list"), 4, "damaged", "adaptory recover")
    assert sorted(p.name for p in (home / "blobs" / "sha256").iterdir())  # nothing deleted


def test_a_base_mismatch_exits_5(home):
    _fails(
        run(home, "merge", "a", "b", "--name", "m", "--method", "cat"), 5, "a:1", "b:1", "weights"
    )
    assert _entries(home) == ["a:1", "b:1"]


def test_a_home_that_cannot_be_created_exits_6(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the home's parent should be")
    folder = make_lora_folder(tmp_path / "src")
    _fails(run(blocker / "home", "import", str(folder), "--name", "x"), 6, str(blocker))
