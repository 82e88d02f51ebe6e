#!/usr/bin/env bash
# One short GPU run: `jax-attn check`, the GPU bench, the decode step and the dispatch
# overhead (what the library adds around cuDNN), results under $OUT.
#
#   OUT=/path/to/results bash benchmarks/gpu.sh        # from anywhere; default OUT=benchmarks/results
#   THRESHOLDS=1 OUT=... bash benchmarks/gpu.sh       # + the size-rule sweeps (<= 150 s more:
#                                                     #   past 8 minutes, so a second call)
#
# Needs an NVIDIA GPU with jax (CUDA) installed, flax, tqdm, matplotlib; torch optional
# (compared only when it sees the GPU). No network. Budget: under 8 minutes
# (check <= 240 s: on an H200 it ran past 140 s on a fresh machine and took 122 s on the
# next run; bench <= 140 s; the decode step and the overhead <= 50 s each (neither yet
# run on a GPU; each writes its JSON after every case); enforced by timeout). Exit status 1 if check found a mismatch or
# a step failed; the files written so far stay.
set -u -o pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # jax and torch share the GPU; peaks are real
export MPLBACKEND=Agg
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
status=0

{
  echo "date: $stamp"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  python - <<'PY'
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
PY
} | tee "$OUT/gpu-env-$stamp.txt"

if ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "gpu.sh: jax sees no GPU; stopping" | tee -a "$OUT/gpu-env-$stamp.txt"
  exit 1
fi

echo "== jax-attn check =="
timeout 240 python -m jax_attn.apps.cli check --no-progress --json "$OUT/check-gpu-$stamp.json" \
  2>&1 | tee "$OUT/check-gpu-$stamp.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu.sh: check exited $rc"; status=1; }

echo "== jax-attn bench =="
timeout 140 python -m jax_attn.apps.cli bench --config configs/bench-gpu.toml --output-dir "$OUT" \
  --no-progress --note "benchmarks/gpu.sh $stamp" 2>&1 | tee "$OUT/bench-gpu-$stamp.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu.sh: bench exited $rc"; status=1; }

echo "== decode step (benchmarks/decode.py) =="
timeout 50 python benchmarks/decode.py --dtype bfloat16 --rounds 10 \
  --output "$OUT/decode-gpu-bfloat16-$stamp.json" 2>&1 | tee "$OUT/decode-gpu-$stamp.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu.sh: decode exited $rc"; status=1; }

echo "== what the library adds around its default kernel (benchmarks/dispatch_overhead.py) =="
timeout 50 python benchmarks/dispatch_overhead.py --dtype bfloat16 --rounds 10 \
  --output "$OUT/dispatch_overhead-gpu-$stamp.json" 2>&1 | tee "$OUT/dispatch_overhead-gpu-$stamp.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu.sh: dispatch_overhead exited $rc"; status=1; }

if [ "${THRESHOLDS:-0}" = "1" ]; then
  echo "== the dispatcher's size rules (benchmarks/gpu_thresholds.py) =="
  timeout 150 python benchmarks/gpu_thresholds.py \
    --output "$OUT/gpu_thresholds-$stamp.json" 2>&1 | tee "$OUT/gpu_thresholds-$stamp.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "gpu.sh: gpu_thresholds exited $rc"; status=1; }
fi

echo "gpu.sh: results in $OUT (exit $status)"
exit "$status"
