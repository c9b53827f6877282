#!/usr/bin/env bash
# Every Adaptory benchmark on one CUDA GPU, results (JSON + tables + plot) into $OUT or ./bench-out.
#
#   OUT=/tmp/bench-out bash benchmarks/gpu.sh        # about 5-7 minutes on one GPU
#
# Installs nothing: it uses .venv/bin/python when present, else $PY, else python3, with Adaptory
# importable (pip install -e '.[dev]'). Each benchmark runs under its own `timeout`, so one hang
# cannot eat the others' time; a failed benchmark is reported and the script exits 1 at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
SIZE="${SIZE:-base}"        # random-init Llama-style base: tiny | small | base
REPEATS="${REPEATS:-3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/work"            # bases, adapters and scratch registries, reused between benches

if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

"$PY" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: torch sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
import adaptory.adapters.bench  # noqa: F401  (fails early if Adaptory is not installed)
PY
{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1

failed=()
run() {  # run NAME SECONDS [extra options]: one benchmark, its table in NAME.txt, JSON in NAME.json
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== bench $name (limit ${limit}s)"
    if COLUMNS=160 timeout --kill-after=15 "$limit" "$PY" -m adaptory.cli.main bench "$name" \
        --device cuda --size "$SIZE" --repeats "$REPEATS" --workdir "$WORK" \
        --json "$OUT/$name.json" "$@" >"$OUT/$name.txt" 2>&1; then
        echo "   ok in $((SECONDS - start))s"
    else
        echo "   FAILED (exit $?) after $((SECONDS - start))s; see $OUT/$name.txt"
        tail -n 5 "$OUT/$name.txt" || true
        failed+=("$name")
    fi
}

# Limits add up to 470 s, under 8 minutes even if every bench runs to its limit.
run serve 150 --plot "$OUT/bench_serve.png"
run swap 60
run memory 90
run train 90
run http 80

echo "results in $OUT"
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
