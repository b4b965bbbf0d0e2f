#!/usr/bin/env bash
# Build the peers' venv (.peers-venv at the repository root) for benchmarks/bench_peers.py: deepctr-torch and
# torch-rechub with the versions pinned in benchmarks/peers/requirements.txt, apart from the project's .venv.
#
#   bash benchmarks/peers/setup.sh          # quick no-op when the venv matches requirements.txt
#
# Environment: PYTHON (default python3.11), PEERS_VENV (default REPO/.peers-venv).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3.11}"
venv="${PEERS_VENV:-$repo/.peers-venv}"
requirements="$here/requirements.txt"
stamp="$venv/.requirements.sha256"
export PIP_DISABLE_PIP_VERSION_CHECK=1

wanted="$(cat "$requirements" "$0" | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    echo "peers venv up to date: $venv"
    exit 0
fi

test -x "$venv/bin/python" || "$python" -m venv "$venv"
rm -f "$stamp"
# torch first and alone: the CPU build; the libraries only ask for torch>=..., which it then satisfies
"$venv/bin/pip" install -q "$(grep -E '^torch==' "$requirements")"
"$venv/bin/pip" install -q -r "$requirements"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import types

import requests
import torch

requests.get = lambda *args, **kwargs: types.SimpleNamespace(status_code=0, text="")  # no version-check request
import deepctr_torch.models.multitask  # noqa: E402, F401
import torch_rechub.models.multi_task  # noqa: E402, F401
from torch_rechub.trainers import MTLTrainer  # noqa: E402, F401

versions = {name: md.version(name) for name in ("torch", "deepctr-torch", "torch-rechub", "pyarrow", "scikit-learn")}
if torch.version.cuda:
    raise SystemExit(f"expected the CPU build of torch, got CUDA {torch.version.cuda}")
print("peers venv ready:", ", ".join(f"{k} {v}" for k, v in versions.items()))
PY
echo "$wanted" > "$stamp"
