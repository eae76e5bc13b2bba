"""DDP on CPU: training speed of `torchrun --nproc_per_node 2 -m lab_utils train` over one process, same effective batch.

Prepares one run on the embedded default (data once), then trains copies of it from scratch with 1
and with 2 processes, alternating, `--repeats` times each. Speed is the Trainer's own
train_steps_per_second (start-up excluded) and the trained tokens per second; with the same
effective batch both runs do the same work per step. Prints the medians, their ratio and the load
average (other work on the machine shares its cores), and writes bench/results/ddp_speedup.json.
Each process runs one thread (OMP_NUM_THREADS=1), so 2 processes can use at most 2 cores: 2× is the
ceiling. ~3 min on 2 cores at the defaults (30 steps of 16 rows, max_length 256, 2 repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = """run_name: ddp-bench
data: {{limit: {limit}}}
model: {{max_length: {max_length}}}
train: {{max_steps: {steps}, save_steps: {steps}, eval_steps: {steps}, logging_steps: 1, learning_rate: 1.0e-3,
         report_to: none}}
"""


def _train(root: Path, config: Path, processes: int) -> dict:
    """Train the run in root with `processes` processes; return the Trainer's summary (runtime, steps/s, tokens)."""
    env = {**os.environ, "LAB_ROOT": str(root), "LAB_CONFIG": str(config), "LAB_LIVE": "off", "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    proc = subprocess.run([*cmd, "-m", "lab_utils", "train"], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{processes}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    history = json.loads((root / "ddp-bench" / "log_history.json").read_text())
    summary = next(h for h in reversed(history) if "train_runtime" in h)
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    return {"seconds": summary["train_runtime"], "steps_per_s": summary["train_steps_per_second"],
            "tokens_per_s": tokens / summary["train_runtime"] if tokens else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    config = tmp / "lab.yml"
    config.write_text(CONFIG.format(limit=args.limit, max_length=args.max_length, steps=args.steps))
    base = tmp / "base"
    env = {**os.environ, "LAB_ROOT": str(base), "LAB_CONFIG": str(config)}
    subprocess.run([sys.executable, "-c", "import lab_utils as lab; r = lab.start(); "
                    "lab.prepare_data(r, lab.load_tokenizer(r.cfg))"], env=env, check=True, capture_output=True)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    loads = []
    for i in range(args.repeats):
        for n in (1, 2):
            root = tmp / f"n{n}-{i}"
            shutil.copytree(base, root)
            loads.append(os.getloadavg()[0])
            runs[n].append(_train(root, config, n))
            print(f"{n} process(es), repeat {i + 1}: {runs[n][-1]}", flush=True)
    med = {n: statistics.median(r["steps_per_s"] for r in rs) for n, rs in runs.items()}
    result = {
        "steps": args.steps, "rows": args.limit, "max_length": args.max_length, "repeats": args.repeats,
        "cores": os.cpu_count(), "load_average_during": round(statistics.mean(loads), 2),
        "steps_per_s_1": med[1], "steps_per_s_2": med[2], "speedup_2_over_1": round(med[2] / med[1], 3),
        "runs": runs, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = HERE / "results" / "ddp_speedup.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"2 processes over 1, same effective batch: {result['speedup_2_over_1']}× steps/s "
          f"(load average {result['load_average_during']} on {os.cpu_count()} cores) → {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
