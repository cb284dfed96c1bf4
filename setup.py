"""Build dpt_fast and its C++/CUDA extension `dpt_fast._C` against the installed torch.

    pip install --no-build-isolation -e .                               # CPU kernels (+ CUDA with a GPU and nvcc)
    DPT_FAST_BUILD_CUDA=1 python setup.py build_ext --inplace           # CUDA kernels too, no GPU needed

CPU kernels are always built. CUDA kernels are added when torch is a CUDA build, a CUDA toolkit (nvcc) is
found and either a GPU is visible or DPT_FAST_BUILD_CUDA=1 is set; DPT_FAST_BUILD_CUDA=0 forces CPU only.

The toolkit: $CUDA_HOME (or $CUDA_PATH), else the one PyPI's wheels install into the environment
(`pip install "cuda-toolkit[nvcc,cccl]==<torch's CUDA version>"` puts nvcc, its headers and libcudart in
<site-packages>/nvidia/cu13), else /usr/local/cuda. Architectures: $TORCH_CUDA_ARCH_LIST when set, else the
visible GPUs', else (no GPU) sm_80 and sm_90, plus sm_100 when this nvcc knows it, with PTX of the newest
for later GPUs.

The top-level `kernels/` folder (Triton kernels) is the subpackage `dpt_fast.kernels` through the tracked
link dpt_fast/kernels -> ../kernels (a plain import from a checkout, a wheel or an editable install).
"""
import glob
import os
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

import torch


def _cuda_home() -> str | None:
    """The CUDA toolkit to build with (see the module docstring), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if torch.version.cuda is None:
        return None
    try:
        import nvidia  # the namespace package of NVIDIA's PyPI wheels

        for root in nvidia.__path__:
            home = Path(root) / f"cu{torch.version.cuda.split('.')[0]}"
            if (home / "bin" / "nvcc").is_file():
                return str(home)
    except ImportError:
        pass
    for home in (f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"):
        if (Path(home) / "bin" / "nvcc").is_file():
            return home
    return None


# torch.utils.cpp_extension reads CUDA_HOME once, on import: set it first (torch's own guess follows `nvcc`
# on PATH, which can be a wrapper script in /usr/local/bin, giving CUDA_HOME=/usr/local).
if _cuda_home() is not None:
    os.environ["CUDA_HOME"] = _cuda_home()

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    flag = os.environ.get("DPT_FAST_BUILD_CUDA")
    if flag == "0":
        return False
    have_toolkit = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1":
        if not have_toolkit:
            raise SystemExit("DPT_FAST_BUILD_CUDA=1 but no CUDA toolkit was found (and torch must be a CUDA build): "
                             "pip install \"cuda-toolkit[nvcc,cccl]==13.0.*\" (torch's CUDA version) or set CUDA_HOME")
        return True
    return have_toolkit and torch.cuda.is_available()


def _default_arch_list() -> str:
    """sm_80;sm_90 (+ sm_100 when nvcc knows it), PTX of the newest: for a build on a machine without a GPU."""
    try:
        known = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        known = []
    archs = ["8.0", "9.0"] + (["10.0"] if "compute_100" in known else [])
    return ";".join(archs) + "+PTX"


def _libcudart_dir() -> list[str]:
    """The PyPI toolkit ships libcudart.so.N without the libcudart.so link `-lcudart` needs: add one in build/."""
    lib = Path(CUDA_HOME) / "lib"
    if (lib / "libcudart.so").exists() or (Path(CUDA_HOME) / "lib64" / "libcudart.so").exists():
        return []
    versioned = sorted(lib.glob("libcudart.so.*"))
    if not versioned:
        return []
    shim = Path("build") / "cudart_link"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "libcudart.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(versioned[0].resolve())
    return [str(shim.resolve())]


def _extensions():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        return []
    openmp = ["-fopenmp"] if os.name != "nt" else []
    cxx = ["-O3", "-std=c++20", *openmp]
    if _want_cuda():
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list()
        print(f"dpt_fast: building the CUDA kernels with {CUDA_HOME} for TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(the visible GPUs)')}")
        # Every source has its own object name (x.cpp and x.cu would both make x.o): the .cu files end in _cuda.
        cu = sorted(glob.glob("csrc/*.cu"))
        return [
            CUDAExtension(
                "dpt_fast._C",
                cpp + cu,
                define_macros=[("DPT_FAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]},
                library_dirs=_libcudart_dir(),
                extra_link_args=openmp,
            )
        ]
    return [CppExtension("dpt_fast._C", cpp, extra_compile_args=cxx, extra_link_args=openmp)]


setup(
    name="dpt_fast",
    version="0.1.0",
    description="Fast Dual Pseudo Training (DPT): semi-supervised learners and diffusion models with few labels",
    python_requires=">=3.10",
    packages=find_packages(include=["dpt_fast", "dpt_fast.*"]),  # dpt_fast.kernels: the tracked link to kernels/
    package_data={"dpt_fast": ["assets/*.safetensors", "assets/*.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
