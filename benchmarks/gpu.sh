#!/usr/bin/env bash
# The one GPU check: the CUDA test suite, then every benchmark (serve, swap, memory, train,
# http) on the `base`, `1b` and `8b` sizes, each step under its own time limit (the limits add
# up to under 8 minutes), and a final table of every target. Results go to $OUT (default
# ./bench-out), at most 7 files:
#
#   summary.txt    this script's log: each step's outcome and time, then every target
#   pytest.txt     the CUDA test suite's output
#   benches.txt    every benchmark's tables and progress lines, one after the other
#   results.json   every benchmark's result ({"results": [...]})
#   serve-base.png serve-8b.png   tokens/s against the number of adapters in a batch
#   nvidia-smi.txt
#
#   OUT=/tmp/bench-out bash benchmarks/gpu.sh
#
# Installs nothing: it runs .venv/bin/python when present, else $PY, else python3, with
# Adaptory importable; docs/BENCHMARKS.md says which wheels to carry to a bare GPU image.
# Bases, adapters and scratch registries go to $WORK (a temporary folder, removed at the end
# unless KEEP_WORK=1), never under $OUT. A failed or timed-out step is reported and the others
# still run; the script then exits 1.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
REPEATS="${REPEATS:-1}"     # one warm-up and REPEATS timed runs per variant
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [[ -z "${WORK:-}" ]]; then
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/adaptory-gpu.XXXXXX")"
    [[ -n "${KEEP_WORK:-}" ]] || trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/json"
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 COLUMNS=200
CAP_BYTES=$((15 * 1024 * 1024))  # what comes back from a device run: 16 MiB a file at most

preflight() {
    "$PY" - <<'PY'
import importlib.util
import sys

needed = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors",
          "tokenizers", "fastapi", "starlette", "pydantic", "uvicorn", "httpx", "rich", "click",
          "platformdirs", "filelock", "adaptory")
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("benchmarks/gpu.sh: not importable: " + ", ".join(missing)
             + " (docs/BENCHMARKS.md: running gpu.sh on a bare GPU image)")
import torch

if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: torch sees no CUDA device")
import bitsandbytes
import peft
import transformers

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name(0)}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, "
      f"bitsandbytes {bitsandbytes.__version__}, Python {sys.version.split()[0]}")
for module, what in (("matplotlib", "no plots"), ("pytest", "the test step will fail"),
                     ("xdist", "the tests run in one process")):
    if importlib.util.find_spec(module) is None:
        print(f"{module} is missing: {what}")
PY
}

names=() outcomes=() took=()
failed=0

cap() {  # keep the tail of a log that grew past what a device run brings back
    local file=$1
    if [[ -f "$file" ]] && (($(stat -c %s "$file") > CAP_BYTES)); then
        tail -c "$CAP_BYTES" "$file" >"$file.tail" && mv "$file.tail" "$file"
    fi
}

step() {  # step NAME SECONDS LOG COMMAND...: one step under `timeout`, its output appended to LOG
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS status
    echo "== $name (limit ${limit}s)"
    echo "== $name (limit ${limit}s): $*" >>"$log"
    timeout --kill-after=3 "$limit" "$@" >>"$log" 2>&1
    status=$?
    cap "$log"
    names+=("$name")
    took+=("$((SECONDS - start))")
    if ((status == 0)); then
        outcomes+=("ok")
        echo "   ok in $((SECONDS - start))s"
    else
        failed=1
        if ((status == 124 || status == 137)); then outcomes+=("timed out"); else outcomes+=("failed ($status)"); fi
        echo "   ${outcomes[-1]} after $((SECONDS - start))s; last lines of $(basename "$log"):"
        tail -n 5 "$log" | sed 's/^/     /'
    fi
}

bench() {  # bench NAME SECONDS SUBCOMMAND [options]: one `adaptory bench` run
    local name=$1 limit=$2 sub=$3
    shift 3
    step "$name" "$limit" "$OUT/benches.txt" "$PY" -m adaptory.cli.main bench "$sub" \
        --device cuda --repeats "$REPEATS" --workdir "$WORK" --json "$WORK/json/$name.json" "$@"
}

main() {
    local began=$SECONDS
    preflight || exit 2
    { nvidia-smi || true; } >"$OUT/nvidia-smi.txt" 2>&1
    : >"$OUT/pytest.txt"
    : >"$OUT/benches.txt"
    local xdist=() plot_base=() plot_8b=()
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
    if "$PY" -c "import matplotlib" 2>/dev/null; then
        plot_base=(--plot "$OUT/serve-base.png") plot_8b=(--plot "$OUT/serve-8b.png")
    fi

    # Step limits add up to 450 s (471 s if every step also needed its 3 s kill): under 8
    # minutes with the preflight and the summary.
    step pytest 80 "$OUT/pytest.txt" env ADAPTORY_TEST_DEVICE=cuda "$PY" -m pytest -q \
        -p no:cacheprovider -m "not slow and not soak" "${xdist[@]}"
    bench serve-base 55 serve --size base --no-diagnostics -k 8 -k 32 "${plot_base[@]}"
    bench serve-8b 140 serve --size 8b -k 8 -k 32 "${plot_8b[@]}"
    bench memory-8b 50 memory --size 8b -n 1 -n 10 -n 100
    bench train-1b 60 train --size 1b
    bench http-base 40 http --size base
    bench swap-base 25 swap --size base

    echo
    echo "steps (${REPEATS} timed run(s) per variant, $((SECONDS - began))s in all):"
    for i in "${!names[@]}"; do
        printf '  %-11s %-14s %4ss\n' "${names[$i]}" "${outcomes[$i]}" "${took[$i]}"
    done
    echo
    shopt -s nullglob
    local results=("$WORK"/json/*.json)
    if ((${#results[@]})); then
        "$PY" -m adaptory.cli.main bench summary "${results[@]}" --json "$OUT/results.json"
    else
        echo "no benchmark finished: no targets to report"
    fi
    echo "results in $OUT"
    return "$failed"
}

main 2>&1 | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
