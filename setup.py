"""Builds moe_routing._C: a CUDAExtension when torch has CUDA and nvcc is found
(no GPU needed to build), else a CppExtension. MOE_ROUTING_CUDA=0/1 forces it.

On Linux the build makes sure that libstdc++ is linked dynamically: a C++
compiler ($CXX) without a shared libstdc++ is replaced by /usr/bin/g++ when
that has one, or the build stops and says what to set; the linked library's
DT_NEEDED entries are checked too.

The helpers above main() import nothing beyond the standard library, so that
tests can import this file (tests/test_build.py) without running a build.
"""
import glob
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.abspath(__file__))

# The C++ standard of every source, for the host compiler and for nvcc alike
# (csrc/cuda uses C++20 template lambdas; CMakeLists.txt uses C++20 too).
# Passed explicitly: torch 2.6 compiles extensions with -std=c++17 by default,
# torch 2.14 with -std=c++20.
CXX_STD = "c++20"

# The oldest torch whose headers, built with CXX_STD, pass the whole test
# suite; pyproject.toml's dependency says the same.
MIN_TORCH = (2, 6)

# Compilers to fall back on when the chosen one would link libstdc++ statically.
FALLBACK_CXX = ("/usr/bin/g++",)
FIX_HINT = "CXX=/usr/bin/g++ CC=/usr/bin/gcc"


# --------------------------------------------------------------------------
# libstdc++ must be linked dynamically. torch and the extension then share one
# copy; an extension with its own static libstdc++ crashes, or garbles error
# messages, as soon as a std::ostream or std::string crosses into torch (every
# TORCH_CHECK that formats a number does).


def elf_needed(path):
    """The DT_NEEDED entries (shared libraries a binary depends on) of an ELF
    file, read from its section headers: no readelf or ldd needed."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    bits64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if bits64:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        sh_fmt, dyn_fmt = end + "IIQQQQIIQQ", end + "qQ"
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
        sh_fmt, dyn_fmt = end + "IIIIIIIIII", end + "iI"
    sections = [struct.unpack_from(sh_fmt, data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for sh_type, offset, size, link in ((s[1], s[4], s[5], s[6]) for s in sections):
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        step = struct.calcsize(dyn_fmt)
        for pos in range(offset, offset + size, step):
            tag, value = struct.unpack_from(dyn_fmt, data, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                name_end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value:name_end].decode())
    return needed


def libstdcxx_problem(cxx):
    """None when the compiler command `cxx` links libstdc++ dynamically (its
    -print-file-name=libstdc++.so resolves to a shared library or a linker
    script), else a sentence saying what is wrong."""
    probe = shlex.split(cxx) + ["-print-file-name=libstdc++.so"]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return f"`{shlex.join(probe)}` failed to run ({error})"
    found = result.stdout.strip()
    if result.returncode != 0 or not found:
        return f"`{shlex.join(probe)}` failed (exit {result.returncode})"
    if not os.path.isabs(found):
        # gcc echoes the bare name back when no directory of its search path has it.
        return f"`{shlex.join(probe)}` found no libstdc++.so in its library path"
    if not os.path.isfile(found):
        return f"`{shlex.join(probe)}` names {found}, which does not exist"
    with open(found, "rb") as fh:
        head = fh.read(64)
    if head[:4] == b"\x7fELF":
        if struct.unpack_from("<H" if head[5] == 1 else ">H", head, 16)[0] == 3:  # ET_DYN
            return None
        return f"{found} (from `{shlex.join(probe)}`) is not a shared library"
    if b"GNU ld script" in head or b"INPUT" in head or b"GROUP" in head:
        return None  # a linker script naming the real library
    return f"{found} (from `{shlex.join(probe)}`) is not a shared library"


def link_compilers(environ):
    """The C++ compiler commands this build uses: torch compiles with $CXX (or
    c++), setuptools links with $CXX (or Python's LDCXXSHARED compiler)."""
    if environ.get("CXX"):
        return [environ["CXX"]]
    linker = (sysconfig.get_config_var("LDCXXSHARED") or "g++").split()[0]
    return list(dict.fromkeys(["c++", linker]))


def choose_cxx(environ, fallbacks=FALLBACK_CXX, log=print):
    """Makes sure the build links libstdc++ dynamically. When the chosen C++
    compiler would link it statically, switches `environ` to the first fallback
    that does (saying so), or exits with a message that says how to fix it."""
    problems = {cxx: libstdcxx_problem(cxx) for cxx in link_compilers(environ)}
    problems = {cxx: why for cxx, why in problems.items() if why}
    if not problems:
        return None
    named = ", ".join(f"CXX={shlex.quote(cxx)}" for cxx in problems)
    reasons = "; ".join(problems.values())
    for fallback in fallbacks:
        if os.path.isfile(fallback) and libstdcxx_problem(fallback) is None:
            environ["CXX"] = fallback
            if environ.get("CC"):
                cc = os.path.join(os.path.dirname(fallback), "gcc")
                environ["CC"] = cc if os.path.isfile(cc) else fallback
            log(
                f"moe_routing: {named} would link libstdc++ statically ({reasons}); "
                f"building with CXX={fallback} instead. Set {FIX_HINT} to choose it yourself."
            )
            return fallback
    raise SystemExit(
        f"moe_routing: {named} has no shared libstdc++ ({reasons}), so the extension "
        "would carry its own static copy of libstdc++ and crash inside torch (for "
        "example while formatting an error message). Build with a compiler that links "
        f"libstdc++ dynamically, e.g. `{FIX_HINT} make install` or "
        f"`{FIX_HINT} pip install --no-build-isolation -e .`."
    )


# --------------------------------------------------------------------------


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


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def main():
    # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper in
    # /usr/local/bin; the toolkit's own folder is the better guess when present.
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/bin"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

    import torch
    from setuptools import setup
    from torch.utils import cpp_extension

    found_torch = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if found_torch < MIN_TORCH:
        raise SystemExit(
            f"moe_routing: needs torch >= {'.'.join(map(str, MIN_TORCH))}, "
            f"found {torch.__version__}"
        )
    if sys.platform.startswith("linux"):
        choose_cxx(os.environ)

    def find_nvcc():
        home = cpp_extension.CUDA_HOME
        candidates = [os.path.join(home, "bin", "nvcc")] if home else []
        candidates.append(shutil.which("nvcc"))
        return next((c for c in candidates if c and os.path.exists(c)), None)

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

    def extension():
        sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
        # at::parallel_for is an OpenMP pragma inside a header: without -fopenmp
        # every CPU kernel would run on one thread. libgomp.so.1 resolves to the
        # copy torch already loaded.
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        # -g0: Python's own CFLAGS (sysconfig) carry -g, and debug information
        # for ATen's templates doubles the compile time of every C++ source
        # (swiglu.cpp: 28 s with it, 14 s without, on a 2-core VM) and the size
        # of the library. MOE_ROUTING_DEBUG_INFO=1 keeps it, for gdb.
        debug_info = [] if os.environ.get("MOE_ROUTING_DEBUG_INFO") == "1" else ["-g0"]
        cxx_flags = ["-O3", f"-std={CXX_STD}"] + debug_info + openmp + cpu_flags()
        if build_with_cuda():
            # PTX of the newest target too, so that later GPUs (sm_100, sm_120) JIT it.
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
            sources += sorted(glob.glob("csrc/cuda/*.cu"))
            return cpp_extension.CUDAExtension(
                "moe_routing._C",
                sources,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", f"-std={CXX_STD}"]},
                extra_link_args=openmp,
            )
        return cpp_extension.CppExtension(
            "moe_routing._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp
        )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, then a check of what the linked library needs."""

        def build_extension(self, ext):
            super().build_extension(ext)
            path = self.get_ext_fullpath(ext.name)
            if not sys.platform.startswith("linux"):
                return
            needed = elf_needed(path)
            if not any(name.startswith("libstdc++.so") for name in needed):
                os.remove(path)
                raise SystemExit(
                    f"moe_routing: {path} was linked without the shared libstdc++ (its "
                    f"DT_NEEDED entries are {needed}): libstdc++ went in statically, "
                    "and the extension would crash inside torch. Check CXX, LDFLAGS and "
                    f"LDSHARED; a compiler that links it dynamically: {FIX_HINT}."
                )

    setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})


if __name__ == "__main__":
    main()
