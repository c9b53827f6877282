"""A training run's folder and its checkpoints: where runs live, which one `--resume` means,
and checkpoints written atomically and durably, verified file by file before they are restored.

A checkpoint holds the adapter, optimizer, scheduler and RNG state and the loop's state.json (step,
loss history, early-stopping counters), so a resumed run ends with the same adapter as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from adaptory.registry.errors import ConfigError, IntegrityError

RESULT_FILE = "result.json"  # a finished run: its registry reference and metrics

# A checkpoint is written into checkpoint.tmp, then checkpoint -> checkpoint.old and
# checkpoint.tmp -> checkpoint; a kill between those renames leaves two complete copies.
CHECKPOINT_FOLDERS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")


def runs_dir(home: Path) -> Path:
    """Where training runs keep their folders (config, checkpoints, the saved adapter)."""
    return Path(home) / "runs"


def find_run(home: Path, resume: str) -> Path:
    """The run folder to resume: a path or run name, or ("") the latest interrupted run."""
    if resume:
        run = Path(resume).expanduser()
        if not run.is_dir():
            candidate = runs_dir(home) / resume
            run = candidate if candidate.is_dir() else run
    else:
        runs = sorted(
            (
                p
                for p in runs_dir(home).glob("*")
                if (p / "config.json").is_file() and not (p / RESULT_FILE).is_file()
            ),
            key=lambda p: p.stat().st_mtime,
        )
        runs = [p for p in runs if any((p / name).is_dir() for name in CHECKPOINT_FOLDERS)]
        if not runs:
            raise ConfigError(f"no interrupted runs to resume in {runs_dir(home)}")
        run = runs[-1]
    if not (run / "config.json").is_file():
        raise ConfigError(f"{run} is not a training run folder (no config.json)")
    if (run / RESULT_FILE).is_file():
        ref = json.loads((run / RESULT_FILE).read_text()).get("ref")
        raise ConfigError(f"run {run.name} already finished (registered as {ref})")
    find_checkpoint(run)  # refuses now, with the reason, if no usable checkpoint is there
    return run


def mark_finished(run_dir: Path, ref: str, metrics: dict) -> None:
    """Record that the run ended as registry entry `ref`: it can no longer be resumed."""
    (run_dir / RESULT_FILE).write_text(json.dumps({"ref": ref, "metrics": metrics}, indent=1))


def _write_synced(path: Path, write) -> dict:
    """Write a file with `write(path)`, fsync it, and return its size and sha256."""
    import hashlib

    write(path)
    digest = hashlib.sha256()
    with open(path, "rb+") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(fh.fileno())
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, *, model, optimizer, scheduler, rng: dict, state: dict, best: dict | None
) -> None:
    """Replace run_dir/checkpoint atomically and durably: every file fsynced, state.json (with
    each file's size and sha256) written last, folders renamed, the run folder fsynced."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {
        k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
    }
    files = {
        "adapter_model.safetensors": _write_synced(
            tmp / "adapter_model.safetensors", lambda p: save_file(weights, str(p))
        ),
        "optimizer.pt": _write_synced(
            tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p)
        ),
        "scheduler.pt": _write_synced(
            tmp / "scheduler.pt", lambda p: torch.save(scheduler.state_dict(), p)
        ),
        "rng.pt": _write_synced(tmp / "rng.pt", lambda p: torch.save(rng_file(rng), p)),
    }
    if best is not None:
        files["best_adapter.safetensors"] = _write_synced(
            tmp / "best_adapter.safetensors", lambda p: save_file(best, str(p))
        )
    _write_synced(
        tmp / "state.json", lambda p: p.write_text(json.dumps({**state, "files": files}, indent=1))
    )
    _fsync_dir(tmp)
    final, old = run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None if it is complete and intact)."""
    import hashlib

    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json (incomplete)"
    except (OSError, ValueError) as exc:
        return f"state.json is unreadable ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json has no step"
    files = state.get("files")
    if not isinstance(files, dict):  # written before checkpoints recorded their files
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for name, record in sorted(files.items()):
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != record.get("size"):
            return f"{name} is truncated or altered ({size} of {record.get('size')} bytes)"
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != record.get("sha256"):
            return f"{name} is altered (sha256 differs)"
    return None


def find_checkpoint(run_dir: Path) -> Path:
    """The run's newest intact checkpoint folder (see CHECKPOINT_FOLDERS); IntegrityError naming
    what is wrong with each copy when none is usable."""
    usable, problems = [], []
    for name in CHECKPOINT_FOLDERS:
        folder = run_dir / name
        if not folder.is_dir():
            continue
        problem = checkpoint_problem(folder)
        if problem is None:
            usable.append((json.loads((folder / "state.json").read_text())["step"], folder))
        else:
            problems.append(f"{name}/{problem}")
    if usable:
        return max(usable, key=lambda item: item[0])[1]
    if not problems:
        raise ConfigError(f"{run_dir} has no checkpoint to resume from")
    raise IntegrityError(
        f"{run_dir} has no usable checkpoint: {'; '.join(problems)}",
        hint="start the run again without --resume",
    )


def load_checkpoint(run_dir: Path, *, model, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Restore adapter, optimizer, scheduler and RNG from the newest intact checkpoint; return
    (state, best adapter weights)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = find_checkpoint(run_dir)
    try:
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        best_file = ckpt / "best_adapter.safetensors"
        best = load_file(str(best_file)) if best_file.is_file() else None
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        raise IntegrityError(
            f"{ckpt} cannot be restored ({type(exc).__name__}: {str(exc)[:200]})",
            hint="start the run again without --resume",
        ) from exc
    state.pop("files", None)
    return state, best


def rng_state() -> dict:
    """Every random generator the loop draws from (dropout, PEFT's init), to restore on resume.
    Taken before every step, so kept cheap: Python's state becomes text only when saved."""
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_file(state: dict) -> dict:
    """rng.pt's content: Python's state as its repr, which loads with weights_only=True."""
    return {**state, "python": repr(state["python"])}


def set_rng_state(state: dict) -> None:
    """Restore the generators from rng.pt's content."""
    import ast

    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
