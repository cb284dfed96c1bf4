"""Build dpt_fast and its C++/CUDA extension `dpt_fast._C` against the installed torch.

    pip install --no-build-isolation -e .

CPU kernels are always built. CUDA kernels are added when torch is a CUDA build, a CUDA toolkit (nvcc) is
found and either a GPU is visible or DPT_FAST_BUILD_CUDA=1 is set; DPT_FAST_BUILD_CUDA=0 forces CPU only.
The top-level `kernels/` folder (Triton kernels) is installed as the subpackage `dpt_fast.kernels`.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    flag = os.environ.get("DPT_FAST_BUILD_CUDA")
    if flag == "0":
        return False
    have_toolkit = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1":
        return have_toolkit
    return have_toolkit and torch.cuda.is_available()


def _extensions():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        return []
    openmp = ["-fopenmp"] if os.name != "nt" else []
    cxx = ["-O3", "-std=c++20", *openmp]
    if _want_cuda():
        cu = sorted(glob.glob("csrc/*.cu"))
        return [
            CUDAExtension(
                "dpt_fast._C",
                cpp + cu,
                define_macros=[("DPT_FAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]},
                extra_link_args=openmp,
            )
        ]
    return [CppExtension("dpt_fast._C", cpp, extra_compile_args=cxx, extra_link_args=openmp)]


setup(
    name="dpt_fast",
    version="0.1.0",
    description="Fast Dual Pseudo Training (DPT): semi-supervised learners and diffusion models with few labels",
    python_requires=">=3.10",
    packages=find_packages(include=["dpt_fast", "dpt_fast.*"]) + ["dpt_fast.kernels"],
    package_dir={"dpt_fast.kernels": "kernels"},
    package_data={"dpt_fast": ["assets/*.safetensors", "assets/*.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
