"""Loading the ``cdal`` C++ op library (``torch.ops.cdal.*``) once per process.

torch has no stable C++ ABI, so a library built against one torch does not load with another, while
the package accepts a range of torch versions. Three outcomes, in this order:

1. ``prebuilt``: the library built with the package (``cdal_fast._C``) loads, and the torch it
   was built against (``_C_build.json``, written by ``setup.py``) is the running one;
2. ``compiled``: otherwise the C++ sources shipped inside the package (``cdal_fast/_csrc``; ``csrc/``
   of a checkout) are compiled on first use with ``torch.utils.cpp_extension.load`` into a folder
   of the user cache per torch version and source hash (``CDAL_FAST_CACHE`` or ``~/.cache/cdal-fast``,
   then ``ops/``), when a C++ compiler and ninja are present; CPU kernels, plus the CUDA kernels when
   torch is a CUDA build and a CUDA toolkit is found. Later processes load the cached library
   without compiling;
3. ``plain``: otherwise the plain-PyTorch path of :mod:`.ops`, with one warning.

Each outcome records why (:attr:`ExtensionStatus.reason`); ``cdal-fast info`` prints it.
Environment: ``CDAL_FAST_NO_EXTENSION=1`` (plain path, nothing loaded or compiled),
``CDAL_FAST_JIT=auto|never|always`` (compile when the prebuilt library is missing or unusable /
never / always, ignoring the prebuilt one), ``CXX`` (the compiler), ``CDAL_FAST_OPENMP=0`` (no OpenMP).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import cache_dir

__all__ = ["extension_available", "extension_status", "ExtensionStatus", "PREBUILT", "COMPILED", "PLAIN",
           "source_dir", "torch_mismatch", "running_torch"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # cdal_fast/: where the prebuilt library and its record live
PREBUILT, COMPILED, PLAIN = "prebuilt", "compiled", "plain"
NO_EXTENSION_ENV = "CDAL_FAST_NO_EXTENSION"
JIT_ENV = "CDAL_FAST_JIT"
JIT_MODES = ("auto", "never", "always")
BUILD_RECORD = "_C_build.json"  # written by setup.py beside the prebuilt library
SHIPPED_SOURCES = "_csrc"  # the copy of csrc/ inside an installed package (setup.py)
JIT_NAME = "cdal_fast_ops"
# The same selection as setup.py's (without csrc/py_module.cpp, which only makes the prebuilt
# library a Python module: the compiled one is loaded with torch.ops.load_library).
CPU_SOURCES = ("register.cpp", "cpu/*.cpp")
CUDA_SOURCES = ("cuda/*.cu", "cuda/*_glue.cpp")
SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")  # hashed: an edited header rebuilds too
DONE_STAMP = "loaded.ok"  # written after the first successful load: the library in that folder is complete
BUILD_LOG = "build.log"


@dataclass(frozen=True)
class ExtensionStatus:
    """Which op library this process uses (``kind``: prebuilt / compiled / plain), where, and why."""

    kind: str
    reason: str
    path: Path | None = None

    @property
    def loaded(self) -> bool:
        return self.kind != PLAIN

    def describe(self) -> str:
        """One line for ``cdal-fast info``."""
        if self.kind == PREBUILT:
            return f"prebuilt library loaded ({self.path})"
        if self.kind == COMPILED:
            return f"compiled on first use at {self.path} ({self.reason})"
        return f"plain PyTorch because {self.reason}"


_STATUS: ExtensionStatus | None = None


def extension_status() -> ExtensionStatus:
    """Load the op library once per process (prebuilt, else compiled on first use, else none)."""
    global _STATUS
    if _STATUS is None:
        _STATUS = _load()
        if not _STATUS.loaded and not os.environ.get(NO_EXTENSION_ENV):
            warnings.warn(f"cdal_fast C++ ops not available: fused ops fall back to plain PyTorch because "
                          f"{_STATUS.reason}", RuntimeWarning, stacklevel=3)
    return _STATUS


def extension_available() -> bool:
    """True when ``torch.ops.cdal.*`` are registered (loads them on the first call; see :func:`extension_status`)."""
    return extension_status().loaded


def torch_mismatch(record: dict, running: dict) -> str | None:
    """Why a library built against ``record``'s torch cannot be used with ``running`` (None: same torch).

    Both are ``{"torch": version, "cuda": version or None, "cxx11_abi": bool}``; any difference
    changes the C++ symbols or the kernels the library needs.
    """
    for key, what in (("torch", "torch"), ("cuda", "CUDA"), ("cxx11_abi", "C++11 ABI setting")):
        if key in record and record[key] != running.get(key):
            return f"the prebuilt library was built for {what} {record[key]}, this is {what} {running.get(key)}"
    return None


def running_torch() -> dict:
    """The running torch in the form of setup.py's build record."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cxx11_abi": bool(torch.compiled_with_cxx11_abi())}


def _prebuilt() -> tuple[ExtensionStatus | None, str]:
    """Load ``cdal_fast._C`` when it was built for this torch: (status, "") or (None, why not)."""
    here = PACKAGE_DIR
    record_path = here / BUILD_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as exc:
            return None, f"the prebuilt library's build record {record_path} is unreadable ({exc})"
        if (mismatch := torch_mismatch(record, running_torch())) is not None:
            return None, mismatch  # loading it could fail or, worse, load and misbehave
    name = "cdal_fast._C"
    spec = importlib.util.find_spec(name)
    # Only the library beside this file (its build record is the one read above); an editable install
    # of another checkout in the same environment can otherwise answer for the name.
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != here:
        return None, "this installation has no prebuilt library"
    try:
        module = importlib.import_module(name)  # registers torch.ops.cdal.*
    except (ImportError, OSError) as exc:
        return None, f"the prebuilt library did not load ({exc})"
    return ExtensionStatus(PREBUILT, "built for this torch", Path(module.__file__)), ""


def source_dir() -> Path | None:
    """The C++ sources: shipped inside the package, else ``csrc/`` of the checkout it runs from."""
    for folder in (PACKAGE_DIR / SHIPPED_SOURCES, PACKAGE_DIR.parent / "csrc"):
        if (folder / CPU_SOURCES[0]).is_file():
            return folder
    return None


def _sources(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for pattern in patterns for p in root.glob(pattern))


def _source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _cuda_toolkit() -> str | None:
    """Why the CUDA kernels are left out of a compile (None: CUDA torch and nvcc are there)."""
    if not torch.version.cuda:
        return "torch is a CPU build"
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def _compile(why_not_prebuilt: str) -> ExtensionStatus:
    """Compile the shipped sources into the user cache (or load an earlier compile from there)."""
    root = source_dir()
    if root is None:
        return ExtensionStatus(PLAIN, f"{why_not_prebuilt}, and no C++ sources are shipped to compile")
    no_cuda = _cuda_toolkit()
    variant = "cpu" if no_cuda else f"cu{torch.version.cuda}"
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    folder = cache_dir() / "ops" / f"torch-{torch.__version__}-{py}-{variant}-{_source_hash(root)}"
    from torch.utils import cpp_extension

    library = folder / f"{JIT_NAME}{getattr(cpp_extension, 'LIB_EXT', '.so')}"
    detail = why_not_prebuilt + ("" if variant != "cpu" or not torch.version.cuda else f"; CPU kernels only: {no_cuda}")
    if (folder / DONE_STAMP).is_file() and library.is_file():
        try:
            torch.ops.load_library(str(library))
            return ExtensionStatus(COMPILED, f"{detail}; loaded from an earlier compile", library)
        except (OSError, RuntimeError) as exc:
            detail += f"; the earlier compile did not load ({exc})"
    compiler = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler.split()[0]) is None:  # CXX may carry a launcher: "ccache g++"
        return ExtensionStatus(PLAIN, f"{detail}, and there is no C++ compiler to compile the shipped sources "
                                      f"({compiler!r} not found; install one or set CXX)")
    if not cpp_extension.is_ninja_available():
        return ExtensionStatus(PLAIN, f"{detail}, and ninja is not installed to compile the shipped sources "
                                      "(pip install ninja)")
    sources = _sources(root, CPU_SOURCES + (() if no_cuda else CUDA_SOURCES))
    flags = ["-O3"]
    ldflags: list[str] = []
    if os.environ.get("CDAL_FAST_OPENMP", "1") == "1" and sys.platform.startswith("linux"):
        flags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if not no_cuda:
        flags.append("-DCDAL_WITH_CUDA=1")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return ExtensionStatus(PLAIN, f"{detail}, and the cache folder for compiling is not writable ({exc}; "
                                      "set CDAL_FAST_CACHE)")
    print(f"cdal-fast: compiling the C++ ops for torch {torch.__version__} into {folder} (first use only; "
          "a minute or two)", file=sys.stderr)
    try:
        built = cpp_extension.load(JIT_NAME, [str(s) for s in sources], extra_cflags=flags,
                                   extra_cuda_cflags=["-O3", "--use_fast_math", "-DCDAL_WITH_CUDA=1"],
                                   extra_ldflags=ldflags, extra_include_paths=[str(root)],
                                   build_directory=str(folder), with_cuda=not no_cuda, is_python_module=False)
    except Exception as exc:  # a compiler error, a missing header, a linker failure: keep the plain path
        with contextlib.suppress(OSError):
            (folder / BUILD_LOG).write_text(str(exc))
        last = str(exc).strip().splitlines()[-1:] or ["no output"]
        return ExtensionStatus(PLAIN, f"{detail}, and compiling the shipped sources failed ({last[0]}; "
                                      f"full output in {folder / BUILD_LOG})")
    with contextlib.suppress(OSError):  # without the stamp the next process asks ninja, which finds it up to date
        (folder / DONE_STAMP).write_text(json.dumps(running_torch()) + "\n")
    return ExtensionStatus(COMPILED, detail, Path(built))


def _load() -> ExtensionStatus:
    if os.environ.get(NO_EXTENSION_ENV):
        return ExtensionStatus(PLAIN, f"{NO_EXTENSION_ENV} is set")
    mode = os.environ.get(JIT_ENV, "auto").strip().lower() or "auto"
    if mode not in JIT_MODES:
        return ExtensionStatus(PLAIN, f"{JIT_ENV}={mode!r} is not one of {', '.join(JIT_MODES)}")
    if mode == "always":
        why = f"{JIT_ENV}=always skips the prebuilt library"
    else:
        status, why = _prebuilt()
        if status is not None:
            return status
    if mode == "never":
        return ExtensionStatus(PLAIN, f"{why}, and compiling on first use is off ({JIT_ENV}=never)")
    return _compile(why)
