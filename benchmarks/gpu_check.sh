#!/usr/bin/env bash
# One prepared GPU check, for a machine with one CUDA GPU, its own CUDA build of torch and no network (about 6 minutes):
#   1. installs the wheels carried beside the checkout (WHEELS, default .whl/, made where pip works by
#      `TORCH=<the machine's torch> bash benchmarks/gpu_wheels.sh`: torchrec and fbgemm-gpu of that torch's release,
#      polars, ...) into /tmp, on top of the machine's torch, which stays;
#   2. probes what the GPU can run: fbgemm's fused CUDA embedding kernels (absent when fbgemm's CPU build travelled,
#      the only one small enough), bf16, nccl;
#   3. runs what needs no fused kernels: the dense network's step fp32 vs bf16, an nccl all-reduce, the kernel
#      ceilings; then what does (the gpu tests, a small end-to-end job, the scaling benchmark), each reporting its own
#      failure without stopping the script.
# Everything goes to one file: RESULT (default $OUT/gpu_check.txt, else benchmarks/results/gpu_check.txt).
#
#   bash benchmarks/gpu_check.sh [WHEELS] [RESULT]
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
RESULT=${2:-${OUT:-benchmarks/results}/gpu_check.txt}
PY=${PYTHON:-python3}
SITE=/tmp/recsys-mtl-site
mkdir -p "$(dirname "$RESULT")"
: > "$RESULT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to RESULT, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)" | tee -a "$RESULT"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$RESULT"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$RESULT"
}

if [ -d "$WHEELS" ]; then
  step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels at $WHEELS: using what $PY already has" | tee -a "$RESULT"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
step environment 60 "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
for name in ("fbgemm_gpu", "torchrec", "polars", "transformers"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # report and go on: the checks below say what it breaks
        print(name, "NOT AVAILABLE:", err)
try:  # one fused lookup on the GPU: what DMP sharding, train and score on cuda need
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(100, 8, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)])
    out = tbe(torch.arange(4, device="cuda"), torch.tensor([0, 2, 4], device="cuda"))
    print("fbgemm fused CUDA embedding kernels: work, output", tuple(out.shape))
except Exception as err:  # report and go on
    print("fbgemm fused CUDA embedding kernels: MISSING (train / score on cuda and the gpu tests need them):",
          type(err).__name__, str(err)[:200])
EOF
step dense-bf16 120 "$PY" - <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import torch
from bench_kernels import BATCH, _DenseNet, _train_rate, ceilings
from recsys_mtl.config import load_config
cuda = torch.device("cuda")
print({k: round(v) for k, v in ceilings(cuda, quick=True).items()})
model = load_config("configs/demo.toml").model
net, x = _DenseNet(400, model, 4).to(cuda), torch.randn(BATCH, 400, device=cuda)
fp32 = _train_rate(net, x, cuda, 50)
with torch.autocast("cuda", dtype=torch.bfloat16):
    bf16 = _train_rate(net, x, cuda, 50)
print(f"dense network (cross + MMoE + 4 towers) at batch {BATCH}: fp32 {fp32:,.0f}, bf16 {bf16:,.0f} samples/s, "
      f"bf16 / fp32 {bf16 / fp32:.2f}")
EOF
step nccl 60 "$PY" - <<'EOF'
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
x = torch.ones(1 << 20, device="cuda")
dist.all_reduce(x)
torch.cuda.synchronize()
print("nccl", torch.cuda.nccl.version(), "all_reduce on one rank:", "ok" if bool((x == 1).all()) else "WRONG")
dist.destroy_process_group()
EOF
command -v nvidia-smi > /dev/null && step nvidia-smi 20 nvidia-smi

step gpu-tests 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step kernels 120 "$PY" benchmarks/bench_kernels.py --device cuda --quick --config configs/demo.toml

WORK=$(mktemp -d)
step e2e-data 60 "$PY" -m recsys_mtl synth --out "$WORK/raw" --impressions 200000 --quiet
step e2e-prepare 60 "$PY" -m recsys_mtl prepare "$WORK/raw" --out "$WORK/dataset"
step e2e-train 120 "$PY" -m recsys_mtl train --config configs/demo.toml --out "$WORK/run" --device cuda --quiet \
  --set "dataset=\"$WORK/dataset\"" --set model.text_dim=0 --set train.bf16=true --set train.batch_size=8192
step e2e-evaluate 60 "$PY" -m recsys_mtl evaluate "$WORK/run" --split test --device cuda
step e2e-score 60 "$PY" -m recsys_mtl score "$WORK/run" "$WORK/dataset" --out "$WORK/scores" --device cuda --quiet
step scaling 120 "$PY" benchmarks/bench_scaling.py --device cuda --sizes 1e6,1e7 --batches 4096,16384 --steps 8
cp benchmarks/results/kernels_cuda.* benchmarks/results/scaling_cuda.* "$(dirname "$RESULT")/" 2> /dev/null
echo "results: $RESULT" | tee -a "$RESULT"
