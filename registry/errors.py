"""Domain errors for all of Adaptory, raised by the libraries and rendered once by the CLI.

They live here, in the lowest layer (the registry imports nothing from the engine), so that
`adaptory.adapters` and `adaptory.cli` share one hierarchy. Each carries a one-line message that
names what is wrong and where, an optional hint (what to do next) and the process exit code.
"""

from __future__ import annotations

from pathlib import Path


class AdaptoryError(Exception):
    """Base of every error Adaptory raises on purpose; exit code 1."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class BadInput(AdaptoryError):
    """The user gave something unusable (a name, a reference, a file); exit code 2."""

    exit_code = 2


class InvalidName(BadInput):
    """A name or tag that cannot be stored (path separators, control characters, a number)."""


class InvalidReference(BadInput):
    """A reference that does not parse as NAME, NAME:VERSION or NAME:TAG."""


class InvalidAdapter(BadInput):
    """A folder or file that is not a usable PEFT adapter (missing files, pickle only, bad header)."""


class DataError(BadInput):
    """A bad data row: names the file, the line (1-based) and the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field '{field}')" if field else ""
        super().__init__(f"{prefix}{message}{suffix}", hint=hint)
        self.file, self.line, self.field, self.detail = file, line, field, message


class ConfigError(BadInput):
    """A bad option or configuration value (a TOML file, an unsupported combination)."""


class NotFound(AdaptoryError):
    """Something named does not exist (an adapter reference, a base model); exit code 3."""

    exit_code = 3


class AdapterNotFound(NotFound):
    pass


class BaseNotFound(NotFound):
    pass


class IntegrityError(AdaptoryError):
    """Stored files are missing, truncated or altered (digest mismatch); exit code 4."""

    exit_code = 4


class CatalogDamaged(IntegrityError):
    """`catalog.db` is missing, truncated or corrupt while adapters are stored; exit code 4.

    Nothing that deletes or recreates stored data runs on such a catalog."""


class BaseMismatch(AdaptoryError):
    """An adapter was made for another base (fingerprint differs); exit code 5."""

    exit_code = 5


class StorageError(AdaptoryError):
    """Writing to the home failed (disk full, permissions); nothing was changed; exit code 6."""

    exit_code = 6
