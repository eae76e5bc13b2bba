"""What the content hash in a checkpoint manifest costs per save, on a 1B model's adapter + optimizer.

Writes random files of the real sizes of a Trainer checkpoint of a LoRA adapter on Llama-3.2-1B
(hidden 2048, 16 layers, MLP 8192, GQA 32/8 heads of 64; all-linear targets) in fp32 with AdamW's
two moment tensors, then times, in one run: writing them (with fsync), reading them back, and
hashing them (sha256, blake2b) with the streaming reader the manifest uses. Prints ratios.

    python bench/checkpoint_hash.py [--rank 32] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab_utils.checkpoints import file_digest  # noqa: E402
from lab_utils.files import write_text  # noqa: E402


def lora_params(rank: int, hidden: int = 2048, layers: int = 16, mlp: int = 8192, kv: int = 512) -> int:
    """Return the LoRA parameter count for all-linear targets (q, k, v, o, gate, up, down) of a Llama shape."""
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, mlp), (hidden, mlp), (mlp, hidden)]
    return layers * sum(rank * (i + o) for i, o in shapes)


def _write(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    results = []
    for rank in args.rank:
        n = lora_params(rank)
        sizes = {"adapter_model.safetensors": 4 * n, "optimizer.pt": 8 * n}
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            folder = Path(d)
            t0 = time.perf_counter()
            for name, size in sizes.items():
                _write(folder / name, size)
            write_s = time.perf_counter() - t0
            row = {"rank": rank, "params": n, "bytes": sum(sizes.values()), "write_fsync_s": round(write_s, 3)}
            for algo in ("sha256", "blake2b"):
                t0 = time.perf_counter()
                for name in sizes:
                    file_digest(folder / name, algo)
                row[f"{algo}_s"] = round(time.perf_counter() - t0, 3)
            row["sha256_vs_write"] = round(row["sha256_s"] / write_s, 2)
            row["blake2b_vs_sha256"] = round(row["blake2b_s"] / row["sha256_s"], 2)
            row["sha256_MBps"] = round(row["bytes"] / row["sha256_s"] / 1e6)
            results.append(row)
            print(json.dumps(row))
    note = f"one run; page cache warm (files just written), as in on_save; load average at start: {load:.1f}"
    print(note)
    out = Path(__file__).resolve().parent / "results" / "checkpoint_hash.json"
    write_text(out, json.dumps({"results": results, "note": note, "hashlib": hashlib.sha256().name}, indent=1) + "\n")


if __name__ == "__main__":
    main()
