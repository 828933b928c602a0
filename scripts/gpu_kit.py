"""The GPU run kit: everything a lent GPU is for, in one command that fits one device call.

    bash scripts/gpu_check.sh OUT              # on the lent GPU (carry .whl; see docs/benchmarks.md)
    bash scripts/gpu_check.sh --dry-run OUT    # the same steps on this CPU at tiny sizes (CI runs it)

A lent machine is bare, offline and short-lived: about 15 minutes of device time in all, at most 10
minutes a command, at most 8 files back from ``$OUT``. So the kit

* checks first what the image lacks (``preflight``): it installs the carried wheels (``.whl/``,
  Python 3.12 manylinux, see :data:`CARRIED`) with ``pip --no-index --target`` and imports every
  module the run needs, printing what is still missing;
* builds the C++/CUDA ops for sm_90 only, checks that their CUDA kernels registered, and goes on
  without the extension when either fails (eager, graphs, compile and segment do not need it);
* runs each step under its own time limit, inside one deadline for the whole call, most important
  first, so a run cut short still returns every finished step;
* writes everything under ``OUT/gpu_kit/`` and packs it into ``OUT/gpu_kit.tar.gz`` after every
  step (plus ``OUT/summary.md``: two files, whatever happens), and prints the key tables.

The dry run hides from Python what the image lacks (:data:`IMAGE_LACKS`, through a
``sitecustomize`` that lets them be imported only from the wheel target), repacks this machine's
installed copies of :data:`CARRIED` into wheels so the carried-wheel install runs for real, runs
the CPU variant of every step at tiny sizes and skips the CUDA-only ones with the reason. Its
``compile`` step gets a 3-second limit on purpose: compiling takes a minute on a small CPU, so the
step shows that a timed-out step is recorded and the run goes on.

This file needs only the standard library: the steps that use torch run as subprocesses
(:mod:`gpu_kit_steps` for the kit's own helpers).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS_PY = str(REPO / "scripts" / "gpu_kit_steps.py")
# What the lent machine's image lacks (import names; its package list is in the device tool's KINDS.md)
IMAGE_LACKS = ("shapely", "imagecodecs", "nibabel", "openslide", "pydicom", "wsidicom", "ray")
# ... and what of that this run needs, carried as wheels (segment's nuclei outlines use shapely)
CARRIED = ("shapely",)
REQUIRED = ("torch", "numpy", "safetensors", "click", "tqdm", "tifffile", "PIL", "scipy", "skimage", "shapely",
            "onnx", "onnxruntime", "pytest")
OPTIONAL = ("hypothesis", "matplotlib", "triton", "tensorrt", "imagecodecs", "nibabel", "ninja")
COMPILE_LIMIT_S = 200.0  # the whole sampler compiled for the GPU (60 s was too short on an H200)
DEADLINE_S = 500.0  # the whole kit on the GPU: inside a 600-s command, leaving device time for a second call
DRY_DEADLINE_S = 900.0
DRY_SLACK = 4.0  # dry-run step limits: this many times the GPU ones (module docstring)
MIN_STEP_S = 5.0  # a step that would get less than this is skipped ("no time left")
ARCHIVE = "gpu_kit.tar.gz"
SUMMARY = "summary.md"
SAMPLE = "cdal_fast/samples/sample_ihc.ome.tif"
SLIDE_SIDE, SLIDE_MPP = 2000, 0.25  # the throughput target: a 2000x2000-px slide at 0.25 um/px
DRY_SLIDE_SIDE = 400
SHIPPED_BATCHES = ("1", "8", "64")


@dataclass
class StepRecord:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    rc: int | None = None
    log: str = ""
    note: str = ""


@dataclass
class Kit:
    out: Path
    dry: bool
    wheels: Path
    deadline_s: float
    python: str = sys.executable
    records: list[StepRecord] = field(default_factory=list)
    extension: bool = True  # the C++ ops are usable (built and registered)

    def __post_init__(self) -> None:
        self.res = self.out / "gpu_kit"
        self.res.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="cdal_gpu_kit_"))
        self.site = self.tmp / "site"
        self.start = time.monotonic()
        self.device = "cpu" if self.dry else "cuda"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", CDAL_FAST_CACHE=str(self.tmp / "cache"))
        self.env.pop("PYTHONHOME", None)
        paths = [str(self.site), str(REPO)]
        if self.dry:  # what the image lacks becomes unimportable, except from the wheel target
            hide = self.tmp / "hide"
            hide.mkdir()
            shutil.copy(REPO / "scripts" / "gpu_kit_hide.py", hide / "sitecustomize.py")
            paths.append(str(hide))
            self.env.update(CDAL_KIT_HIDE=",".join(IMAGE_LACKS), CDAL_KIT_SITE=str(self.site))
        self.env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])

    # -- running steps ------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], limit_s: float, env: dict[str, str] | None = None,
            note: str = "", exact: bool = False) -> StepRecord:
        """``cmd`` under ``limit_s`` (cut to the deadline), output to ``gpu_kit/NAME.txt``; the whole
        process group is killed at the limit. Recorded, packed and printed whatever happens. The dry
        run gives every step :data:`DRY_SLACK` times its GPU limit (a shared 2-core CPU is slower than
        the GPU machine's 16 cores), except an ``exact`` one."""
        limit = min(limit_s * (DRY_SLACK if self.dry and not exact else 1), self.left())
        log = self.res / f"{name}.txt"
        if self.left() < MIN_STEP_S:
            return self.record(StepRecord(name, "skipped", note=f"no time left ({self.left():.0f} s)"))
        print(f"== {time.strftime('%H:%M:%S')} {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, status = None, "timeout"
        rec = StepRecord(name, status, time.monotonic() - t0, limit, rc, log.name, note)
        return self.record(rec)

    def skip(self, name: str, why: str) -> StepRecord:
        return self.record(StepRecord(name, "skipped", note=why))

    def record(self, rec: StepRecord) -> StepRecord:
        self.records.append(rec)
        print(f"   {rec.name}: {rec.status} rc={rec.rc} {rec.seconds:.1f} s {rec.note}".rstrip(), flush=True)
        self.pack()
        return rec

    def helper(self, name: str, *args: str, limit_s: float = 60.0, note: str = "") -> StepRecord:
        return self.run(name, [self.python, STEPS_PY, *args], limit_s, note=note)

    # -- results --------------------------------------------------------------------------------
    def pack(self) -> None:
        """steps.json, summary.md and the archive of gpu_kit/, each renamed into place when complete."""
        state = {"dry_run": self.dry, "device": self.device, "elapsed_s": round(time.monotonic() - self.start, 1),
                 "extension": self.extension, "steps": [asdict(r) for r in self.records]}
        _write_atomic(self.res / "steps.json", json.dumps(state, indent=2) + "\n")
        summary = self.summary()
        _write_atomic(self.res / SUMMARY, summary)
        _write_atomic(self.out / SUMMARY, summary)
        tmp = self.out / f".{ARCHIVE}.partial"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.res, arcname="gpu_kit")
        os.replace(tmp, self.out / ARCHIVE)

    def summary(self) -> str:
        lines = [f"# GPU kit ({'dry run on the CPU' if self.dry else 'GPU run'})", "",
                 "| step | status | rc | seconds | limit | note |", "|---|---|---|---|---|---|"]
        for r in self.records:
            lines.append(f"| {r.name} | {r.status} | {'' if r.rc is None else r.rc} | {r.seconds:.1f} | "
                         f"{r.limit_s:.0f} | {r.note} |")
        for name in ("preflight.txt", "tests_summary.txt", "segment.md", "sampler_shipped.md", "sampler_compile.md",
                     "sampler_paper.md", "ops.md"):
            p = self.res / name
            if p.is_file():
                lines += ["", f"## {name}", "", p.read_text().strip()]
        return "\n".join(lines) + "\n"


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- wheels ---------------------------------------------------------------------------------------
def repack_installed(dist_name: str, dest: Path) -> Path:
    """This interpreter's installed ``dist_name`` as a ``py3-none-any`` wheel (with a fresh RECORD),
    so that the dry run installs a real wheel with the same pip command the GPU run uses."""
    dist = importlib.metadata.distribution(dist_name)
    root = Path(dist.locate_file(""))
    name = dist.metadata["Name"].replace("-", "_")
    info_dir = f"{name}-{dist.version}.dist-info"
    wheel = dest / f"{name}-{dist.version}-py3-none-any.whl"
    record, entries = None, []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files or []:
            rel = str(f)
            if rel.startswith("..") or "__pycache__" in rel or not (root / rel).is_file():
                continue
            if rel.endswith(".dist-info/RECORD"):
                record = rel
                continue
            data = (root / rel).read_bytes()
            z.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            entries.append(f"{rel},sha256={digest},{len(data)}")
        record = record or f"{info_dir}/RECORD"
        z.writestr(record, "\n".join([*entries, f"{record},,"]) + "\n")
    return wheel


# -- steps ------------------------------------------------------------------------------------------
def preflight(kit: Kit) -> None:
    """Facts, the carried wheels, then every import the run needs (before and after the install)."""
    kit.helper("facts", "facts", limit_s=30)
    kit.helper("imports_before", "imports", ",".join(REQUIRED), ",".join(OPTIONAL), limit_s=60,
               note="what this environment has before the carried wheels")
    wheels = kit.wheels
    if kit.dry:  # this interpreter's own copies, repacked: the GPU run's wheels are for Python 3.12
        wheels = kit.tmp / "wheels"
        wheels.mkdir()
        for name in CARRIED:
            repack_installed(name, wheels)
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if found:
        kit.run("wheels", [kit.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(kit.site), *map(str, found)], 120,
                note=", ".join(p.name for p in found))
    else:
        kit.skip("wheels", f"no wheels in {wheels}: missing packages stay missing")
    rec = kit.helper("preflight", "imports", ",".join(REQUIRED), ",".join(OPTIONAL), "--table",
                     str(kit.res / "preflight.txt"), limit_s=60, note="after the wheels: a missing REQUIRED fails")
    if rec.status != "ok":
        print((kit.res / "preflight.txt").read_text() if (kit.res / "preflight.txt").is_file() else "", flush=True)


SYSTEM_CXX = ("/usr/bin/gcc", "/usr/bin/g++")  # the compiler whose libstdc++ torch's wheel was linked against


def build(kit: Kit) -> None:
    """sm_90 only, in parallel; then the registration and error-path checks. A library that crashes
    when an op reports an error is rebuilt once with the system compiler; without a working library
    the run goes on with the plain ops."""
    expected = "CPU,Meta" if kit.dry else "CPU,CUDA,Meta"
    if kit.dry:
        kit.skip("build", "CUDA-only: the dry run checks the CPU library scripts/setup.sh built")
    elif not _build_once(kit, "build", {}):
        return
    rec = kit.helper("registration", "registration", expected, limit_s=60)
    if rec.status != "ok":
        _drop_extension(kit, "kernels not registered")
        return
    devices = "cpu" if kit.dry else "cpu,cuda"
    if kit.helper("error_path", "error-path", devices, limit_s=60).status == "ok":
        return
    cc, cxx = SYSTEM_CXX
    if kit.dry or not Path(cxx).is_file():
        _drop_extension(kit, "an op's error crashed or was not raised")
        return
    shutil.rmtree(REPO / "build", ignore_errors=True)  # every object again, with the other compiler
    if _build_once(kit, "build_system_cxx", {"CC": cc, "CXX": cxx}, note=f"CC={cc} CXX={cxx}"):
        ok = kit.helper("registration_system_cxx", "registration", expected, limit_s=60).status == "ok"
        if not (ok and kit.helper("error_path_system_cxx", "error-path", devices, limit_s=60).status == "ok"):
            _drop_extension(kit, "an op's error crashed with both compilers")


def _build_once(kit: Kit, name: str, extra_env: dict[str, str], note: str = "") -> bool:
    env = dict(kit.env, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=str(os.cpu_count() or 8),
               PATH=os.pathsep.join([str(Path(kit.python).parent), os.environ.get("PATH", "")]), **extra_env)  # ninja
    include = subprocess.run([kit.python, STEPS_PY, "cuda-includes"], capture_output=True, text=True, env=kit.env,
                             cwd=REPO).stdout.strip()
    env["CPATH"] = os.pathsep.join(p for p in [include, os.environ.get("CPATH", "")] if p)
    rec = kit.run(name, [kit.python, "setup.py", "build_ext", "--inplace"], 150, env=env, note=note)
    if rec.status != "ok":
        print((kit.res / rec.log).read_text()[-3000:] if rec.log else "", flush=True)
        _drop_extension(kit, f"{name} {rec.status}")
    return rec.status == "ok"


def _drop_extension(kit: Kit, why: str) -> None:
    """Later steps run without the extension rather than hit NotImplementedError in a half build."""
    kit.extension = False
    kit.env["CDAL_FAST_NO_EXTENSION"] = "1"  # else the op loader would compile the sources on first use
    if not kit.dry:
        for lib in (REPO / "cdal_fast").glob("_C*.so"):
            lib.unlink()
    kit.records[-1].note += f"; running on without the C++ ops ({why})"
    kit.pack()


CRASH_FRAME = re.compile(r'File "[^"]*/(tests/test_\w+\.py)", line \d+ in (test_\w+)')
MAX_CRASH_RERUNS = 3  # a crashing test is deselected and the rest rerun, at most this often


def crashed_test(log_text: str) -> str | None:
    """The pytest node id (``tests/FILE.py::TEST``) that was running when the interpreter died, read
    from faulthandler's traceback (pytest enables it), or None."""
    match = CRASH_FRAME.search(log_text)
    return f"{match.group(1)}::{match.group(2)}" if match else None


def tests(kit: Kit) -> None:
    """The GPU tests; a test that kills the interpreter (a segfault in a kernel or its glue) is
    recorded, traced with cuda-gdb where the image has it, deselected, and the rest run again, so one
    crash does not hide every other result."""
    files = ["tests/test_cuda.py", "tests/test_graphs.py", "tests/test_builders.py"]
    if not kit.dry:
        files += ["tests/test_ops.py", "tests/test_fir.py", "tests/test_sampler.py"]
    base = [kit.python, "-m", "pytest", "-rfE", "-p", "no:cacheprovider", *files, "-k", "not cmake and not nvcc"]
    crashed: list[str] = []
    summary: list[str] = []
    for attempt in range(MAX_CRASH_RERUNS + 1):
        name = "tests" if attempt == 0 else f"tests_rerun{attempt}"
        rec = kit.run(name, [*base, *(f"--deselect={c}" for c in crashed)], 75,
                      note=f"deselected after crashing: {', '.join(crashed)}" if crashed else "")
        text = (kit.res / rec.log).read_text() if rec.log else ""
        tail = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))] + text.splitlines()[-1:]
        summary += [f"{name}: pytest rc={rec.rc} ({rec.status})", *tail]
        node = crashed_test(text) if rec.rc is not None and rec.rc < 0 else None
        if node is None or node in crashed:
            break
        crashed.append(node)
        summary.append(f"CRASHED (signal {-rec.rc}): {node}")
        _trace_crash(kit, node, len(crashed))
    _write_atomic(kit.res / "tests_summary.txt", "\n".join(summary) + "\n")


def _trace_crash(kit: Kit, node: str, n: int) -> None:
    """A native backtrace of the crashing test (cuda-gdb debugs host code too; the image has no gdb)."""
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if debugger is None or kit.dry:
        kit.skip(f"crash{n}_backtrace", "no debugger here" if debugger is None else "not in the dry run")
        return
    kit.run(f"crash{n}_backtrace", [debugger, "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
                                    "--args", kit.python, "-m", "pytest", "-x", "-p", "no:cacheprovider", node], 60)


def bench(kit: Kit, name: str, limit_s: float, real: list[str], dry: list[str]) -> None:
    cmd = [kit.python, "bench/sampler_backends.py", "--device", kit.device, "--out", str(kit.res), "--name",
           f"sampler_{name}", *(dry if kit.dry else real)]
    kit.run(f"bench_{name}", cmd, limit_s)


def segment(kit: Kit) -> None:
    """The bundled sample with eager float32 (the reference) and the fast path; a 2000x2000 slide at
    0.25 um/px with the fast path, then eager; masks compared, sampler seconds read from the JSON."""
    seg = kit.tmp / "seg"
    slide = kit.tmp / "mosaic.ome.tif"
    side = DRY_SLIDE_SIDE if kit.dry else SLIDE_SIDE
    kit.helper("slide", "slide", SAMPLE, str(slide), str(side), str(SLIDE_MPP), limit_s=30)
    weights: list[str] = []
    if kit.dry:
        kit.helper("tiny_weights", "tiny-weights", str(kit.tmp / "tiny" / "tiny"), limit_s=30)
        weights = ["--weights", str(kit.tmp / "tiny" / "tiny")]
    fast = ["--backend", "eager", "--dtype", "bfloat16"] if kit.dry else ["--backend", "graphs", "--dtype", "bfloat16"]
    ref = ["--backend", "eager", "--dtype", "float32"]
    runs = [("sample_ref", SAMPLE, ref), ("sample_fast", SAMPLE, fast), ("slide_fast", str(slide), fast),
            ("slide_ref", str(slide), ref), ("slide_fast_b32", str(slide), [*fast, "--batch-size", "32"])]
    for name, path, args in runs:
        cmd = [kit.python, "-m", "cdal_fast.cli", "segment", path, "--out", str(seg / name), "--device", kit.device,
               "-q", *weights, *args]
        kit.run(f"segment_{name}", cmd, 35)
    kit.helper("segment_report", "segment-report", str(seg), str(kit.res / "segment"), limit_s=30)


def ops(kit: Kit) -> None:
    if not kit.extension:
        kit.skip("ops", "the C++ ops are not available")
        return
    args = ["--device", "cpu", "--dtype", "float32", "--min-time", "0.02"] if kit.dry else [
        "--device", "cuda", "--dtype", "bfloat16", "--min-time", "0.3"]
    kit.run("ops", [kit.python, "bench/ops_cpu.py", *args, "--out", str(kit.res), "--name", "ops"], 20)


def bench_shipped(kit: Kit) -> None:
    bench(kit, "shipped", 100, ["--presets", "shipped", "--batches", *SHIPPED_BATCHES, "--budget-s", "85"],
          ["--presets", "tiny", "--batches", "1", "2", "--variants", "eager_fp32", "eager_fp32_tta", "fused_bf16",
           "graphs_bf16", "--min-time", "0.05", "--max-iters", "3"])


def bench_compile(kit: Kit) -> None:
    if kit.dry:  # deliberately short: shows a timed-out step is recorded and the run goes on
        kit.run("bench_compile", [kit.python, "bench/sampler_backends.py", "--device", "cpu", "--presets", "tiny",
                                  "--batches", "1", "--variants", "compile_bf16", "--no-original", "--out",
                                  str(kit.res), "--name", "sampler_compile"], 3,
                note="3-s limit on purpose in the dry run", exact=True)
    else:  # 60 s was measured too short on an H200 (the whole sampler compiles for several minutes)
        bench(kit, "compile", COMPILE_LIMIT_S, ["--presets", "shipped", "--batches", "8", "--variants", "compile_bf16",
                                                "--no-original"], [])


def bench_paper(kit: Kit) -> None:
    bench(kit, "paper", 40, ["--presets", "monuseg", "--batches", "1", "8", "64", "--variants", "eager_fp32",
                             "graphs_bf16", "graphs_bf16_cl", "eager_bf16", "--budget-s", "25"],
          ["--presets", "tiny", "--batches", "1", "--variants", "eager_fp32", "--min-time", "0.05", "--max-iters", "3"])


# The parts after preflight and build, most important first (a run cut short keeps the first ones).
PARTS: dict[str, Callable[[Kit], None]] = {"tests": tests, "bench_shipped": bench_shipped, "segment": segment,
                                          "bench_paper": bench_paper, "bench_compile": bench_compile, "ops": ops}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder ($OUT on the device machine)")
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels (default .whl/)")
    ap.add_argument("--deadline-s", type=float, default=None, help=f"whole run (default {DEADLINE_S:.0f} s; "
                                                                    f"dry run {DRY_DEADLINE_S:.0f} s)")
    ap.add_argument("--only", default="", help="comma-separated parts to run after preflight and build (a rerun of "
                                                 f"what a first call did not finish): {', '.join(PARTS)}")
    args = ap.parse_args(argv)
    deadline = args.deadline_s or (DRY_DEADLINE_S if args.dry_run else DEADLINE_S)
    kit = Kit(args.out, args.dry_run, args.wheels, deadline)
    chosen = set(args.only.split(",")) if args.only else set(PARTS)
    unknown = chosen - set(PARTS)
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    try:
        preflight(kit)
        build(kit)
        for part, run_part in PARTS.items():
            if part in chosen:
                run_part(kit)
    finally:
        kit.pack()
        print(kit.summary(), flush=True)
        shutil.rmtree(kit.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
