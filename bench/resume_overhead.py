"""Resume overhead: seconds from starting 02_train to its first optimizer step, cold vs resumed.

Runs the notebooks as scripts (as a user would) on the embedded default in a temporary LAB_ROOT:
00_setup and 01_data once, then 02_train from scratch (cold start), then 02_train again after the
newest checkpoint and the adapter are removed, so it resumes from the one before. The first
optimizer step is the first `'loss'` log line (logging_steps=1). Prints the two times and their
ratio and writes bench/results/resume_overhead.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = HERE.parent / "notebooks"
CONFIG = """run_name: resume-bench
data: {limit: 400}
model: {max_length: 128}
train: {max_steps: 40, save_steps: 20, logging_steps: 1, learning_rate: 1.0e-3}
"""


def _time_to_first_step(env: dict) -> tuple[float, str]:
    """Run 02_train, return (seconds from launch to the first logged optimizer step, full output)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(NOTEBOOKS / "02_train.py")], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    first = None
    out = []
    for line in proc.stdout:
        out.append(line)
        if first is None and "'loss'" in line:
            first = time.monotonic() - t0
    proc.wait()
    if proc.returncode != 0 or first is None:
        raise SystemExit("02_train failed:\n" + "".join(out[-40:]))
    return first, "".join(out)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    (work / "lab.yml").write_text(CONFIG)
    env = {**os.environ, "LAB_ROOT": str(work / "runs"), "LAB_CONFIG": str(work / "lab.yml"), "PYTHONUNBUFFERED": "1"}
    for name in ("00_setup", "01_data"):
        subprocess.run([sys.executable, str(NOTEBOOKS / f"{name}.py")], env=env, check=True, capture_output=True)
    cold, _ = _time_to_first_step(env)
    run = work / "runs" / "resume-bench"
    shutil.rmtree(run / "checkpoints" / "checkpoint-40")
    shutil.rmtree(run / "adapter")
    resumed, out = _time_to_first_step(env)
    if "Resuming from checkpoint-20" not in out:
        raise SystemExit("02_train did not resume from checkpoint-20:\n" + out[-2000:])
    result = {
        "cold_start_to_first_step_s": round(cold, 2),
        "resume_to_first_new_step_s": round(resumed, 2),
        "resume_over_cold_ratio": round(resumed / cold, 3),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "resume_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
