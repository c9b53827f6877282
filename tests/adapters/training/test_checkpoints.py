"""Checkpoints survive what kills leave behind: a kill between the two renames (two complete
copies, no `checkpoint`), a truncated file (refused by name, or the intact older copy used), and
`--resume` with no path picks the latest *interrupted* run."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptory.adapters.training.loop import (
    TrainConfig,
    TrainingInterrupted,
    find_run,
    train_adapter,
)
from adaptory.cli.main import cli
from adaptory.registry import Registry
from adaptory.registry.errors import IntegrityError

WORDS = "the cat sat on a mat dog ran to park red ball blue box".split()


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data(tmp_path) -> Path:
    rng = random.Random(0)
    path = tmp_path / "shout.jsonl"
    with path.open("w") as fh:
        for _ in range(16):
            words = " ".join(rng.choice(WORDS) for _ in range(3))
            fh.write(
                json.dumps(
                    {"prompt": f"Shout: {words}\nAnswer:", "completion": f" {words.upper()}"}
                )
                + "\n"
            )
    return path


def config(base: Path, data: Path, **kw) -> TrainConfig:
    defaults = {
        "base": str(base), "data": str(data), "max_steps": 6, "batch_size": 4, "max_length": 32,
        "seed": 0, "checkpoint_every": 2, "dropout": 0.1,
    }  # fmt: skip
    return TrainConfig(**{**defaults, **kw})


def interrupted_run(base, data, run_dir: Path, *, at: int, keep_copy_at: int | None = None):
    """A run stopped (as by Ctrl-C) after step `at`; with keep_copy_at, a copy of the checkpoint
    as it was right after that step (the copy a kill between renames leaves as checkpoint.old)."""
    kept = run_dir.parent / f"{run_dir.name}-copy"

    def on_step(step, loss):
        if step == keep_copy_at:
            shutil.copytree(run_dir / "checkpoint", kept)
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train_adapter(
            config(base, data, name="victim", output_dir=str(run_dir)),
            registry=Registry(os.environ["ADAPTORY_HOME"]),
            show_progress=False,
            on_step=on_step,
        )
    return kept


def adapter_bytes(registry: Registry, ref: str) -> bytes:
    return (registry.files(ref) / "adapter_model.safetensors").read_bytes()


def test_a_kill_between_the_renames_resumes_from_the_newer_copy(tiny_llama_dir, data, tmp_path):
    registry = Registry(os.environ["ADAPTORY_HOME"])
    whole = train_adapter(
        config(tiny_llama_dir, data, name="whole"), registry=registry, show_progress=False
    )
    run_dir = tmp_path / "run"
    older = interrupted_run(tiny_llama_dir, data, run_dir, at=3, keep_copy_at=2)
    assert json.loads((older / "state.json").read_text())["step"] == 2
    # what save_checkpoint leaves when killed after `checkpoint -> checkpoint.old` and before
    # `checkpoint.tmp -> checkpoint`: two complete copies, no `checkpoint`
    (run_dir / "checkpoint").rename(run_dir / "checkpoint.tmp")
    older.rename(run_dir / "checkpoint.old")
    assert find_run(registry.home, str(run_dir)) == run_dir
    resumed = train_adapter(
        TrainConfig(resume=str(run_dir)), registry=registry, show_progress=False
    )
    assert resumed.steps == 6
    assert adapter_bytes(registry, resumed.entry.ref) == adapter_bytes(registry, whole.entry.ref)
    assert resumed.entry.loss_history == whole.entry.loss_history


def test_a_truncated_checkpoint_file_is_refused_by_name(
    tiny_llama_dir, data, tmp_path, adaptory_home
):
    run_dir = tmp_path / "run"
    interrupted_run(tiny_llama_dir, data, run_dir, at=3)
    optimizer = run_dir / "checkpoint" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(IntegrityError, match=r"optimizer\.pt is truncated"):
        find_run(adaptory_home, str(run_dir))
    result = CliRunner().invoke(
        cli, ["--home", str(adaptory_home), "train", "--resume", str(run_dir)]
    )
    assert result.exit_code == IntegrityError.exit_code, result.output
    assert "optimizer.pt is truncated" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_damaged_newest_copy_falls_back_to_the_intact_older_one(tiny_llama_dir, data, tmp_path):
    registry = Registry(os.environ["ADAPTORY_HOME"])
    whole = train_adapter(
        config(tiny_llama_dir, data, name="whole"), registry=registry, show_progress=False
    )
    run_dir = tmp_path / "run"
    older = interrupted_run(tiny_llama_dir, data, run_dir, at=3, keep_copy_at=2)
    (run_dir / "checkpoint").rename(run_dir / "checkpoint.tmp")
    older.rename(run_dir / "checkpoint.old")
    weights = run_dir / "checkpoint.tmp" / "adapter_model.safetensors"
    data_bytes = bytearray(weights.read_bytes())
    data_bytes[-1] ^= 0xFF
    weights.write_bytes(bytes(data_bytes))
    resumed = train_adapter(
        TrainConfig(resume=str(run_dir)), registry=registry, show_progress=False
    )
    # resumed from step 2: the same adapter as the uninterrupted run, bit for bit
    assert adapter_bytes(registry, resumed.entry.ref) == adapter_bytes(registry, whole.entry.ref)


def test_resume_without_a_path_takes_the_latest_interrupted_run(
    tiny_llama_dir, data, adaptory_home
):
    registry = Registry(adaptory_home)
    runs = adaptory_home / "runs"
    interrupted_run(tiny_llama_dir, data, runs / "a-interrupted", at=2)
    finished = train_adapter(
        config(
            tiny_llama_dir, data, name="later", output_dir=str(runs / "b-finished"), max_steps=2
        ),
        registry=registry,
        show_progress=False,
    )
    assert finished.entry.ref == "later:1"
    os.utime(runs / "a-interrupted", (1, 1))  # the interrupted run is the older of the two
    assert find_run(adaptory_home, "") == runs / "a-interrupted"
