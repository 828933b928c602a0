"""Build the ``cdal_fast._C`` op library (CPU always; CUDA when a CUDA torch and toolkit exist).

Kernels are split so that CI, which has ``nvcc`` but a CPU build of torch, can still compile the
CUDA kernels (``csrc/cuda/*.cu`` include no torch headers); the ATen glue that registers them
(``csrc/cuda/*_glue.cpp``) is compiled only against a CUDA build of torch.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("CDAL_FAST_NO_EXTENSION"):
        return [], {}
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return [], {}
    include_dirs = [os.path.join(root, "csrc")]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 from torch 2.14).
    cxx = ["-O3"]
    if os.environ.get("CDAL_FAST_OPENMP", "1") == "1":
        cxx.append("-fopenmp")
    import torch

    use_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if use_cuda and os.environ.get("CDAL_FAST_NO_CUDA") != "1":
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*_glue.cpp"))
        ext = cpp_extension.CUDAExtension(
            "cdal_fast._C", sources, include_dirs=include_dirs,
            define_macros=[("CDAL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math",
                                                    "-lineinfo"]},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
        )
    else:
        ext = cpp_extension.CppExtension(
            "cdal_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
