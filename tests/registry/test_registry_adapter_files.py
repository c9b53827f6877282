"""Adapter folder validation: every way a folder can be unusable is refused with a clear message."""

import json
import os
import struct

import pytest

from adaptory.registry.adapter_files import check_safetensors, validate_adapter_folder
from adaptory.registry.errors import InvalidAdapter
from adaptory.registry.testing import make_lora_folder


def write_safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_real_lora_folder_is_accepted(tmp_path):
    folder = make_lora_folder(tmp_path / "a")
    (folder / "README.md").write_text("# notes\n")
    result = validate_adapter_folder(folder)
    assert result.files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert result.config["peft_type"] == "LORA"


def test_safetensors_header_is_checked_tensor_by_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(
        path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    )
    assert set(check_safetensors(path)) == {"a"}

    write_safetensors(
        path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8
    )
    with pytest.raises(InvalidAdapter, match="needs 12 bytes, header says 8"):
        check_safetensors(path)

    write_safetensors(
        path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
    )
    with pytest.raises(InvalidAdapter, match="lies outside the file"):
        check_safetensors(path)

    header = {
        "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]},
    }
    write_safetensors(path, header, b"\0" * 6)
    with pytest.raises(InvalidAdapter, match="overlaps"):
        check_safetensors(path)

    write_safetensors(
        path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9
    )
    with pytest.raises(InvalidAdapter, match="bytes after the last tensor"):
        check_safetensors(path)

    write_safetensors(path, {"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(InvalidAdapter, match="unknown dtype 'Q9'"):
        check_safetensors(path)

    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InvalidAdapter, match="header claims"):
        check_safetensors(path)

    path.write_bytes(b"\1\2")
    with pytest.raises(InvalidAdapter, match="too short"):
        check_safetensors(path)


def test_rank_pattern_ranks_are_checked_too(tmp_path):
    folder = make_lora_folder(tmp_path / "a", config_overrides={"rank_pattern": {"q_proj": 0}})
    with pytest.raises(InvalidAdapter, match=r"rank_pattern\['q_proj'\]=0 is absurd"):
        validate_adapter_folder(folder)


def test_a_symlinked_folder_is_not_a_directory(tmp_path):
    folder = make_lora_folder(tmp_path / "a")
    os.symlink(folder, tmp_path / "link")
    with pytest.raises(InvalidAdapter, match="is not a directory"):
        validate_adapter_folder(tmp_path / "link")
