#!/usr/bin/env bash
# One prepared GPU check, for a machine with one CUDA GPU and no network (about 6 minutes):
#   1. installs the CUDA stack from wheels carried beside the checkout (WHEELS, default .whl/; fetch them where pip
#      works with `bash benchmarks/gpu_wheels.sh`), over the machine's own CUDA torch when it has one;
#   2. runs the tests marked gpu (fused GPU kernels with and without bf16, row-wise and UVM-cached tables on nccl with
#      one rank, GPU scores against CPU scores);
#   3. runs the kernel benchmark and the scaling benchmark on the GPU, and a small end-to-end job (synth -> prepare ->
#      train -> score) on it.
# Everything goes to one file: RESULT (default $OUT/gpu_check.txt, else benchmarks/results/gpu_check.txt), plus the
# benchmarks' own JSON / markdown under benchmarks/results/.
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
  step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
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
try:
    torch.ops.fbgemm.split_embedding_codegen_lookup_rowwise_adagrad_function
    print("fbgemm GPU training kernels: present")
except (AttributeError, RuntimeError) as err:
    print("fbgemm GPU training kernels: MISSING:", err)
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
