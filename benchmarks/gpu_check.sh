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
step swav-head 150 python -m benchmarks.swav_head --shapes seer large --dtypes fp32 bf16 --out "$out/swav_head_gpu.json"
# SwAV training steps of SEER's models (SEER's config: synthetic crops, bf16 autocast, block checkpointing): img/s,
# MFU, peak memory.
seer=engine/configs/seer_regnety_256gf.yaml
for preset in regnety_128gf regnety_256gf; do
  for channels_last in true false; do
    step "train-$preset-channels_last=$channels_last" 60 python -m benchmarks.train --config "$seer" --steps 10 \
      --out "$out/train_${preset}_channels_last_${channels_last}.json" model.backbone="$preset" \
      train.batch_size=64 train.precision=bf16 model.activation_checkpointing=block model.channels_last="$channels_last"
  done
done
# SEER-10B on one GPU at a small batch: does one step fit, and how does the memory compare with `seer plan`?
step train-seer_10b 60 python -m benchmarks.train --config "$seer" --steps 3 --warmup 1 \
  --out "$out/train_seer_10b.json" model.backbone=seer_10b train.batch_size=4 train.precision=bf16 \
  model.activation_checkpointing=block model.channels_last=true
