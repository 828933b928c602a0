"""Build the ``cdal_fast._C`` op library (CPU always; CUDA when a CUDA torch and toolkit exist).

Kernels are split so that CI, which has ``nvcc`` but a CPU build of torch, can still compile the
CUDA kernels (``csrc/cuda/*.cu`` include no torch headers); the ATen glue that registers them
(``csrc/cuda/*_glue.cpp``) is compiled only against a CUDA build of torch.

A C++ library built against one torch does not load with another (torch has no stable C++ ABI), and
the package accepts a range of torch versions. So the build also records which torch it was built
against (``cdal_fast/_C_build.json`` beside the library) and ships the C++ sources inside the
package (``cdal_fast/_csrc/``): ``cdal_fast.network.op_library`` loads the prebuilt library when the torch matches
and otherwise compiles the same sources on first use (docs/install.md).

``CDAL_FAST_NO_EXTENSION=1`` builds no library (a pure-Python build; the sources are still shipped).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
SHIPPED_SOURCES = "_csrc"  # folder inside the installed package holding a copy of csrc/
SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
BUILD_RECORD = "_C_build.json"  # beside the library: the torch it was built against


class BuildPyWithSources(build_py):
    """Copies the C++/CUDA sources into the built package, so an installed wheel can compile them."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads csrc/ from the checkout
            return
        target = os.path.join(self.build_lib, "cdal_fast", SHIPPED_SOURCES)
        for path in sorted(glob.glob(os.path.join(ROOT, CSRC, "**", "*"), recursive=True)):
            if path.endswith(SOURCE_SUFFIXES):
                dest = os.path.join(target, os.path.relpath(path, os.path.join(ROOT, CSRC)))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(path, dest)


def _build_ext_class(base: type) -> type:
    class BuildExtRecordingTorch(base):
        """torch's BuildExtension, plus a record of the torch the library was built against."""

        def run(self) -> None:
            super().run()
            import torch

            record = {"torch": torch.__version__, "cuda": torch.version.cuda,
                      "cxx11_abi": bool(torch.compiled_with_cxx11_abi())}
            for ext in self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(ext.name))
                with open(os.path.join(folder, BUILD_RECORD), "w") as fh:
                    json.dump(record, fh, indent=1)
                    fh.write("\n")

    return BuildExtRecordingTorch


def _extensions():
    if os.environ.get("CDAL_FAST_NO_EXTENSION"):
        return [], {}
    from torch.utils import cpp_extension

    # The same selection as cdal_fast.network.op_library.CPU_SOURCES / CUDA_SOURCES (plus the Python module stub).
    sources = sorted(glob.glob(f"{CSRC}/*.cpp") + glob.glob(f"{CSRC}/cpu/*.cpp"))
    if not sources:
        return [], {}
    include_dirs = [os.path.join(ROOT, CSRC)]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 from torch 2.14).
    cxx = ["-O3"]
    if os.environ.get("CDAL_FAST_OPENMP", "1") == "1":
        cxx.append("-fopenmp")
    import torch

    use_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if use_cuda and os.environ.get("CDAL_FAST_NO_CUDA") != "1":
        sources += sorted(glob.glob(f"{CSRC}/cuda/*.cu") + glob.glob(f"{CSRC}/cuda/*_glue.cpp"))
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
    base = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)
    return [ext], {"build_ext": _build_ext_class(base)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
