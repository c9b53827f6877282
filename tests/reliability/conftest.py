"""Fixtures for the reliability tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def peft_imported(tmp_path):
    """Import PEFT (through config validation) in the parent so forked children start warm."""
    from adaptory.registry.adapter_files import validate_adapter_folder
    from adaptory.registry.testing import make_lora_folder

    validate_adapter_folder(make_lora_folder(tmp_path / "warm"))
