"""Identical weights and settings give identical digests: a run resumed in another process stores
the folder of the uninterrupted run byte for byte, although PEFT saves target_modules in set
order, which follows each process's string hashing (PYTHONHASHSEED)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from adaptory.adapters.training.loop import (
    TrainConfig,
    TrainingInterrupted,
    canonical_adapter_config,
    train_adapter,
)
from adaptory.registry import Registry

WORDS = "the cat sat on a mat dog ran to park red ball blue box".split()
# Given in this order, PEFT builds its set from them in this order (LoraConfig.__post_init__).
TARGETS = ["v_proj", "q_proj", "o_proj", "k_proj"]
# Every linear layer of a Llama block: a set of seven iterates in sorted order once in 5040.
ALL_LINEAR = ["up_proj", "v_proj", "down_proj", "q_proj", "gate_proj", "o_proj", "k_proj"]


@pytest.fixture
def data(tmp_path) -> Path:
    rng = random.Random(0)
    path = tmp_path / "shout.jsonl"
    with path.open("w") as fh:
        for _ in range(16):
            words = " ".join(rng.choice(WORDS) for _ in range(3))
            row = {"prompt": f"Shout: {words}\nAnswer:", "completion": f" {words.upper()}"}
            fh.write(json.dumps(row) + "\n")
    return path


def config(base: Path, data: Path, **kw) -> TrainConfig:
    settings = {
        "base": str(base), "data": str(data), "max_steps": 6, "batch_size": 4, "max_length": 32,
        "seed": 0, "checkpoint_every": 2, "target_modules": list(TARGETS),
    }  # fmt: skip
    return TrainConfig(**{**settings, **kw})


def test_the_canonical_config_depends_on_the_settings_only():
    given = {
        "r": 8,
        "target_modules": ["v_proj", "q_proj", "k_proj"],
        "modules_to_save": ["score", "classifier", "classifier"],
        "feedforward_modules": ["down_proj", "up_proj"],
        "exclude_modules": ["lm_head", "embed"],
        "layers_to_transform": [3, 1],
        "peft_type": "LORA",
    }
    shuffled = {k: list(reversed(v)) if k != "layers_to_transform" and isinstance(v, list) else v
                for k, v in reversed(given.items())}  # fmt: skip
    text = canonical_adapter_config(given)
    assert canonical_adapter_config(shuffled) == text
    parsed = json.loads(text)
    assert list(parsed) == sorted(given)
    assert parsed["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    assert parsed["modules_to_save"] == ["classifier", "score"]
    assert parsed["feedforward_modules"] == ["down_proj", "up_proj"]
    assert parsed["exclude_modules"] == ["embed", "lm_head"]
    assert parsed["layers_to_transform"] == [3, 1]  # not a set of names: left as given
    assert given["target_modules"] == ["v_proj", "q_proj", "k_proj"]  # the input is untouched
    pattern = {"target_modules": r".*\.(key|value)$"}  # a regex, not a list: kept as it is
    assert json.loads(canonical_adapter_config(pattern)) == pattern


def test_a_trained_adapter_stores_its_module_names_sorted(tiny_llama_dir, data, adaptory_home):
    registry = Registry(adaptory_home)
    result = train_adapter(
        config(tiny_llama_dir, data, name="all", max_steps=1, target_modules=ALL_LINEAR),
        registry=registry,
        show_progress=False,
    )
    text = (registry.files(result.entry.ref) / "adapter_config.json").read_text()
    assert json.loads(text)["target_modules"] == sorted(ALL_LINEAR)
    assert result.entry.peft_config["target_modules"] == sorted(ALL_LINEAR)


def set_order(names: list[str], hash_seed: str) -> list[str]:
    """The order a set built from `names` iterates in, in a process with this PYTHONHASHSEED."""
    code = "import json, sys; print(json.dumps(list(set(json.loads(sys.argv[1])))))"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(names)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        check=True,
    )
    return json.loads(proc.stdout)


@pytest.mark.slow  # ~25 s: a second process imports torch and trains
def test_a_run_resumed_in_another_process_has_the_uninterrupted_digest(
    tiny_llama_dir, data, tmp_path, adaptory_home
):
    registry = Registry(adaptory_home)
    whole = train_adapter(
        config(tiny_llama_dir, data, name="whole"), registry=registry, show_progress=False
    )

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train_adapter(
            config(tiny_llama_dir, data, name="halves", output_dir=str(run_dir)),
            registry=registry,
            show_progress=False,
            on_step=interrupt,
        )
    # The resuming process hashes strings so that PEFT's set of target modules iterates in
    # another order than here: the first such seed of a fixed list.
    here = list(set(TARGETS))
    seed = next(s for s in map(str, range(1, 50)) if set_order(TARGETS, s) != here)
    print(f"set order here {here}; resuming with PYTHONHASHSEED={seed}")
    proc = subprocess.run(
        [sys.executable, "-m", "adaptory.cli.main", "train", "--resume", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": seed, "ADAPTORY_HOME": str(adaptory_home)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = registry.resolve(json.loads(proc.stdout)["ref"])

    folders = [registry.files(whole.entry.ref), registry.files(resumed.ref)]
    weights = [(f / "adapter_model.safetensors").read_bytes() for f in folders]
    assert weights[0] == weights[1]  # the same training (test_checkpoints.py checks that)
    configs = [(f / "adapter_config.json").read_text() for f in folders]
    assert configs[0] == configs[1]
    assert json.loads(configs[0])["target_modules"] == sorted(TARGETS)
    assert resumed.digest == whole.entry.digest
