#!/usr/bin/env bash
# The GPU check of fmjax's GPU path, on a host with an NVIDIA GPU (H100/H200 class):
#   1. tests/test_attention_gpu.py with FMJAX_TEST_CUDNN=1: the real cuDNN and Pallas GPU
#      attention kernels (bf16) against the NumPy reference, next to the CPU-checked calls;
#   2. python -m fmjax.bench on configs/llama_1b.py (bf16, seq 2048, one GPU) with
#      attention=cudnn, =pallas_gpu (what packed pretraining runs) and =xla: tokens/s, MFU and
#      peak memory of each, at the largest global batch of $GPU_CHECK_BATCHES that fits (tried
#      from large to small; a RESOURCE_EXHAUSTED run moves on to the next), and the ratios.
#
# Usage: tools/gpu_check.sh
# Env: PYTHON (default python); GPU_CHECK_DEVICE (default 0), the one GPU used;
#      GPU_CHECK_BATCHES (default "48 40 32 24 16 8"); GPU_CHECK_STEPS (default 10);
#      GPU_CHECK_OUT (default gpu_check), where the JSON rows and logs go.
# Batch sizes: about 18 GiB of fp32 parameters, gradients and AdamW state for 1.1B parameters,
# plus roughly 1.3 MiB per token of bf16 activations saved by remat='dots' and fp32 logits:
# about 32 x 2048 tokens fit in 0.9 of an H200 (141 GB), 16-24 in an H100 (80 GB).
set -euo pipefail

PROG=gpu_check.sh
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BATCHES=${GPU_CHECK_BATCHES:-48 40 32 24 16 8}
STEPS=${GPU_CHECK_STEPS:-10}
OUT=${GPU_CHECK_OUT:-gpu_check}
export CUDA_VISIBLE_DEVICES=${GPU_CHECK_DEVICE:-0}

"$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null ||
  die "no GPU backend in '$PY' (jax.default_backend() is not gpu): run this on a GPU host with jax[cuda]"
mkdir -p "$OUT"

# The same XLA flags as fmjax.runtime.gpu_flags.apply (and launch/slurm), in effect for every run below.
GPU_ENV=$("$PY" -m fmjax.runtime.gpu_flags --platform gpu) || die "'$PY -m fmjax.runtime.gpu_flags' failed"
while IFS= read -r assignment; do
  [[ -n $assignment ]] || continue
  export "${assignment%%=*}=${assignment#*=}"
  printf '+ export %s\n' "$assignment"
done <<< "$GPU_ENV"

echo "== attention kernels against the NumPy reference (FMJAX_TEST_CUDNN=1)"
FMJAX_TEST_CUDNN=1 "$PY" -m pytest -q -rs tests/test_attention_gpu.py

# bench NAME OVERRIDE...: the largest batch of $BATCHES that fits; rows in $OUT/NAME.json.
bench() {
  local name=$1 b
  shift
  for b in $BATCHES; do
    echo "== bench $name: global_batch_size=$b"
    if "$PY" -m fmjax.bench --config configs/llama_1b.py --steps "$STEPS" --out "$OUT/$name.json" \
        --config.global_batch_size="$b" --config.data.packing=false "$@" >"$OUT/$name.log" 2>&1; then
      grep -E '^fmjax[.a-z_]*: attention:' "$OUT/$name.log" || true
      tail -n 3 "$OUT/$name.log" | sed -n 1,2p
      echo "$b" >"$OUT/$name.batch"
      return 0
    fi
    if ! grep -q -E 'RESOURCE_EXHAUSTED|[Oo]ut of memory' "$OUT/$name.log"; then
      tail -n 20 "$OUT/$name.log" >&2
      die "bench $name failed (not out of memory); log: $OUT/$name.log"
    fi
  done
  die "bench $name: no batch of '$BATCHES' fits"
}

bench cudnn --config.model.attention=cudnn
bench pallas_gpu --config.model.attention=pallas_gpu
bench xla --config.model.attention=xla

"$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
names = ('cudnn', 'pallas_gpu', 'xla')
rows = {name: json.load(open(f'{out}/{name}.json'))[0] for name in names}
batch = {name: open(f'{out}/{name}.batch').read().strip() for name in names}
print(f"{'attention':>10}  {'batch':>5}  {'tokens/s':>10}  {'MFU':>6}  {'peak GiB':>8}  {'step ms':>8}")
for name, r in rows.items():
  print(f"{name:>10}  {batch[name]:>5}  {r['tokens_per_s']:>10,.0f}  {r.get('mfu', 0):>6.1%}  "
        f"{r.get('peak_memory_gib', 0):>8.1f}  {r['step_ms']:>8.1f}")
for name in ('pallas_gpu', 'xla'):
  print(f"cudnn / {name} tokens/s: {rows['cudnn']['tokens_per_s'] / rows[name]['tokens_per_s']:.2f}x")
EOF
