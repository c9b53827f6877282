"""Where the registry lives: `--home` > `ADAPTORY_HOME` > the platform's user data dir."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def resolve_home(explicit: str | os.PathLike | None = None) -> Path:
    """The registry home; created on first use by the registry, not here."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("ADAPTORY_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path(platformdirs.user_data_dir("adaptory", appauthor=False))
