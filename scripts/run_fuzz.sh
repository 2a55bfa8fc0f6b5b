#!/usr/bin/env bash
# Time-boxed fuzz of the native entry points (qvit._C.fq_forward / fq_backward
# and qvit.ops.fake_quant) against the reference oracle, then the leak check.
# Fails on any oracle violation, crash, hang or leak.
#
# Usage (repository root, project venv active, qvit._C built):
#   bash scripts/run_fuzz.sh [SECONDS] [SEED]
# Defaults: 60 s, seed = the day number (a new slice of the input space every
# day, reproducible from the log). With QVIT_FUZZ_CASES=N it runs exactly N
# cases instead of a time box (what CI does: the same cases on every run,
# however fast the machine; SECONDS then only sets the hang bound). With atheris installed and QVIT_FUZZ_ATHERIS=1
# the time box runs atheris (coverage-guided over the Python side) instead.
# A crash leaves the case being run in $QVIT_FUZZ_OUT/last_case.json (default
# a temp dir, printed); replay it with
#   python tests/fuzz/fuzz_binding.py --replay <file>
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python}"
seconds="${1:-60}"
seed="${2:-$(( $(date -u +%s) / 86400 ))}"
out="${QVIT_FUZZ_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/qvit-fuzz.XXXXXX")}"
mkdir -p "$out"
cases="${QVIT_FUZZ_CASES:-}"
# Hangs: fuzz_binding.py arms faulthandler per case (60 s, exits non-zero);
# timeout(1) is the outer bound.
limit=$(( ${seconds%.*} + 240 ))
if [ -n "$cases" ]; then
    limit=$(( ${seconds%.*} * 4 + 240 ))
    echo "qvit-fuzz: ${cases} cases (bound ${limit} s), seed ${seed}, cases saved under $out"
else
    echo "qvit-fuzz: ${seconds} s, seed ${seed}, cases saved under $out"
fi
if [ "${QVIT_FUZZ_ATHERIS:-0}" = "1" ] && "$python" -c "import atheris" 2>/dev/null; then
    timeout "$limit" "$python" tests/fuzz/fuzz_binding.py --atheris \
        -max_total_time="${seconds%.*}" -seed="$seed" -artifact_prefix="$out/" \
        -print_final_stats=1
elif [ -n "$cases" ]; then
    timeout "$limit" "$python" tests/fuzz/fuzz_binding.py --cases "$cases" --seed "$seed" \
        --crash-file "$out/last_case.json" --save "$out/classes"
else
    timeout "$limit" "$python" tests/fuzz/fuzz_binding.py --seconds "$seconds" --seed "$seed" \
        --crash-file "$out/last_case.json" --save "$out/classes"
fi
echo "qvit-fuzz: leak check"
timeout 600 "$python" tests/fuzz/fuzz_binding.py --seconds 0 --leak 3000
echo "qvit-fuzz: clean"
