"""Builds moe_routing._C: a CUDAExtension when torch has CUDA and nvcc is found
(no GPU needed to build), else a CppExtension. MOE_ROUTING_CUDA=0/1 forces it."""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper in
# /usr/local/bin; the toolkit's own folder is the better guess when present.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/bin"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    home = cpp_extension.CUDA_HOME
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def build_with_cuda():
    forced = os.environ.get("MOE_ROUTING_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"moe_routing: MOE_ROUTING_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    nvcc = find_nvcc()
    if torch.version.cuda is None or nvcc is None:
        if forced == "1":
            raise SystemExit(
                "moe_routing: MOE_ROUTING_CUDA=1 but "
                + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc was not found")
            )
        return False
    found = nvcc_version(nvcc)
    wanted = int(torch.version.cuda.split(".")[0])
    if found is None or found[0] != wanted:
        raise SystemExit(
            f"moe_routing: nvcc at {nvcc} is CUDA {found}, but torch {torch.__version__} was "
            f"built with CUDA {torch.version.cuda}: the major versions must match. Install a "
            "matching torch or CUDA toolkit, or build without CUDA: MOE_ROUTING_CUDA=0."
        )
    return True


def cpu_flags():
    """AVX2 + FMA + F16C when the building machine has them (the extension is
    built where it runs, from source): at::vec then uses 256-bit registers and
    hardware float16/bfloat16 conversion instead of its portable scalar
    fallback. MOE_ROUTING_CPU_AVX2=0 builds portable x86-64 code."""
    if os.environ.get("MOE_ROUTING_CPU_AVX2", "1") == "0" or platform.machine() != "x86_64":
        return []
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []
    if not {"avx2", "fma", "f16c"} <= set(flags):
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for is an OpenMP pragma inside a header: without -fopenmp
    # every CPU kernel would run on one thread. libgomp.so.1 resolves to the
    # copy torch already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3"] + openmp + cpu_flags()
    if build_with_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return cpp_extension.CUDAExtension(
            "moe_routing._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=openmp,
        )
    return cpp_extension.CppExtension(
        "moe_routing._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
