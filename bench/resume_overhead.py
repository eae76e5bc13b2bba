"""Resume overhead: seconds from starting 02_train to its first optimizer step, cold vs resumed.

Runs the notebooks as scripts (as a user would) on the embedded default in a temporary LAB_ROOT:
00_setup and 01_data once, then 02_train from scratch (cold start), then 02_train again after the
newest checkpoint and the adapter are removed, so it resumes from the one before. The first
optimizer step is the first logged loss (logging_steps=1): the live view's `step 1/N · loss` line, or
transformers' own `{'loss': …}` when the view is off. Prints the two times and their
ratio and writes bench/results/resume_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = HERE.parent / "notebooks"
CONFIG = """run_name: resume-bench
data: {{limit: {limit}}}
model: {{max_length: {max_length}}}
train: {{max_steps: {steps}, save_steps: {save}, logging_steps: 1, learning_rate: 1.0e-3}}
"""


# the first logged optimizer step, as the live view prints it in a script or as transformers does
_FIRST_STEP = re.compile(r"^step \d+/\d+ · loss \d|'loss'")


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
        if first is None and _FIRST_STEP.search(line):
            first = time.monotonic() - t0
    proc.wait()
    if proc.returncode != 0 or first is None:
        raise SystemExit("02_train failed:\n" + "".join(out[-40:]))
    return first, "".join(out)


def main(argv: list[str] | None = None) -> int:
    """Time cold start and resume of 02_train; write results/resume_overhead.json (or --out)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400, help="data.limit")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="train.max_steps; checkpoints at half and at the end")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for resume_overhead.json")
    a = p.parse_args(argv)
    save = a.steps // 2
    work = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    (work / "lab.yml").write_text(CONFIG.format(limit=a.rows, max_length=a.max_length, steps=a.steps, save=save))
    env = {**os.environ, "LAB_ROOT": str(work / "runs"), "LAB_CONFIG": str(work / "lab.yml"), "PYTHONUNBUFFERED": "1"}
    env.pop("LAB_RUN_NAME", None)
    for name in ("00_setup", "01_data"):
        proc = subprocess.run([sys.executable, str(NOTEBOOKS / f"{name}.py")], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    cold, _ = _time_to_first_step(env)
    run = work / "runs" / "resume-bench"
    shutil.rmtree(run / "checkpoints" / f"checkpoint-{a.steps}")
    shutil.rmtree(run / "adapter")
    resumed, out = _time_to_first_step(env)
    if f"Resuming from checkpoint-{save}" not in out:
        raise SystemExit(f"02_train did not resume from checkpoint-{save}:\n" + out[-2000:])
    result = {
        "cold_start_to_first_step_s": round(cold, 2),
        "resume_to_first_new_step_s": round(resumed, 2),
        "resume_over_cold_ratio": round(resumed / cold, 3),
        "sizes": {"rows": a.rows, "max_length": a.max_length, "max_steps": a.steps, "resumed_from_step": save},
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "resume_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
