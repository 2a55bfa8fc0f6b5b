"""Build of the qvit._C extension (C always; CUDA objects through nvcc when found).

Environment switches:
  QVIT_CUDA=0 / 1          never / always build the CUDA part (default: when nvcc is found)
  QVIT_CUDA_ARCHS="80;90"  cubins for each arch, plus PTX of the last one
  QVIT_MARCH=native        add -march=native to the C flags (local builds only)
  QVIT_SANITIZE=address,undefined
                           sanitizer build (-O1 -g, no CUDA), for the hardening tests
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(path):
    return os.path.relpath(path, HERE)


def find_nvcc():
    """nvcc from CUDA_HOME/CUDA_PATH, then PATH, then the toolkit's default prefix."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def cuda_home(nvcc):
    """The toolkit root of nvcc; its lib64 holds libcudart_static.a."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.isdir(home):
            return home
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    for cand in (root, "/usr/local/cuda"):
        if glob.glob(os.path.join(cand, "lib64", "libcudart_static.a")) or glob.glob(
            os.path.join(cand, "lib", "libcudart_static.a")
        ):
            return cand
    return root


def gencode_flags(archs):
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    last = archs[-1]
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
    return flags


SANITIZE = os.environ.get("QVIT_SANITIZE", "").strip()
CUDA_MODE = os.environ.get("QVIT_CUDA", "").strip()
CU_SOURCES = sorted(_rel(p) for p in glob.glob(os.path.join(HERE, "csrc", "*.cu")))
C_SOURCES = sorted(_rel(p) for p in glob.glob(os.path.join(HERE, "csrc", "*.c")))

NVCC = None
if CUDA_MODE != "0" and not SANITIZE:
    NVCC = find_nvcc()
    if CUDA_MODE == "1" and NVCC is None:
        sys.exit("qvit: QVIT_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
if CUDA_MODE == "1" and SANITIZE:
    sys.exit("qvit: QVIT_SANITIZE builds are CPU-only; unset QVIT_CUDA=1")
WITH_CUDA = NVCC is not None and bool(CU_SOURCES)
if CUDA_MODE == "1" and not CU_SOURCES:
    sys.exit("qvit: QVIT_CUDA=1 but there are no csrc/*.cu sources")
ARCHS = [a.strip() for a in os.environ.get("QVIT_CUDA_ARCHS", "80;90").split(";") if a.strip()]

if SANITIZE:
    C_FLAGS = ["-O1", "-g", "-std=c11", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math",
               "-fvisibility=hidden", f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer",
               # CPython's CFLAGS carry -fwrapv, which makes signed overflow defined
               # and so invisible to UBSan; the int64 index arithmetic must be checked.
               "-fno-wrapv"]
    LINK_FLAGS = ["-fopenmp", f"-fsanitize={SANITIZE}"]
else:
    # -ffp-contract=off: a fused multiply-add would change the rounding of
    # round(v)*s + beta and break bitwise parity with the reference.
    # -fno-trapping-math: lets GCC if-convert the backward loops without
    # AVX-512 masking (AVX2 / SSE4 paths vectorise); values are unchanged,
    # only floating-point exception flags could differ.
    C_FLAGS = ["-O3", "-std=c11", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math",
               "-fvisibility=hidden"]
    LINK_FLAGS = ["-fopenmp"]
if os.environ.get("QVIT_MARCH"):
    C_FLAGS.append("-march=" + os.environ["QVIT_MARCH"])

# nvcc's floating-point flags, pinned to the numerics the reference states
# (qvit/ops/reference.py) so that fp32 kernels match it bitwise:
#   -prec-div=true   v = (x - beta) / s is an IEEE round-to-nearest division,
#                    not the approximate one (the reference divides; it does
#                    not multiply by 1/s);
#   -prec-sqrt=true  the LSQ factor 1/sqrt(N_g * Qp) with an IEEE square root;
#   -ftz=false       denormal x, scales and products are kept, as on the CPU
#                    and in torch;
#   --fmad=false     round(v) * s + beta is a separate multiply and add: a
#                    fused multiply-add rounds once and gives a different y
#                    (the C flags say the same with -ffp-contract=off).
# These are nvcc's defaults without --use_fast_math; pinning them keeps a
# stray fast-math flag (or a changed default) from breaking parity silently.
NVCC_NUMERICS = ["-prec-div=true", "-prec-sqrt=true", "-ftz=false", "--fmad=false"]

macros = []
libraries = []
library_dirs = []
if WITH_CUDA:
    CUDA_HOME = cuda_home(NVCC)
    macros.append(("QVIT_WITH_CUDA", "1"))
    libraries = ["cudart_static", "stdc++", "rt", "pthread", "dl"]
    library_dirs = [d for d in (os.path.join(CUDA_HOME, "lib64"), os.path.join(CUDA_HOME, "lib"))
                    if os.path.isdir(d)]


# Objects of different configurations never mix: setuptools reuses an object
# (and skips relinking) when the sources are older, whatever the macros were.
# Each configuration gets its own temp folder, and a configuration change
# since the last build forces a full rebuild.
CONFIG_TAG = "-".join(filter(None, [
    "cuda" + "_".join(ARCHS) if WITH_CUDA else "cpu",
    ("san_" + SANITIZE.replace(",", "_")) if SANITIZE else "",
    ("march_" + os.environ["QVIT_MARCH"]) if os.environ.get("QVIT_MARCH") else "",
]))


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc into objects linked into the same extension."""

    def finalize_options(self):
        super().finalize_options()
        self._stamp = os.path.join(self.build_temp, "qvit-config")
        self.build_temp = os.path.join(self.build_temp, CONFIG_TAG)
        try:
            with open(self._stamp) as f:
                last = f.read().strip()
        except OSError:
            last = None
        if last != CONFIG_TAG:
            self.force = True

    def run(self):
        super().run()
        os.makedirs(os.path.dirname(self._stamp), exist_ok=True)
        with open(self._stamp, "w") as f:
            f.write(CONFIG_TAG + "\n")

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        if cu:
            os.makedirs(self.build_temp, exist_ok=True)
            for src in cu:
                obj = os.path.abspath(os.path.join(self.build_temp, os.path.basename(src) + ".o"))
                cmd = [NVCC, "-c", src, "-o", obj, "-O3", "-std=c++17", *NVCC_NUMERICS,
                       "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                       "-Icsrc", "-DQVIT_WITH_CUDA=1", *gencode_flags(ARCHS)]
                print("qvit: " + " ".join(cmd), flush=True)
                subprocess.check_call(cmd, cwd=HERE)
                ext.extra_objects.append(obj)
            print(f"qvit: built CUDA kernels for sm_{', sm_'.join(ARCHS)} "
                  f"(+ PTX compute_{ARCHS[-1]})", flush=True)
        else:
            print("qvit: CPU-only build (no CUDA kernels)", flush=True)
        super().build_extension(ext)


ext = Extension(
    "qvit._C",
    sources=C_SOURCES + (CU_SOURCES if WITH_CUDA else []),
    include_dirs=["csrc"],
    define_macros=macros,
    libraries=libraries,
    library_dirs=library_dirs,
    extra_compile_args=C_FLAGS,
    extra_link_args=LINK_FLAGS,
    depends=sorted(_rel(p) for p in glob.glob(os.path.join(HERE, "csrc", "*.h"))
                   + glob.glob(os.path.join(HERE, "csrc", "*.cuh"))),
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
