"""`python -m lab_utils train`: what 02_train does, as one command — in one process, or several under a launcher.

    python -m lab_utils train                                     # one process: exactly 02_train
    torchrun --nproc_per_node N -m lab_utils train                # N processes (GPUs, or CPU over gloo)
    accelerate launch --num_processes N -m lab_utils train        # N GPUs with DDP
    accelerate launch --config_file accelerate/fsdp_qlora.yaml -m lab_utils train   # FSDP-QLoRA

It reads LAB_ROOT, LAB_CONFIG, LAB_RUN_NAME and LAB_PROFILE as the notebooks do (the run set up in
00_setup when none is named), calls the functions 02_train calls in the same order, and prepares the
data first when 01_data has not. With several processes the main one checks and writes; the others
wait for it, then train beside it (lab_utils.distributed).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from . import distributed as dist

if TYPE_CHECKING:
    from .training import TrainPlan

__all__ = ["prepared_data", "main"]

USAGE = "usage: python -m lab_utils train [--resume-from checkpoint-N]   (also under torchrun / accelerate launch)"


def prepared_data(run, tokenizer):
    """Return the run's processed data; prepare it first, as 01_data does, when 01_data has not."""
    from .data import load_prepared, prepare

    if not ((run.data_dir / "dataset").exists() and run.data_report_path.exists()):
        print("No processed data yet (01_data has not run here): preparing it as 01_data does")
        return prepare(run, tokenizer)
    return load_prepared(run, tokenizer)


def _check_fsdp(run, settings: TrainPlan) -> None:
    """LabError naming what to change when this launch is FSDP and the combination would not train QLoRA."""
    from .errors import LabError
    from .hardware import detect_hardware

    problems = dist.fsdp_problems(run.cfg, settings.sft, bf16=detect_hardware().bf16)
    if problems:
        more = f" (and {len(problems) - 1} more: fix this one and launch again)" if len(problems) > 1 else ""
        raise LabError(f"FSDP-QLoRA: {problems[0]}{more}")


def _parse(argv: list[str]) -> str | None:
    """Return the --resume-from value (None: the newest checkpoint that verifies); SystemExit on anything else."""
    resume = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--resume-from" and args:
            resume = args.pop(0)
        elif arg.startswith("--resume-from="):
            resume = arg.split("=", 1)[1]
        else:
            print(f"✗ unknown argument {arg!r} — {USAGE}", file=sys.stderr)
            raise SystemExit(2)
    return resume


def main(argv: list[str] | None = None) -> int:
    """Train the run as 02_train does (several processes when a launcher started them); return the exit status."""
    resume_from = _parse(sys.argv[2:] if argv is None else argv)
    dist.init()
    dist.install_handler()  # after init: torch's own hook would buffer the error line and lose it at os._exit
    dist.quiet_replicas()
    import lab_utils as lab

    n = dist.world_size()
    print(f"Processes: {n}" + (" (process 0 writes the run folder; the others train beside it)" if n > 1 else ""))
    with dist.main_first():  # checks and writes by the main process; the others then read what it wrote
        run = lab.start("", create=False)
        path, why = lab.training_path()
        if path == "unsloth" and n > 1:
            path, why = "plain", "several processes: the plain path (unsloth trains on one GPU)"
        print(f"Training path: {why}")
        tokenizer = lab.load_tokenizer(run.cfg)
        dataset = prepared_data(run, tokenizer)
        settings = lab.train_settings(run)
        _check_fsdp(run, settings)
    model, tokenizer = lab.load_for_training(
        run.cfg, path,
        gradient_checkpointing=bool(settings.sft.get("gradient_checkpointing")),
        attn_implementation=settings.attn_implementation,
    )
    model.print_trainable_parameters()
    lab.show_table(lab.settings_table(run, settings, len(dataset["train"])), title="Training settings")
    for reason in settings.reasons:
        print("·", reason)
    lab.show_table(lab.memory_table(settings), title="Estimated peak memory")
    trainer, callback = lab.build_trainer(run, model, tokenizer, dataset, settings)
    plan = lab.plan_resume(run, trainer, callback, resume_from)
    result = lab.train(run, trainer, callback, plan, settings)
    lab.save_adapter(run, trainer, plan)
    print(f"{result.steps} steps; this session trained for {result.seconds / 60:.1f} min")
    if dist.is_main():
        lab.show_image(lab.plot_training(run))
    return 0
