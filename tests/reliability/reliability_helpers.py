"""Shared by the reliability tests: worker logs and whole-registry invariants."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from adaptory.registry import Registry


def read_log(path: Path) -> list[list[str]]:
    """Lines a worker appended (whole lines only: a kill can cut the last one short)."""
    if not path.exists():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [line.split() for line in text.splitlines() if line]


def append_line(fd: int, *words: object) -> None:
    """One O_APPEND write per line, so a SIGKILL never leaves a half line before a whole one."""
    os.write(fd, (" ".join(str(w) for w in words) + "\n").encode())


def assert_registry_whole(home: Path) -> list:
    """The invariants a crash must never break; returns the entries."""
    reg = Registry(home)
    conn = sqlite3.connect(home / "catalog.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = conn.execute(
            "SELECT count(*) FROM tags WHERE entry_id NOT IN (SELECT id FROM entries)"
        ).fetchone()[0]
        assert orphans == 0
    finally:
        conn.close()
    entries = reg.list()
    assert reg.verify() == []
    for entry in entries:
        folder = home / "blobs" / "sha256" / entry.digest
        assert sorted(p.name for p in folder.iterdir()) == sorted(entry.files), entry.ref
    return entries


class ThreadedServer:
    """A real uvicorn on 127.0.0.1 (a free port) in a thread; `with` gives its base URL."""

    def __init__(self, app, **config) -> None:
        import threading

        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
