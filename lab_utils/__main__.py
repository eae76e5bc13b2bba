"""Command line: `python -m lab_utils demo`, `... train`, `... defaults ...` and `... dashboard [RUN_NAME] [--launch]`."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import LabError

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


def _parse_params(text: str) -> float:
    """Return a parameter count from '1.24e9', '1240000000', '1.24B' or '135M'."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a parameter count: got {text!r} — e.g. 1.24e9 or 1.24B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]
    return float(match.group(1)) * scale


def _parse_set(text: str) -> tuple[str, Any]:
    """Return (key, value) from KEY=VALUE, reading VALUE as JSON when it parses (8, true, "x")."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"--set needs KEY=VALUE: got {text!r} — e.g. --set per_device_train_batch_size=4"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _format_settings(settings: dict, hardware) -> str:
    """Return the readable (non-JSON) report of choose()'s result."""
    from .defaults import sft_kwargs
    from .memory import MemoryEstimate

    est = settings["estimate"]
    lines = [f"Training defaults for {hardware.name} ({hardware.memory_gib:.1f} GiB)", ""]
    for key, value in sft_kwargs(settings).items():
        lines.append(f"  {key:<30} {value}")
    lines.append(f"  {'attn_implementation':<30} {settings['attn_implementation']}  (model loading)")
    lines += ["", f"Estimated peak: {settings['estimated_peak_gib']:.2f} GiB", ""]
    lines.append(MemoryEstimate(**{k: v for k, v in est.items()}).table())
    lines += ["", "Why:"] + [f"  - {r}" for r in settings["reasons"]]
    if settings["warnings"]:
        lines += ["", "Warnings:"] + [f"  ! {w}" for w in settings["warnings"]]
    return "\n".join(lines)


def defaults_cli(argv: list[str] | None = None) -> int:
    """Run `python -m lab_utils defaults ...`; print the chosen settings and return the exit code."""
    from .defaults import choose
    from .hardware import KNOWN_GPU_NAMES, detect_hardware, hardware_from_name

    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["defaults"]:
        args_in = args_in[1:]
    parser = argparse.ArgumentParser(
        prog="python -m lab_utils defaults",
        description="Print the training settings that fit this GPU, with a memory estimate and the reasons.",
    )
    parser.add_argument("--gpu", default="auto", help=f"{', '.join(KNOWN_GPU_NAMES)} or auto (this machine)")
    parser.add_argument("--model-params", type=_parse_params, required=True, help="e.g. 1.24e9 or 1.24B")
    parser.add_argument("--max-length", type=int, required=True, help="tokens per row (SFTConfig max_length)")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument(
        "--effective-batch", type=int, default=16, help="micro-batch x accumulation (power of two)"
    )
    parser.add_argument("--hidden-size", type=int, help="default: derived from --model-params (Llama rule)")
    parser.add_argument("--num-layers", type=int, help="default: derived from --model-params (Llama rule)")
    parser.add_argument("--vocab-size", type=int, help="default: 128256 (Llama 3)")
    parser.add_argument(
        "--set",
        dest="user",
        action="append",
        type=_parse_set,
        default=[],
        metavar="KEY=VALUE",
        help="an explicit SFTConfig setting that wins, e.g. per_device_train_batch_size=8 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(args_in)
    try:
        hardware = detect_hardware() if args.gpu.strip().lower() == "auto" else hardware_from_name(args.gpu)
        settings = choose(
            hardware,
            model_params=args.model_params,
            max_length=args.max_length,
            lora_r=args.lora_r,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            vocab_size=args.vocab_size,
            target_effective_batch=args.effective_batch,
            user=dict(args.user),
        )
    except LabError as exc:
        print(f"✗ {exc}", file=sys.stderr)
        return 2
    print(json.dumps(settings, indent=2) if args.json else _format_settings(settings, hardware))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lab_utils {demo | train [--resume-from checkpoint-N] | defaults [--gpu T4 --model-params 1.24e9 --max-length 2048 --json]"
              " | dashboard [RUN_NAME] [--launch]}")
        return 0
    if argv[0] == "demo":
        return demo()
    if argv[0] == "train":  # also under torchrun / accelerate launch (lab_utils.train_command)
        from .train_command import main as train

        return train(argv[1:])
    if argv[0] == "defaults":
        return defaults_cli(argv[1:])
    if argv[0] == "dashboard":
        from .tracking import cli

        return cli(argv[1:])
    print(f"✗ unknown command {argv[0]!r} — use demo, train, defaults or dashboard", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
