"""Command line: `python -m lab_utils demo`, `... defaults ...` and `... dashboard [RUN_NAME] [--launch]`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

NOTEBOOKS = ("00_setup", "01_data", "02_train", "03_evaluate", "04_export")


def _notebooks_dir() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / "notebooks" / "00_setup.py").exists():
            return base / "notebooks"
    raise SystemExit("✗ notebooks/ not found — run `make demo` from the repository root")


def summary_lines(metrics: dict) -> list[str]:
    """Return the demo summary's lines: loss, each task metric for base → tuned beside the constant guess, the verdict."""
    from .evaluation import primary_keys, verdict

    base, tuned = metrics["base"], metrics["tuned"]
    guess = metrics.get("baseline") or {}
    lines = [f"Validation loss:  base {base['loss']:.3f} → tuned {tuned['loss']:.3f} ({tuned['loss'] / base['loss']:.2f}×)"]
    for k in [k for k in base if k not in ("loss", "perplexity") and isinstance(base[k], (int, float))]:
        line = f"base {base[k]:.3f} → tuned {tuned[k]:.3f}"
        if k in primary_keys([k]) and isinstance(guess.get(k), (int, float)):  # not for the share that parsed
            line += f"   (baseline {guess[k]:.3f}: always answering {guess['answer']!r})"
        lines.append(f"{k + ':':<18}{line}")
    lines.append(f"Verdict:          {verdict(metrics)}")
    return lines


def run_notebooks(names: tuple[str, ...] = NOTEBOOKS, stats: dict[str, dict] | None = None) -> int:
    """Run notebooks as scripts in order; return the first non-zero exit, else 0.

    `stats`, when given, gets each notebook's seconds and peak resident memory (its process's ru_maxrss).
    """
    folder = _notebooks_dir()
    for name in names:
        print(f"\n━━━ {name} ━━━", flush=True)
        t = time.monotonic()
        child = subprocess.Popen([sys.executable, str(folder / f"{name}.py")])
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            child.kill()
            raise
        child.returncode = rc = os.waitstatus_to_exitcode(status)
        if rc != 0:
            print(f"✗ {name} failed (exit {rc}); see its output above", file=sys.stderr)
            return rc
        if stats is not None:  # ru_maxrss is in KiB on Linux
            stats[name] = {"seconds": time.monotonic() - t, "peak_rss_gib": usage.ru_maxrss / 2**20}
        print(f"✓ {name} done in {time.monotonic() - t:.0f} s", flush=True)
    return 0


def demo() -> int:
    """Run the five notebooks as scripts on the embedded default, then print a summary."""
    # one absolute runs folder for every notebook (`make demo` passes ./runs): no child can read it otherwise
    os.environ["LAB_ROOT"] = os.path.abspath(Path(os.environ.get("LAB_ROOT") or "runs").expanduser())
    os.environ["PYTHONUNBUFFERED"] = "1"
    t0 = time.monotonic()
    rc = run_notebooks()
    if rc != 0:
        return rc
    from .config import resolve_config

    cfg = resolve_config()
    run_dir = Path(os.environ["LAB_ROOT"]) / cfg["run_name"]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    print("\n━━━ Summary ━━━")
    print(f"Run folder:       {run_dir}")
    print("\n".join(summary_lines(metrics)))
    print(f"Elapsed:          {(time.monotonic() - t0) / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lab_utils {demo | defaults [--gpu T4 --model-params 1.24e9 --max-length 2048 --json]"
              " | dashboard [RUN_NAME] [--launch]}")
        return 0
    if argv[0] == "demo":
        return demo()
    if argv[0] == "defaults":
        from .defaults import cli

        return cli(argv[1:])
    if argv[0] == "dashboard":
        from .tracking import cli

        return cli(argv[1:])
    print(f"✗ unknown command {argv[0]!r} — use demo, defaults or dashboard", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
