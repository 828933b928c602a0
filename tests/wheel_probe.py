"""Run by tests/test_wheel.py with the interpreter of a core-only install: prints one JSON line.

It imports every module of the installed cdal_fast, then uses each optional feature through the
CLI, as a user would, on inputs the test made (``INPUTS``), and records what the user reads. It
imports nothing outside the standard library, cdal_fast and the core's click, so it runs in the
install under test; the test asserts on its output.

    python wheel_probe.py INPUTS OUT
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path

SAMPLE = "<the bundled sample>"
# extra -> the segment arguments that need it (the input first: a file name in INPUTS, or SAMPLE)
FEATURES: dict[str, list[str]] = {
    "codecs": ["jpeg_tiles.ome.tif"],
    "openslide": ["scan.ndpi"],
    "dicom": ["dicom_slide"],
    "nifti": ["scan.nii.gz", "--model", "hippocampus"],
    "ray": [SAMPLE, "--ray", "local"],
    "parquet": [SAMPLE, "--nuclei-parquet"],
}


def main(inputs: Path, out: Path) -> dict:
    from click.testing import CliRunner

    import cdal_fast
    from cdal_fast.cli import main as cli

    result: dict = {"package": cdal_fast.__file__, "imported": [], "failed": {}, "features": {}}
    for info in pkgutil.walk_packages(cdal_fast.__path__, "cdal_fast."):
        try:
            importlib.import_module(info.name)
            result["imported"].append(info.name)
        except Exception as exc:  # the test reports which module and why
            result["failed"][info.name] = f"{type(exc).__name__}: {exc}"
    sample = Path(cdal_fast.__file__).parent / "samples" / "sample_ihc.ome.tif"
    for extra, args in FEATURES.items():
        first = sample if args[0] == SAMPLE else inputs / args[0]
        argv = ["segment", str(first), *args[1:], "--backend", "eager", "--out", str(out / extra)]
        res = CliRunner().invoke(cli, argv)
        result["features"][extra] = {"exit_code": res.exit_code, "output": res.output[-2000:]}
    return result


if __name__ == "__main__":
    print("PROBE " + json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
