#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install qvit into it.
# Usage: source scripts/setup_env.sh [extras]     e.g. "demo" or "test"
# Environment: QVIT_VENV (default .venv in the repository root), QVIT_PYTHON
# (default python3). torch and torchvision are pinned as a pair: timm needs
# torchvision, and a torchvision that does not match the installed torch fails
# to import.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QVIT_VENV:-$root/.venv}"
extras="${1:-test}"
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"

if [ ! -x "$venv/bin/python" ]; then
    echo "qvit: creating virtual environment in $venv"
    "${QVIT_PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet --upgrade pip setuptools wheel
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "qvit: installing $TORCH_PIN $TORCHVISION_PIN"
    python -m pip install --quiet "$TORCH_PIN" "$TORCHVISION_PIN"
fi
echo "qvit: building and installing qvit[$extras]"
python -m pip install --quiet -e "$root[$extras]"
python - <<'PY'
import torch, qvit, qvit._C as C
print(f"qvit {qvit.__version__}: torch {torch.__version__}, "
      f"CUDA part built: {C.cuda_built()}, CUDA devices: {max(C.cuda_device_count(), 0)}")
PY
