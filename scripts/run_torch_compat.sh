#!/usr/bin/env bash
# One wheel, two torch versions: build the qvit wheel once, then run the op,
# binding, compile and quantizer tests against that installed wheel (never the
# checkout) under
#   1. a second virtual environment with torch 2.13.0 (the CPU build), and
#   2. the project's .venv (torch 2.14.1, from scripts/setup_env.sh), the
#      wheel unpacked in front of the editable install (binding, compile and
#      exchange-path tests: the main suite runs the rest on this torch).
# qvit._C links no libtorch: tensors cross through DLPack, so the same binary
# must serve both. The oldest torch tested here is the lower bound stated in
# pyproject.toml and the README.
#
# timm is not installed in the second environment: timm needs torchvision, and
# PyPI's torchvision fails to import beside torch 2.13.0 ("operator
# torchvision::nms does not exist"). The tests run there import no timm; the
# wheel is installed with --no-deps for that reason.
#
# Usage (repository root): bash scripts/run_torch_compat.sh
# Environment: QVIT_CUDA as for any build (CI sets 1), QVIT_COMPAT_VENV
# (default .venv-compat), QVIT_COMPAT_TORCH (default torch==2.13.0),
# QVIT_PYTHON (default python3), QVIT_VENV (the main venv, default .venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QVIT_COMPAT_VENV:-$root/.venv-compat}"
main_venv="${QVIT_VENV:-$root/.venv}"
torch_pin="${QVIT_COMPAT_TORCH:-torch==2.13.0}"
want_torch="${torch_pin#torch==}"
unset PYTHONPATH  # the tests must import the installed wheel, not the checkout

# The op layer without timm; the >2^31-element hardening case (tens of GB of
# traffic, minutes here) checks C index arithmetic that no torch version changes.
COMPAT_TESTS=(test_ops.py test_ops_errors.py test_binding.py test_compile.py test_reference.py
              test_quantizer.py test_hardening.py test_fuzz_corpus.py
              test_torch_compat.py)
COMPAT_DESELECT=(--deselect "$root/tests/test_hardening.py::test_more_than_2_31_elements_fp16")
SAME_WHEEL_TESTS=(test_binding.py test_compile.py test_torch_compat.py)

if [ ! -x "$venv/bin/python" ]; then
    echo "qvit-compat: creating virtual environment in $venv"
    "${QVIT_PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
have="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$have" != "$want_torch" ]; then
    echo "qvit-compat: installing $torch_pin (had: ${have:-none})"
    "$py" -m pip install --quiet "$torch_pin"
fi
"$py" -m pip install --quiet numpy pytest hypothesis

work="$(mktemp -d "${TMPDIR:-/tmp}/qvit-compat.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "qvit-compat: building the wheel (QVIT_CUDA=${QVIT_CUDA:-auto})"
"$py" -m pip wheel --quiet --no-deps -w "$work/dist" "$root"
wheel="$(ls "$work"/dist/qvit-*.whl)"
echo "qvit-compat: built $(basename "$wheel")"
"$py" -m pip install --quiet --no-deps --force-reinstall "$wheel"

# Both runs start in an empty folder: `python -m pytest` puts the working
# directory on sys.path, and the checkout's qvit/ must not shadow the wheel.
check_origin() {  # $1 = python, $2 = the folder qvit must come from
    "$1" - "$2" <<'PY'
import os, sys, torch, qvit, qvit._C as C
from qvit.ops import backend_info
where = os.path.realpath(sys.argv[1])
for f in (qvit.__file__, C.__file__):
    if not os.path.realpath(f).startswith(where + os.sep):
        sys.exit(f"qvit-compat: {f} is not from {where}")
info = backend_info()
print(f"qvit-compat: torch {torch.__version__}, qvit._C {os.path.basename(C.__file__)} from "
      f"{where}, CUDA part built: {info['cuda_built']}, tensors pass via {info['exchange_api']}")
PY
}

mkdir -p "$work/run"
cd "$work/run"
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
check_origin "$py" "$site"
tests=()
for t in "${COMPAT_TESTS[@]}"; do tests+=("$root/tests/$t"); done
echo "qvit-compat: the op tests under $torch_pin, from the wheel"
"$py" -m pytest -q -p no:cacheprovider -c "$root/pyproject.toml" "${COMPAT_DESELECT[@]}" "${tests[@]}"

if [ -x "$main_venv/bin/python" ]; then
    mkdir -p "$work/unpacked"
    "$py" -m zipfile -e "$wheel" "$work/unpacked"
    tests=()
    for t in "${SAME_WHEEL_TESTS[@]}"; do tests+=("$root/tests/$t"); done
    echo "qvit-compat: the same wheel under the main environment's torch"
    PYTHONPATH="$work/unpacked" check_origin "$main_venv/bin/python" "$work/unpacked"
    PYTHONPATH="$work/unpacked" "$main_venv/bin/python" -m pytest -q -p no:cacheprovider \
        -c "$root/pyproject.toml" "${tests[@]}"
else
    echo "qvit-compat: no main environment at $main_venv; skipped the same-wheel run"
fi
