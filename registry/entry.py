"""One stored adapter version and the metadata that makes it trustworthy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of one file of a stored adapter, kept so `verify` can name what changed."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Entry:
    """A registry entry: `name:version`, the digest of its files and everything known about it.

    Dict and list fields are plain JSON values (stored as TEXT in the catalog); `files` maps each
    relative path in the blob folder to its sha256 and size.
    """

    id: int
    name: str
    version: int
    digest: str
    method: str | None
    task: str | None
    base_model: str | None
    base_fingerprint: dict | None
    peft_config: dict
    training_config: dict
    dataset: dict
    metrics: dict
    loss_history: list
    parents: list[dict]
    tags: list[str]
    description: str | None
    extra: dict
    created_at: str
    size_bytes: int
    files: dict[str, FileRecord] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """The exact reference of this entry, `name:version`."""
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict (plus `ref`), for `--json` output and reports."""
        data = asdict(self)
        data["ref"] = self.ref
        return data
