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


# --- what PEFT writes is accepted; what it or the runtime could not use is refused -------------


def _peft_folders(base_dir, root):
    """Adapters saved by PEFT itself on the tiny Llama, one per kind and option the runtime or
    the registry reads: the oracle for what `import` must accept."""
    import torch
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        get_peft_model,
    )
    from transformers import AutoModelForCausalLM

    configs = {
        "lora": LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]),
        "lora-patterns-float-alpha": LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=16.0, target_modules=["q_proj", "v_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3.5},
        ),
        "lora-dora-rslora": LoraConfig(
            task_type="CAUSAL_LM", r=4, use_dora=True, use_rslora=True, target_modules=["q_proj"]
        ),
        "lora-embedding": LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
        "lora-bf16": LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"),
        "lora-pissa": LoraConfig(
            task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_2"
        ),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix-projection": PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True
        ),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
    }  # fmt: skip
    folders = {}
    for name, config in configs.items():
        dtype = torch.bfloat16 if name == "lora-bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
        get_peft_model(model, config).save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_what_peft_saves_is_accepted_for_every_kind(tmp_path, tiny_llama_dir):
    for name, folder in _peft_folders(tiny_llama_dir, tmp_path).items():
        result = validate_adapter_folder(folder)
        assert result.config == json.loads((folder / "adapter_config.json").read_text()), name
        assert "adapter_model.safetensors" in result.files, name


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"target_modules": 5}, "'target_modules' is an integer 5; LoraConfig expects"),
        ({"use_rslora": "yes"}, "'use_rslora' is a string 'yes'; LoraConfig expects true/false"),
        ({"lora_dropout": "0.1"}, "'lora_dropout' is a string"),
        ({"layers_to_transform": ["0"]}, "'layers_to_transform' is a list (1 items)"),
        ({"bias": "sometimes"}, "'bias' is a string 'sometimes'"),
        ({"init_lora_weights": "magic"}, "'init_lora_weights' is a string 'magic'"),
        ({"layer_replication": [[0, 1, 2]]}, "'layer_replication'"),
        ({"r": True}, "'r' is a boolean True; LoraConfig expects an integer"),
        ({"lora_alpha": [8]}, "'lora_alpha' is a list"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj'] is null"),
        ({"task_type": "causal_lm"}, "task_type 'causal_lm' is unknown to PEFT"),
    ],
)
def test_every_config_field_has_the_type_peft_declares(tmp_path, changes, fragment):
    folder = make_lora_folder(tmp_path / "a", config_overrides=changes)
    with pytest.raises(InvalidAdapter) as raised:
        validate_adapter_folder(folder)
    assert fragment in raised.value.message and "adapter_config.json" in raised.value.message


def test_config_nesting_is_limited_to_32_levels(tmp_path):
    def nested(depth):  # {"auto_mapping": {"a": [[...]]}}: depth levels in all
        value: list = []
        for _ in range(depth - 3):
            value = [value]
        return {"a": value}

    validate_adapter_folder(
        make_lora_folder(tmp_path / "a", config_overrides={"auto_mapping": nested(32)})
    )
    folder = make_lora_folder(tmp_path / "b", config_overrides={"auto_mapping": nested(33)})
    with pytest.raises(InvalidAdapter, match="nested deeper than 32 levels"):
        validate_adapter_folder(folder)


def _bits(dtype: str, count: int, seed: int):
    """Random bit patterns of a float dtype (many NaN/Inf among them) and, from numpy, whether
    each is finite (bf16 widened to float32 by its bits)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    width = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[dtype]
    raw = rng.integers(0, 256, size=count * width, dtype=np.uint8).tobytes()
    if dtype == "BF16":
        finite = np.isfinite((np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4"))
    else:
        finite = np.isfinite(np.frombuffer(raw, {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]))
    return raw, finite


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_non_finite_values_are_found_in_every_float_dtype(tmp_path, dtype):
    """Checked against numpy's isfinite on the same bits: every finite pattern (subnormals, the
    largest finite value, -0) passes, one NaN or infinity anywhere is refused, naming the tensor."""
    import numpy as np

    from adaptory.registry.adapter_files import check_finite

    seed = 1234
    print("seed", seed)
    raw, finite = _bits(dtype, 4096, seed)
    width = len(raw) // 4096
    clean = b"".join(raw[i * width : (i + 1) * width] for i in np.flatnonzero(finite))
    edge = {
        "F16": np.array([65504, -65504, 6e-8, -0.0], "<f2").tobytes(),
        "BF16": bytes.fromhex("7f7f 7fff 0100 0080"),  # max, -max, subnormal, -0
        "F32": np.array([3.4028235e38, -1e-45, -0.0], "<f4").tobytes(),
        "F64": np.array([1.7976931348623157e308, -5e-324, -0.0], "<f8").tobytes(),
    }[dtype]
    path = tmp_path / "w.safetensors"
    for data, accepted in ((clean + edge, True), (raw, False)):
        header = {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {
                "dtype": dtype,
                "shape": [len(data) // width],
                "data_offsets": [8, 8 + len(data)],
            },
        }
        write_safetensors(path, header, b"\0" * 8 + data)
        tensors = check_safetensors(path)
        if accepted:
            check_finite(path, tensors)
        else:
            assert not finite.all()
            with pytest.raises(InvalidAdapter, match="tensor 'b' holds NaN or infinite"):
                check_finite(path, tensors)


def test_header_limits_and_what_the_safetensors_loader_requires(tmp_path):
    """Accepted headers load with the safetensors library itself (the oracle); refused ones are
    those it fails on or that no adapter needs."""
    from safetensors.numpy import load_file

    from adaptory.registry.adapter_files import MAX_HEADER_BYTES

    path = tmp_path / "w.safetensors"
    tensor = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    for metadata in (None, {}, {"format": "pt", "note": ""}):
        write_safetensors(path, {"__metadata__": metadata, "a": tensor}, b"\0" * 8)
        assert set(check_safetensors(path)) == {"a"}
        assert set(load_file(str(path))) == {"a"}
    refused = [
        ({"__metadata__": {"k": 1}, "a": tensor}, "__metadata__['k'] is an integer 1"),
        ({"__metadata__": ["x"], "a": tensor}, "__metadata__ is a list"),
        ({"a": {**tensor, "extra": 1}}, "malformed header entry"),
        (
            {"a": {**tensor, "dtype": "I64", "shape": [1]}},
            "is I64; adapter weights must be floating",
        ),
        ({"a": {**tensor, "dtype": "F8_E4M3", "shape": [8]}}, "is F8_E4M3"),
        ({"a": {**tensor, "shape": [1] * 8 + [2]}}, "invalid shape"),
        ({"a": {**tensor, "shape": [2.0]}}, "invalid shape"),
        ({"a": {**tensor, "dtype": ["F32"]}}, "unknown dtype a list"),
        (
            {"a": tensor, "b": {"dtype": "F32", "shape": [3, 0], "data_offsets": [8, 8]}},
            "'b' is empty",
        ),
    ]
    for header, fragment in refused:
        write_safetensors(path, header, b"\0" * 8)
        with pytest.raises(InvalidAdapter) as raised:
            check_safetensors(path)
        assert fragment in raised.value.message, header
    raw = json.dumps({"a": tensor}).encode() + b" " * MAX_HEADER_BYTES
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(InvalidAdapter, match="over the 16 MiB limit"):
        check_safetensors(path)
