#!/usr/bin/env bash
# One call on the GPU machine (the device tool's H100/H200: torch 2.11 + CUDA 13, no network):
#   builds unlearn_ext against that machine's torch, checks every CUDA/Triton kernel against the
#   reference (the op and Fisher tests on the GPU), runs the GPU benchmarks, and leaves logs and JSON
#   under $OUT (what the device tool brings back), named after the GPU.
# Usage there:  bash benchmarks/gpu_check.sh            (OUT defaults to ./.gpu_out)
# Knobs: SKIP_TESTS=1, SKIP_BENCH=1, BENCH_ARGS="..." (extra bench_fisher.py flags), BUDGET_S (default
#   540: the whole script's seconds; each step gets at most what is left, so one call under the device
#   tool's 600 s limit always ends with its summary written).
# Benchmarks: bench_masked_kl.py (trained and frozen head), bench_ce_norm.py, bench_fisher.py, JSON named
# after the GPU. $OUT/summary.txt lists every step: ok, FAILED (rc), TIMEOUT or SKIPPED (no time left).
# The device tool brings back at most 8 files, so $OUT holds summary.txt, info.json, the benchmark JSON
# and logs.tar.gz (every log, nvidia-smi and the tests' JUnit XML).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu_out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} UNLEARN_EXT_USE_CUDA=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
BUDGET_S=${BUDGET_S:-540}
t0=$(date +%s)
status=0
: >"$OUT/summary.txt"

left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }

# step NAME MAX_SECONDS CMD...: runs CMD with at most min(MAX_SECONDS, time left - 10) seconds, its
# output in $LOGS/NAME.log; records the outcome in summary.txt.
step() {
  local name=$1 cap=$2; shift 2
  local avail=$(( $(left) - 10 ))
  [ "$avail" -lt "$cap" ] && cap=$avail
  if [ "$cap" -lt 20 ]; then
    echo "$name SKIPPED (no time left)" | tee -a "$OUT/summary.txt"; status=1; return
  fi
  local s=$(date +%s) rc=0
  timeout "$cap" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  local took=$(( $(date +%s) - s )) word=ok
  if [ "$rc" -eq 124 ]; then word="TIMEOUT after ${cap}s"; elif [ "$rc" -ne 0 ]; then word="FAILED (rc $rc)"; fi
  [ "$rc" -ne 0 ] && status=1
  echo "$name $word, ${took}s" | tee -a "$OUT/summary.txt"
  tail -"${TAIL:-15}" "$LOGS/$name.log"
}

nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || true
pack() { tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$LOGS"; }
gpu=$($PY -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_"))' 2>/dev/null || echo unknown_gpu)
echo "gpu_check: $gpu, torch $($PY -c 'import torch; print(torch.__version__)'), budget ${BUDGET_S}s"

echo "== build (setup.py build_ext --inplace, $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
TAIL=40 step build 400 $PY setup.py build_ext --inplace
if ! grep -q "^build ok" "$OUT/summary.txt"; then echo "gpu_check: BUILD FAILED" >&2; pack; exit 1; fi
$PY -m unlearn_ext.info --json >"$OUT/info.json" 2>&1 || status=1
$PY -m unlearn_ext.info || status=1

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests on the GPU (CUDA kernels, Triton compiled for the GPU, Fisher on CUDA models)"
  TAIL=8 step tests_ops 240 $PY -m pytest tests/ops -q -m "cuda or triton" -p no:cacheprovider \
    --junitxml="$LOGS/tests_ops.xml"
  TAIL=3 step tests_fisher 90 env UNLEARN_EXT_TEST_DEVICE=cuda $PY -m pytest tests/test_fisher.py -q \
    -p no:cacheprovider -m "not slow"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmarks"
  # SIU's loss at Llama-3 sizes (N=8192, H=4096, V=128256, bf16): torch, Liger (if installed), cuda, triton.
  step bench_masked_kl 150 $PY benchmarks/bench_masked_kl.py --device cuda --out "masked_kl_${gpu}"
  # The same with a frozen head (SIU with LoRA): no [V, H] weight gradient.
  TAIL=12 step bench_masked_kl_frozen_head 100 $PY benchmarks/bench_masked_kl.py --device cuda --frozen-head \
    --providers floor torch cuda triton --out "masked_kl_${gpu}_frozen_head"
  # OPC's loss at Llama-3 sizes (N=8192, H=4096, V=131072, bf16): torch, compile, Liger, CCE, cuda, triton.
  step bench_ce_norm 150 $PY benchmarks/bench_ce_norm.py --device cuda --out "ce_norm_${gpu}"
  TAIL=40 step bench_fisher 200 $PY benchmarks/bench_fisher.py --device cuda --out "fisher_${gpu}" ${BENCH_ARGS:-}
  for f in masked_kl_"${gpu}" masked_kl_"${gpu}"_frozen_head ce_norm_"${gpu}" fisher_"${gpu}"; do
    cp "benchmarks/results/$f.json" "$OUT/" 2>/dev/null || echo "no benchmarks/results/$f.json" >>"$OUT/summary.txt"
  done
fi
echo "gpu_check: done (status $status) in $(( $(date +%s) - t0 ))s; files in $OUT"
pack
cat "$OUT/summary.txt"
exit $status
