"""Copy trained weights into the package as a shipped model, in files of at most 16 MiB.

    python scripts/ship_model.py runs/cxr_cpu/best cxr

Training writes one float16 file; the package's size rule (16 MiB per file, 32 MiB per model)
needs the larger presets (cxr: 8.8 M parameters, 17.7 MB) split into ``NAME.partN`` shards.
Float16 -> float32 -> float16 is exact, so the shipped tensors equal the trained ones bit for bit.
"""

from __future__ import annotations

import argparse

import torch

from cdal_fast.models import MAX_FILE_BYTES, MODEL_DIR, SHIPPED
from cdal_fast.weights import load_weights, save_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", help="trained weights (NAME, NAME.safetensors or NAME.json)")
    ap.add_argument("model", choices=sorted(SHIPPED), help="the shipped model to replace")
    args = ap.parse_args()
    bundle = load_weights(args.weights)
    st, js = save_weights(MODEL_DIR / args.model, bundle.generator, provenance=bundle.provenance,
                          dtype=torch.float16, max_file_bytes=MAX_FILE_BYTES)
    check = load_weights(js)
    for (name, a), b in zip(bundle.generator.state_dict().items(), check.generator.state_dict().values()):
        assert torch.equal(a, b), name
    print(f"shipped {args.model} ({SHIPPED[args.model]}): {js}")


if __name__ == "__main__":
    main()
