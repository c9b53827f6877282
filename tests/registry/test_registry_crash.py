"""Crash safety and concurrency with real processes: SIGKILL mid-import, four concurrent writers."""

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from adaptory.registry import Registry
from adaptory.registry.adapter_files import validate_adapter_folder
from adaptory.registry.testing import make_lora_folder

# Forked children are real processes with their own SQLite connections and file locks; forking
# from a parent that already imported PEFT saves each child the ~5 s import.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs fork and SIGKILL")
FORK = multiprocessing.get_context("fork")
STAGES = ("staged", "published", "inserted")


@pytest.fixture(autouse=True)
def peft_imported_before_forking(tmp_path):
    validate_adapter_folder(make_lora_folder(tmp_path / "warm"))


def add_paused(home: Path, src: Path, stage: str, log: Path) -> None:
    sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115 - lives until the process is killed
    os.environ.update(ADAPTORY_TEST_PAUSE_AT=stage, ADAPTORY_TEST_PAUSE_SECONDS="120")
    Registry(home).add(src, name="victim", tags=["prod"])


def add_ten(home: Path, src: Path, worker: int) -> None:
    reg = Registry(home)
    for i in range(10):
        reg.add(
            src, name=("alpha", "beta")[i % 2], extra={"worker": worker, "i": i}, tags=["latest"]
        )


def wait_for_pause(log: Path, stage: str, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f"ADAPTORY_PAUSED {stage}" in log.read_text():
            return
        assert proc.is_alive(), log.read_text() if log.exists() else "no output"
        time.sleep(0.02)
    raise AssertionError(f"add() never reached {stage}")


def test_sigkill_at_any_stage_of_add_leaves_nothing_visible(tmp_path):
    src = make_lora_folder(tmp_path / "src")
    homes = {stage: tmp_path / stage for stage in STAGES}
    for stage in STAGES:
        log = tmp_path / f"{stage}.log"
        proc = FORK.Process(target=add_paused, args=(homes[stage], src, stage, log))
        proc.start()
        try:
            wait_for_pause(log, stage, proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)
            assert proc.exitcode == -signal.SIGKILL
        finally:
            if proc.is_alive():
                proc.kill()

    for stage, home in homes.items():
        reg = Registry(home)
        assert reg.list() == [], stage
        leftovers = list((home / "blobs" / "tmp").iterdir())
        assert len(leftovers) == (1 if stage == "staged" else 0), stage
        result = reg.gc()
        assert result.removed_blobs == (0 if stage == "staged" else 1), stage
        assert result.removed_temp == 0
        for tmp in leftovers:
            old = time.time() - 7200
            for path in (*tmp.iterdir(), tmp):
                os.utime(path, (old, old))
        assert reg.gc().removed_temp == len(leftovers)
        entry = reg.add(src, name="victim", tags=["prod"])
        assert (entry.version, entry.tags) == (1, ["prod"])
        assert reg.verify() == []


def test_four_processes_adding_ten_entries_each_lose_nothing(tmp_path):
    home = tmp_path / "home"
    sources = [make_lora_folder(tmp_path / f"src{w}", seed=w % 2) for w in range(4)]
    procs = [FORK.Process(target=add_ten, args=(home, sources[w], w)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        assert proc.exitcode == 0

    entries = Registry(home).list()
    assert len(entries) == 40
    for name in ("alpha", "beta"):
        versions = [e.version for e in entries if e.name == name]
        assert versions == list(range(1, 21))
    assert sorted((e.extra["worker"], e.extra["i"]) for e in entries) == sorted(
        (w, i) for w in range(4) for i in range(10)
    )
    assert [e.ref for e in entries if e.tags] == ["alpha:20", "beta:20"]
    assert len(list((home / "blobs" / "sha256").iterdir())) == 2
    assert Registry(home).verify() == []
