"""docs/SERVER.md lists every request field the protocol models accept, and the models refuse
what the docs say is refused: the docs are the contract clients read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adaptory.adapters.serving import protocol

DOCS = Path(__file__).resolve().parents[3] / "docs" / "SERVER.md"


def documented_fields() -> set[str]:
    """Every `field` named in the first column of the Parameters table."""
    text = DOCS.read_text()
    table = text[text.index("### Parameters (completions and chat)") :]
    table = table[: table.index("\n\n", table.index("| field |"))]
    names = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([a-z_]+)`", first))
    return names


@pytest.mark.parametrize("model", [protocol.CompletionRequest, protocol.ChatCompletionRequest])
def test_every_generation_field_is_documented(model):
    missing = set(model.model_fields) - documented_fields()
    assert not missing, f"fields of {model.__name__} not in SERVER.md's Parameters: {missing}"


def test_the_table_documents_no_field_the_models_lack():
    known = set(protocol.CompletionRequest.model_fields) | set(
        protocol.ChatCompletionRequest.model_fields
    )
    assert documented_fields() <= known, documented_fields() - known


def test_unknown_fields_are_refused_not_ignored():
    for model in protocol.REQUESTS:
        assert model.model_config["extra"] == "forbid", model
        assert model.model_config["strict"] is True, model
