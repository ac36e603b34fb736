#!/usr/bin/env bash
# One call on the GPU machine (the device tool's H100/H200: torch 2.11 + CUDA 13, no network):
#   builds unlearn_ext against that machine's torch, checks every CUDA/Triton kernel against the
#   reference (the op and Fisher tests on the GPU), runs the GPU benchmarks, and leaves logs and JSON
#   under $OUT (what the device tool brings back), named after the GPU.
# Usage there:  bash benchmarks/gpu_check.sh            (OUT defaults to ./.gpu_out)
# Knobs: SKIP_TESTS=1, SKIP_BENCH=1, BENCH_ARGS="..." (extra bench_fisher.py flags).
# Benchmarks: bench_fisher.py, bench_masked_kl.py and bench_ce_norm.py, JSON named after the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} UNLEARN_EXT_USE_CUDA=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
status=0

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
gpu=$($PY -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_"))' 2>/dev/null || echo unknown_gpu)
echo "gpu_check: $gpu, torch $($PY -c 'import torch; print(torch.__version__)')"

echo "== build (setup.py build_ext --inplace, $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
start=$(date +%s)
if ! $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "gpu_check: BUILD FAILED" >&2; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$PY -m unlearn_ext.info --json >"$OUT/info.json" 2>&1 || status=1
$PY -m unlearn_ext.info || status=1

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests on the GPU (CUDA kernels, Triton compiled for the GPU, Fisher on CUDA models)"
  $PY -m pytest tests/ops -q -x -m "cuda or triton" -p no:cacheprovider --junitxml="$OUT/tests_ops.xml" \
    >"$OUT/tests_ops.log" 2>&1 || status=1
  tail -5 "$OUT/tests_ops.log"
  UNLEARN_EXT_TEST_DEVICE=cuda $PY -m pytest tests/test_fisher.py -q -p no:cacheprovider -m "not slow" \
    >"$OUT/tests_fisher.log" 2>&1 || status=1
  tail -3 "$OUT/tests_fisher.log"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmarks"
  $PY benchmarks/bench_fisher.py --device cuda --out "fisher_${gpu}" ${BENCH_ARGS:-} >"$OUT/bench_fisher.log" 2>&1 || status=1
  tail -40 "$OUT/bench_fisher.log"
  cp benchmarks/results/fisher_"${gpu}".json "$OUT/" 2>/dev/null || true
  # SIU's loss at Llama-3 sizes (N=8192, H=4096, V=128256, bf16): torch, Liger (if installed), cuda, triton.
  timeout 300 $PY benchmarks/bench_masked_kl.py --device cuda --out "masked_kl_${gpu}" \
    >"$OUT/bench_masked_kl.log" 2>&1 || status=1
  tail -15 "$OUT/bench_masked_kl.log"
  cp benchmarks/results/masked_kl_"${gpu}".json "$OUT/" 2>/dev/null || true
  # The same with a frozen head (SIU with LoRA): no [V, H] weight gradient.
  timeout 200 $PY benchmarks/bench_masked_kl.py --device cuda --frozen-head --providers floor torch cuda triton \
    --out "masked_kl_${gpu}_frozen_head" >"$OUT/bench_masked_kl_frozen_head.log" 2>&1 || status=1
  tail -12 "$OUT/bench_masked_kl_frozen_head.log"
  cp benchmarks/results/masked_kl_"${gpu}"_frozen_head.json "$OUT/" 2>/dev/null || true
  # OPC's loss at Llama-3 sizes (N=8192, H=4096, V=131072, bf16): torch, compile, Liger, CCE, cuda, triton.
  timeout 300 $PY benchmarks/bench_ce_norm.py --device cuda --out "ce_norm_${gpu}" \
    >"$OUT/bench_ce_norm.log" 2>&1 || status=1
  tail -15 "$OUT/bench_ce_norm.log"
  cp benchmarks/results/ce_norm_"${gpu}".json "$OUT/" 2>/dev/null || true
fi
echo "gpu_check: done (status $status); files in $OUT"
exit $status
