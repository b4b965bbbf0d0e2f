#!/usr/bin/env bash
# Fetch, where pip works, the wheels benchmarks/gpu_check.sh installs on a GPU machine without network: the project's
# needs that its image lacks, for its Python (PY_VERSION, default 3.12) on manylinux x86_64. The machine's own CUDA
# torch stays if it is the release fbgemm-gpu was built for (torch 2.13 for fbgemm-gpu 1.8.0; else carry that torch's
# CUDA wheel too, or set FBGEMM to the fbgemm-gpu of the machine's torch). Sizes: fbgemm-gpu 1.8.0 (CUDA) is 495 MB and
# a CUDA torch about 900 MB, so they travel only where the transfer allows that much.
#
#   bash benchmarks/gpu_wheels.sh [DEST (default .whl)]
set -euo pipefail
DEST=${1:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
FBGEMM=${FBGEMM:-fbgemm-gpu==1.8.0}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$DEST" \
  torchrec==1.8.0 "$FBGEMM" polars==2.1.0 polars-runtime-32==2.1.0 tensordict==0.15.3 tomli-w==1.2.0 torchmetrics==1.0.3 pyre-extensions==0.0.32
du -sh "$DEST"
