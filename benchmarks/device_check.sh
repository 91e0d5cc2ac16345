#!/usr/bin/env bash
# GPU validation + benchmarks in one run of at most ~8 minutes on one H100/H200 (see docs/benchmarks.md).
#
# Needs torch, triton, transformers, peft, a CUDA build of bitsandbytes and liger-kernel; packages missing
# from the GPU machine's environment may be unpacked into .device-site/ (put on PYTHONPATH below).
# Run from the repository root, with OUT set to a folder for the results:
#   set -o pipefail; PYTHONUNBUFFERED=1 bash benchmarks/device_check.sh 2>&1 | tee $OUT/log.txt
# Every phase has its own time limit, so one that hangs or runs long cannot eat the later ones; the CSVs
# are appended row by row, so a phase cut off keeps what it measured. Files copied to $OUT (8 at most):
#   log.txt (from the tee), summary.md, kernels-cuda.csv, e2e-cuda.csv, gpu-check-cuda.csv, pytest.txt,
#   results.tgz (CSVs, PNGs and markdown of benchmarks/results).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/.device-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/device-check.XXXX)}
RES=benchmarks/results
mkdir -p "$OUT" "$RES"
T0=$(date +%s)
declare -a SUMMARY=()
FAILED=0

phase() {  # phase NAME SECONDS CMD...: runs CMD under a time limit and records its exit status
  local name=$1 limit=$2
  shift 2
  local start=$(date +%s)
  echo "=== [$(($(date +%s) - T0)) s] $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (time limit)"
  SUMMARY+=("$name: rc=$rc$note, $(($(date +%s) - start)) s")
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  echo "=== $name finished: rc=$rc$note"
}

echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
$PY - <<'EOF' || echo "environment check failed"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for name in ("triton", "transformers", "peft", "accelerate", "bitsandbytes", "liger_kernel"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as exc:  # report and go on: each phase says what it misses
        print(name, "IMPORT FAILED:", type(exc).__name__, exc)
EOF

# Limits (s): 45 + 30 + 75 + 35 + 55 + 30 + 75 + 45 + 55 + 15 (plot) = 460, plus ~10 of start-up checks.
# Liger-Kernel runs last: its grad_h GEMM runs in float32 (slow on tensor cores), so its rows must not eat the
# time of the others; the 32B head comes before any Liger row.
# 1. kernel unit tests on the GPU (Triton compiled, not interpreted) and benchmark-size correctness
phase pytest-kernels 45 bash -c "set -o pipefail; $PY -m pytest -q -p no:cacheprovider tests/kernels \
  2>&1 | tee '$OUT/pytest.txt'"
phase gpu-check 30 $PY -m benchmarks.gpu_check

# 2. kernel sweep without Liger. First the targets' point (7B head, N=16384) with the phase split, then
#    naive-compile there (its compiles cost tens of seconds each), then the 7B head over N, then the 32B
#    and 1.5B heads at a few N.
phase kernels-7b-16k 75 $PY -m benchmarks.bench_kernels --heads 7b --tokens 16k \
  --providers ours-triton,ours-torch,naive,cce --phases --time-budget-s 62
phase kernels-7b-16k-compile 35 $PY -m benchmarks.bench_kernels --heads 7b --tokens 16k \
  --providers naive-compile --modes loss-fwd-bwd --levels sequence_geomean
phase kernels-7b-sweep 55 $PY -m benchmarks.bench_kernels --heads 7b --tokens 2k,4k,8k,32k,64k \
  --providers ours-triton,naive,cce --levels sequence_geomean --time-budget-s 44
phase kernels-other-heads 30 $PY -m benchmarks.bench_kernels --heads 32b,1.5b --tokens 4k,16k,64k \
  --providers ours-triton,naive --modes loss-fwd-bwd --levels sequence_geomean --time-budget-s 22

# 3. one QLoRA step: 7B at full depth; QwQ-32B from 2 and 4 layers, extrapolated to 64
phase e2e-7b 75 $PY -m benchmarks.bench_e2e --models qwen2.5-7b --tokens 4k,8k,16k
phase e2e-32b 45 $PY -m benchmarks.bench_e2e --models qwq-32b --tokens 8k --layers 2,4

# 4. Liger last: the targets' point, then the 7B sweep and the 32B head, as far as its budget goes
phase kernels-liger 55 $PY -m benchmarks.bench_kernels --heads 7b,32b --tokens 16k,4k,64k \
  --providers liger-grpo --modes loss-fwd-bwd --time-budget-s 44

# 5. plots + tables, and the files that come back
phase plot 15 $PY -m benchmarks.plot $RES/kernels-cuda.csv $RES/e2e-cuda.csv --md $RES/summary-cuda.md \
  --title "GPU benchmark results"
for f in kernels-cuda.csv e2e-cuda.csv gpu-check-cuda.csv summary-cuda.md; do
  [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/${f/-cuda.md/.md}"
done
tar czf "$OUT/results.tgz" $RES/*.csv $RES/*.png $RES/*.md 2>/dev/null || true

echo "=== summary ($(($(date +%s) - T0)) s in all)"
printf '  %s\n' "${SUMMARY[@]}"
[ -f "$RES/summary-cuda.md" ] && sed -n '1,40p' "$RES/summary-cuda.md"
echo "=== $FAILED phase(s) did not finish with status 0"
exit $((FAILED > 0))
