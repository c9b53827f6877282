"""benchmarks/gpu.sh, the one GPU check: it parses, its step limits fit in 8 minutes, it runs the
CUDA test suite and every benchmark on the base, 1b and 8b sizes, and (run here with a stand-in
python) it goes on past a failed or timed-out step, brings back at most 8 files, flat, with
every finished benchmark's targets, and exits 1."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu.sh"
STEP = re.compile(r"^\s+(?:step|bench) (\S+) (\d+) (.*)$", re.M)


def _steps(text: str) -> dict[str, tuple[int, str]]:
    """{step name: (time limit, the rest of its line)}, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    return {name: (int(limit), rest) for name, limit, rest in STEP.findall(joined)}


def test_gpu_script_parses_and_fits_in_eight_minutes():
    text = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    steps = _steps(text)
    assert sum(limit for limit, _ in steps.values()) < 480
    assert "--kill-after=3" in text  # a step that ignores SIGTERM is killed 3 s later
    assert sum(limit + 3 for limit, _ in steps.values()) < 480
    pytest_step = steps["pytest"][1]
    assert "ADAPTORY_TEST_DEVICE=cuda" in pytest_step
    assert '-m "not slow and not soak"' in pytest_step
    commands = {rest.split()[0] for name, (_, rest) in steps.items() if name != "pytest"}
    assert commands == {"serve", "swap", "memory", "train", "http"}
    sizes = {m for _, rest in steps.values() for m in re.findall(r"--size (\S+)", rest)}
    assert sizes == {"base", "1b", "8b"}
    assert not re.search(r"\bpip3?\b|\bapt(-get)?\b|\bconda\b|\buv\b", text)  # installs nothing


def test_gpu_script_writes_at_most_eight_flat_files_outside_its_work_folder():
    text = SCRIPT.read_text()
    outputs = set(re.findall(r'"\$OUT/([^"$]+)"', text)) | set(
        re.findall(r"\$OUT/([A-Za-z0-9_.-]+)", text)
    )
    assert outputs and len(outputs) <= 8, outputs
    assert not any("/" in name for name in outputs)
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "WORK=" in code and not re.search(r"WORK=.*\$OUT", code)  # never under $OUT


FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for python: the preflight passes, pytest fails, each bench writes a result
if [[ "$1" == "-" ]]; then cat >/dev/null; echo "torch (stand-in)"; exit 0; fi
if [[ "$1" == "-c" ]]; then exit 1; fi
if [[ "$2" == "pytest" ]]; then echo "1 failed, 2 passed"; exit 1; fi
if [[ "$4" == "summary" ]]; then exec "$REAL_PY" "$@"; fi
args=("$@")
for i in "${!args[@]}"; do
    case "${args[$i]}" in
        --json) out="${args[$((i + 1))]}" ;;
        --size) size="${args[$((i + 1))]}" ;;
    esac
done
echo "bench $4 --size $size"
if [[ "$4" == "memory" ]]; then sleep 20; fi
cat >"$out" <<JSON
{"bench": "$4", "settings": {"size": "$size", "device": "cuda"},
 "targets": {"$4 on $size": {"value": 1.0, "op": ">=", "threshold": 0.9, "met": true,
                             "margin": 0.111}}}
JSON
"""


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_script_goes_on_past_failures_and_reports_every_step(tmp_path):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    text = SCRIPT.read_text()
    limits = _steps(text)
    assert "bench memory-8b 50 memory" in text
    # the same script with the memory step's limit cut to 1 s, so that it times out here
    (repo / "benchmarks" / "gpu.sh").write_text(
        text.replace("bench memory-8b 50", "bench memory-8b 1")
    )
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {
        "PATH": "/usr/bin:/bin",
        "PY": str(fake),
        "REAL_PY": sys.executable,
        "OUT": str(out),
        "TMPDIR": str(work.parent),
        "HOME": str(tmp_path),
    }
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "benches.txt",
        "nvidia-smi.txt",
        "pytest.txt",
        "results.json",
        "summary.txt",
    ]  # fmt: skip (no plots from the stand-in)
    summary = (out / "summary.txt").read_text()
    assert summary == done.stdout
    for name in limits:
        assert re.search(rf"^  {re.escape(name)} ", summary, re.M), name
    assert re.search(r"^  pytest\s+failed \(1\)", summary, re.M)
    assert re.search(r"^  memory-8b\s+timed out", summary, re.M)
    assert re.search(r"^  serve-8b\s+ok", summary, re.M)
    finished = {f"{b} on {s}" for b, s in [("serve", "base"), ("serve", "8b"), ("train", "1b"),
                                           ("http", "base"), ("swap", "base")]}  # fmt: skip
    results = json.loads((out / "results.json").read_text())["results"]
    assert {name for r in results for name in r["targets"]} == finished
    for name in finished:
        assert name in summary
    assert "1 failed, 2 passed" in (out / "pytest.txt").read_text()
    assert not list(work.parent.glob("adaptory-gpu.*"))  # the work folder is removed
