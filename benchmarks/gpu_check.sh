#!/bin/bash
# Every GPU check and benchmark of this project in one run, for a session that is lent a GPU (an H200 here):
#
#   bash ../shared/tools/device-wheels.sh .whl          # here, once: DeepSpeed wheels (the GPU image lacks them)
#   bash benchmarks/gpu_check.sh "$OUT"                 # there, with the .whl folder carried along
#
# Each step has its own time limit (about 8.5 minutes in all, inside one 10-minute device command) and its output goes
# to OUT/log.txt; a failing step does not stop the others. Results are JSON files in OUT: copy them to
# benchmarks/results/ and commit them with this command line. DALI is not on the GPU image, so the GPU data path is
# not measured here.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" >>"$out/log.txt"
  timeout "$limit" "$@" >>"$out/log.txt" 2>&1
  echo "== $name: exit $? after ${SECONDS}s in all" | tee -a "$out/log.txt"
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
# Triton kernels: compiled for the real GPU, checked against the PyTorch reference, then timed.
step sm90-compile 60 python tests/test_triton_sm90_compile.py "$out/sm90_compile_gpu.json"
step swav-head 150 python benchmarks/swav_head.py --shapes seer large --dtypes fp32 bf16 --out "$out/swav_head_gpu.json"
# SwAV training steps of SEER's models (synthetic crops, bf16 autocast, block checkpointing): img/s, MFU, peak memory.
for preset in regnety_128gf regnety_256gf; do
  for layout in channels-last no-channels-last; do
    step "train-$preset-$layout" 60 python benchmarks/train.py --preset "$preset" --batch 64 --steps 10 \
      --precision bf16 --checkpointing block --"$layout" --out "$out/train_${preset}_${layout}.json"
  done
done
# SEER-10B on one GPU at a small batch: does one step fit, and how does the memory compare with `seer plan`?
step train-seer_10b 60 python benchmarks/train.py --preset seer_10b --batch 4 --steps 3 --warmup 1 \
  --precision bf16 --checkpointing block --out "$out/train_seer_10b.json"
