"""Builds quantkern._C: C++ CPU kernels always; CUDA kernels when torch is a CUDA build and nvcc exists.

Build against the torch you run with: `pip install --no-build-isolation .` (see README).
Environment: QUANTKERN_NO_CUDA=1 skips CUDA; CUDA_HOME and TORCH_CUDA_ARCH_LIST (default
"8.0;9.0a") steer the CUDA build; MAX_JOBS sets compile parallelism.
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def cuda_plan():
    """(build CUDA?, why not) — decided once, printed in one line."""
    import torch

    if os.environ.get("QUANTKERN_NO_CUDA", "0") not in ("", "0"):
        return False, "QUANTKERN_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
    return True, ""


x86 = platform.machine().lower() in ("x86_64", "amd64")
cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"]
if x86:
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]  # baseline; AVX-512 chosen at run time
link_flags = ["-fopenmp"]
cpu_sources = ["csrc/quantkern.cpp"] + sources("cpu/*.cpp")

with_cuda, why_not = cuda_plan()
if with_cuda:
    from torch.utils.cpp_extension import CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    arch = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"quantkern: building CUDA kernels for TORCH_CUDA_ARCH_LIST={arch}")
    ext = CUDAExtension(
        "quantkern._C",
        cpu_sources + sources("cuda/*.cpp") + sources("cuda/*.cu"),
        extra_compile_args={
            "cxx": cxx_flags + ["-DQK_WITH_CUDA", f'-DQK_CUDA_ARCH="{arch}"'],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-DQK_WITH_CUDA"],
        },
        extra_link_args=link_flags,
    )
else:
    print(f"quantkern: skipping CUDA kernels ({why_not}); building the C++ CPU kernels only")
    ext = CppExtension("quantkern._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

setup(
    packages=find_packages(include=["quantkern", "quantkern.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
