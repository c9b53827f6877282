"""Data-sized defaults: how many steps a run takes when no --epochs is given."""

from __future__ import annotations

import pytest

from adaptory.adapters.training.loop import TrainConfig as _TrainConfig


def TrainConfig(**kw):  # noqa: N802 - the fields a run needs beside the ones tested
    return _TrainConfig(base="tinylm", data="train.jsonl", name="x", **kw)


@pytest.mark.parametrize(
    ("method", "per_epoch", "steps"),
    [
        ("lora", 50, 200),  # 400 rows at batch 8: 4 epochs reach the 160-step minimum
        ("lora", 5, 160),  # 40 rows: 32 epochs
        ("lora", 1, 40),  # capped at 40 epochs
        ("lora", 500, 500),  # a large set: one epoch
        ("prefix", 50, 600),  # virtual-token methods: at least 600 steps
        ("prompt", 38, 608),  # 16 epochs of 38
        ("prefix", 10, 400),  # capped at 40 epochs
        ("ia3", 50, 200),
    ],
)
def test_epochs_are_sized_by_the_data_and_the_method(method, per_epoch, steps):
    assert TrainConfig(method=method).total_steps(per_epoch) == steps


def test_given_epochs_or_steps_win():
    assert TrainConfig(method="prefix", epochs=2).total_steps(50) == 100
    assert TrainConfig(method="lora", max_steps=7).total_steps(50) == 7
