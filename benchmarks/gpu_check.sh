#!/bin/bash
# The GPU verdict of this project in one run of at most 8 minutes, cold caches included, for a session lent a GPU
# (an H200 here). Most important first: the Triton SwAV head in the training dtype (bf16 embeddings x fp32
# prototypes) at the large and SEER shapes, correctness asserted against fp64 before anything is timed; then K =
# 65,536; then the kernels' other launch paths (tests/test_kernels_gpu.py); then fp32; then each kernel alone; then
# torch.compile; then, only if DeepSpeed imports, RegNet training steps. Each case runs under its own time limit,
# catches its own failure, and ends its part of the log with one line "PASS|FAIL case (seconds)"; the summary of
# every case and the head/full comparison with the targets close the log.
#
#   bash ../shared/tools/device-wheels.sh .whl     # here, once, optional: DeepSpeed wheels (the GPU image lacks
#                                                  # DeepSpeed; ~5 MB; `/.whl/` in .git/info/exclude)
#   .venv/bin/pip download -q --no-deps -d .whl pytest pluggy iniconfig packaging   # and pytest's (~0.5 MB)
#   device run: bash benchmarks/gpu_check.sh "$OUT"   with carry [".whl"] when the wheels exist
#
# Results in OUT: log.txt, summary.txt, nvidia-smi.txt, swav_head_gpu.json (every record, with the check), and
# train_regnety_128gf.json when DeepSpeed imported. Copy the JSON files to benchmarks/results/ and commit them with
# this command line.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
log=$out/log.txt
summary=$out/summary.txt
: >"$summary"

case_() {  # case_ NAME SECONDS COMMAND...: run, keep going whatever happens, one verdict line
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local verdict="PASS $name ($((SECONDS - start)) s)"
  [ $rc -eq 124 ] && verdict="FAIL $name: timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAIL $name: exit $rc after $((SECONDS - start)) s"
  echo "$verdict" | tee -a "$log" >>"$summary"
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
bench="python3 -m benchmarks.swav_head --out $out/swav_head_gpu.json --fail-on-check"
# 1. The training path: correctness (fp64) at both shapes, then head forward/full of every provider but compile.
case_ head-bf16xfp32 100 $bench --shapes large seer --dtypes bf16xfp32 --benchmarks head/full head/forward \
  --providers triton eager swav
case_ head-bf16xfp32-k65k 60 $bench --shapes large_k65k --dtypes bf16xfp32 --benchmarks head/full \
  --providers triton eager swav
# 1b. The launch paths the benchmark shapes do not take (Sinkhorn rows split over programs, a queue, K = 65,536,
# eps = 0.01), compiled, against fp64.
if python3 -c "import pytest" >/dev/null 2>&1; then
  case_ kernels-gpu-paths 35 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider -o addopts=-ra \
    tests/test_kernels_gpu.py
else
  echo "SKIP kernels-gpu-paths: pytest does not import (carry its wheels in .whl, see the top of this file)" \
    | tee -a "$log" >>"$summary"
fi
# 2. fp32 (torch's default: exact fp32 matmuls), then TF32 allowed.
case_ head-fp32 60 $bench --shapes large seer --dtypes fp32 --benchmarks head/full --providers triton eager swav
case_ head-fp32-tf32 35 $bench --tf32 --shapes large --dtypes fp32 --benchmarks head/full --providers triton eager
# 3. Each kernel alone, training dtype.
case_ kernels-bf16xfp32 35 $bench --shapes large seer --dtypes bf16xfp32 --no-check \
  --benchmarks scores/forward sinkhorn/forward loss/full --providers triton eager swav
# 4. torch.compile of the reference (its first call compiles: tens of seconds each).
case_ compile-bf16xfp32 60 $bench --shapes large --dtypes bf16xfp32 --no-check --benchmarks head/full --providers compile
case_ compile-bf16xfp32-k65k 50 $bench --shapes large_k65k --dtypes bf16xfp32 --no-check --benchmarks head/full \
  --providers compile
# 5. A SEER training step through the engine, only where DeepSpeed imports (the wheels above).
if python3 -c "import deepspeed" >/dev/null 2>&1; then
  case_ train-regnety_128gf 45 python3 -m benchmarks.train --config engine/configs/seer_regnety_256gf.yaml \
    --steps 5 --warmup 2 --out "$out/train_regnety_128gf.json" model.backbone=regnety_128gf train.batch_size=32 \
    train.precision=bf16 model.activation_checkpointing=block model.channels_last=true
else
  echo "SKIP train-regnety_128gf: deepspeed does not import (carry the wheels of ../shared/tools/device-wheels.sh)" \
    | tee -a "$log" >>"$summary"
fi

{
  echo "== head/full against the targets (benchmarks/swav_head.py TARGETS)"
  python3 -m benchmarks.swav_head --summarize "$out/swav_head_gpu.json" 2>&1
  if grep -q '^FAIL' "$summary"; then echo "VERDICT: FAIL"; else echo "VERDICT: PASS"; fi
} >>"$summary"
echo "== summary" >>"$log"
cat "$summary" | tee -a "$log"
