#!/usr/bin/env bash
# The GPU figures of the README in one run on one H100/H200 (its parts limited to 570 s in all):
#   1. training steps of our U-Net vs nnU-Net's PlainConvUNet and MONAI's DynUNet at nnU-Net's
#      3d_fullres sizes (128³ patch, batch 2, bf16), eager and torch.compile;
#   2. the augmentation alone (MONAI's chain per patch vs batched, 128³) and the training
#      DataLoader on 256³ scans, CPU chain vs device augmentation, 0/4/8 workers,
#      and fit throughput as a fraction of the pure step rate, with every host-device
#      synchronisation of the fits counted;
#   3. whole-volume inference vs MONAI's sliding_window_inference on a 256³ volume (bf16,
#      compiled too), then `segmentation infer` on a 512×512×400 CT-sized scan capped at 16 GB.
# Each part has its own time limit; results are JSON lines in $OUT (default runs/gpu_check).
# On a machine without internet, first `bash scripts/gpu_wheels.sh` where pip works and bring
# .whl/ along; this script installs it into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PYTHON" -c "import torch, monai, pytorch_lightning as pl; print(torch.__version__, \
torch.version.cuda, monai.__version__, pl.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: one part, its JSON lines and its log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
  echo "   exit $? after $((SECONDS - start)) s; $(grep -c '^{' "$OUT/$name.jsonl") lines"
}

part train_networks 210 "$PYTHON" scripts/benchmark.py train --device cuda \
  --sections networks --warmup 5 --steps 30
part train_data 170 "$PYTHON" scripts/benchmark.py train --device cuda \
  --sections augmentation,loader,fit --augmentation-patches 60 --scan 256 256 256 --cases 2 \
  --workers 0 4 8 --loader-batches 20 --warmup 5 --steps 30 --fit-workers 8 --sync-debug
part inference 90 "$PYTHON" scripts/benchmark.py --device cuda --volume 256 256 256 \
  --roi 128 128 128 --dtype bf16 --repeats 5 --compile --no-valid
part inference_large 100 "$PYTHON" scripts/benchmark.py --device cuda --volume 128 128 128 \
  --roi 128 128 128 --dtype bf16 --repeats 1 --no-valid --large --gpu-memory-gb 16
grep -h '"ratio"\|large_volume\|train_fit\|train_loader' "$OUT"/*.jsonl | cut -c1-400
