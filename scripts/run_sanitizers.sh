#!/usr/bin/env bash
# ASan + UBSan run of the native layer (qvit._C) under the op tests.
#
# Builds qvit._C with QVIT_SANITIZE=address,undefined (setup.py: -O1 -g, no
# CUDA) in a scratch copy of the sources, so the normal in-place build of the
# checkout is never touched, then runs the op / binding / hardening / fuzz
# corpus tests against that copy with the sanitizer runtime preloaded into
# CPython (the interpreter itself is not instrumented, so libasan must be the
# first library loaded). Any ASan or UBSan report fails the run:
#   ASAN_OPTIONS   detect_leaks=0 (CPython and torch keep allocations alive on
#                  purpose at exit; leaks of the binding are checked by the
#                  fuzz harness's RSS / refcount checks instead), abort on error
#   UBSAN_OPTIONS  halt_on_error=1:print_stacktrace=1
# and the log is also grepped for reports, in case one slipped through a
# non-halting path.
#
# Usage (repository root, project venv active):
#   bash scripts/run_sanitizers.sh [extra pytest args]
# Environment: QVIT_SAN_DIR (scratch directory, default a fresh mktemp -d,
# removed at the end unless QVIT_SAN_KEEP=1), QVIT_SAN_TESTS (test files,
# default below; files that do not exist are skipped).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"

if [ -n "${QVIT_SAN_DIR:-}" ]; then
    work="$QVIT_SAN_DIR"
    mkdir -p "$work"
else
    work="$(mktemp -d "${TMPDIR:-/tmp}/qvit-san.XXXXXX")"
fi
cleanup() {
    if [ "${QVIT_SAN_KEEP:-0}" != "1" ] && [ -z "${QVIT_SAN_DIR:-}" ]; then
        rm -rf "$work"
    fi
}
trap cleanup EXIT

echo "qvit-san: scratch copy in $work"
src="$work/src"
rm -rf "$src"
mkdir -p "$src"
# Sources, package and tests only: no build/, no in-place .so, no venv.
for p in setup.py pyproject.toml MANIFEST.in csrc qvit tests; do
    if [ -e "$root/$p" ]; then
        cp -R "$root/$p" "$src/"
    fi
done
find "$src" -name '*.so' -delete
find "$src" -name '__pycache__' -type d -prune -exec rm -rf {} +

echo "qvit-san: building qvit._C with -fsanitize=address,undefined"
(
    cd "$src"
    QVIT_SANITIZE=address,undefined QVIT_CUDA=0 \
        "$python" setup.py -q build_ext --inplace >"$work/build.log" 2>&1
) || { cat "$work/build.log"; echo "qvit-san: build failed" >&2; exit 1; }
so="$(ls "$src"/qvit/_C*.so)"
# not grep -q: under pipefail, grep quitting early kills nm with SIGPIPE (exit 141)
if ! nm -D "$so" | grep __asan_ >/dev/null; then
    echo "qvit-san: $so is not instrumented (no __asan_ symbols)" >&2
    exit 1
fi

libasan="$(${CC:-gcc} -print-file-name=libasan.so)"
libubsan="$(${CC:-gcc} -print-file-name=libubsan.so)"
# libstdc++ next to libasan: CPython does not link it, and without it ASan's
# __cxa_throw interceptor finds no real function and aborts the first time
# torch throws a C++ exception (e.g. a meta tensor refused by DLPack).
libstdcxx="$(${CC:-gcc} -print-file-name=libstdc++.so)"
if [ ! -e "$libasan" ]; then
    echo "qvit-san: libasan.so not found (gcc -print-file-name=libasan.so)" >&2
    exit 1
fi

# Canary: a tiny library with the same flags, one signed overflow and one
# heap overflow, loaded the same way (ctypes, preloaded runtime). Both must be
# reported, or this run could not fail on a real bug.
cat >"$work/canary.c" <<'C'
#include <stdint.h>
#include <stdlib.h>
int64_t canary_overflow(int64_t a) { return a * 4; }
int canary_oob(int n) { int *p = malloc(n * sizeof(int)); int v = p[n]; free(p); return v; }
C
${CC:-gcc} -shared -fPIC -O1 -g -fno-wrapv -fsanitize=address,undefined -fno-omit-frame-pointer \
    "$work/canary.c" -o "$work/canary.so"
canary() {
    LD_PRELOAD="$libasan:$libubsan" ASAN_OPTIONS="detect_leaks=0" \
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
        "$python" -c "import ctypes; ctypes.CDLL('$work/canary.so').$1" >"$work/canary.log" 2>&1 || true
    if ! grep -q "$2" "$work/canary.log"; then
        cat "$work/canary.log"
        echo "qvit-san: the sanitizer canary $1 was not reported; reports are not live" >&2
        exit 1
    fi
}
canary "canary_overflow(ctypes.c_int64(1 << 62))" "signed integer overflow"
canary "canary_oob(4)" "heap-buffer-overflow"
echo "qvit-san: canary reports live (UBSan signed overflow, ASan heap overflow)"

default_tests="tests/test_ops.py tests/test_ops_errors.py tests/test_binding.py
tests/test_hardening.py tests/test_fuzz_corpus.py"
tests=()
for t in ${QVIT_SAN_TESTS:-$default_tests}; do
    if [ -e "$src/$t" ]; then
        tests+=("$t")
    else
        echo "qvit-san: skipping $t (not in this checkout)"
    fi
done

log="$work/pytest.log"
echo "qvit-san: running ${tests[*]}"
set +e
(
    cd "$src"
    # PYTHONPATH first, so `import qvit` is the instrumented copy, not the
    # checkout's editable install. `pytest`, not `python -m pytest`: the latter
    # would put the caller's working directory on sys.path.
    export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
    export LD_PRELOAD="$libasan:$libubsan:$libstdcxx"
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:allocator_may_return_null=1:print_summary=1"
    export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:report_error_type=1"
    # Slow-marked tests (e.g. the > 2^31-element one) and torch.compile are
    # too slow under ASan; everything else runs.
    "$(dirname "$(command -v "$python")")/pytest" -q -p no:cacheprovider -m "not slow" \
        "${tests[@]}" "$@" 2>&1
) | tee "$log"
status=${PIPESTATUS[0]}
set -e

if grep -E -q "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log"; then
    echo "qvit-san: FAILED: sanitizer report in the log" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "qvit-san: FAILED: pytest exited with $status" >&2
    exit "$status"
fi
echo "qvit-san: clean (ASan + UBSan, ${#tests[@]} test files)"
