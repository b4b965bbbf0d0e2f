#!/usr/bin/env bash
# Fetch, where pip works, the wheels benchmarks/gpu_check.sh installs on a GPU machine that has its own CUDA torch and
# no network: the project's needs that machine lacks, built for ITS torch (TORCH, default 2.11, what the lent H200
# machines have) and Python (PY_VERSION, default 3.12), and no more than a run may carry (64 MiB with the checkout).
#
#   TORCH=2.11 bash benchmarks/gpu_wheels.sh [DEST (default .whl)]
#
# fbgemm-gpu and torchrec are released in step with torch (fbgemm-gpu 1.6 for torch 2.11, 1.7 for 2.12, 1.8 for 2.13).
# Their CUDA build is too big to carry (fbgemm-gpu 1.6.0: a 465 MB wheel, 2.5 GB unpacked), so the CPU build of the
# same release travels instead (5.7 MB): torchrec imports, its modules and the project's whole-model inference run on
# the GPU, and gpu_check.sh says which checks need fbgemm's CUDA kernels. FBGEMM=fbgemm-gpu==X fetches the CUDA build
# for a machine that can take it.
set -euo pipefail
DEST=${1:-.whl}
TORCH=${TORCH:-2.11}
PY_VERSION=${PY_VERSION:-3.12}
declare -A RELEASE=([2.11]=1.6.0 [2.12]=1.7.0 [2.13]=1.8.0)
declare -A TORCHREC=([2.11]=1.6.1 [2.12]=1.7.0 [2.13]=1.8.0)
[ -n "${RELEASE[$TORCH]:-}" ] || { echo "TORCH=$TORCH: expected one of ${!RELEASE[*]}" >&2; exit 2; }
FBGEMM=${FBGEMM:-fbgemm-gpu-cpu==${RELEASE[$TORCH]}}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
rm -rf "$DEST" && mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "torchrec==${TORCHREC[$TORCH]}" "$FBGEMM" polars==2.1.0 \
  polars-runtime-32==2.1.0 tensordict==0.15.3 pyvers==0.2.3 tomli-w==1.2.0 pyre-extensions==0.0.32
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: ${size} MB for torch $TORCH ($FBGEMM)"
[ "$size" -le 62 ] || echo "warning: over 62 MB: with the checkout this may not fit the 64 MiB a run carries" >&2
