"""QLoRA training with TRL's SFTTrainer: settings, the trainer, resume, and the final adapter.

The `train:` section passes straight through to `trl.SFTConfig`; hardware-dependent values
(micro-batch, accumulation, fp16/bf16, optimizer, gradient checkpointing) come from
`lab_utils.defaults` unless the config sets them. Checkpoints, resume and pruning follow
`lab_utils.checkpoints`.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import distributed as dist
from . import tracking
from .checkpoints import (
    HASH,
    CheckpointCallback,
    ResumePlan,
    RunLock,
    check_checkpoints_folder,
    choose_resume,
    file_digest,
    read_manifest,
    set_aside,
    tmp_path,
)
from .defaults import HARDWARE_KEYS  # noqa: F401 (the one list lives in defaults; re-exported for old imports)
from .errors import LabError, on_error_exit
from .files import write_json

__all__ = [
    "EXPLAIN",
    "TrainPlan",
    "train_settings",
    "settings_table",
    "build_trainer",
    "run_identity",
    "plan_resume",
    "train",
    "save_adapter",
    "TrainResult",
]

# One sentence per hyperparameter, shown beside its value in 02_train.
EXPLAIN = {
    "learning_rate": "Step size of each update; 2e-4 is the usual QLoRA rate (LoRA tolerates ~10× full fine-tuning's).",
    "num_train_epochs": "Passes over the training rows; 1–3 is typical, more over-fits small data.",
    "max_steps": "If > 0, stop after this many optimizer steps (overrides epochs).",
    "lr_scheduler_type": "Cosine: the rate decays smoothly to ~0, which steadies the last steps.",
    "warmup_steps": "Ramp the rate up over this share of steps (a value < 1 is a ratio) to avoid early spikes.",
    "weight_decay": "L2 pull of LoRA weights toward 0; 0 is fine for short runs.",
    "per_device_train_batch_size": "Rows per forward pass (micro-batch): as many as fit in GPU memory.",
    "gradient_accumulation_steps": "Micro-batches summed before each update, so effective batch = micro × this.",
    "gradient_checkpointing": "Recompute activations in the backward pass: ~30% slower, far less memory.",
    "optim": "Optimizer: paged 8-bit AdamW on GPU keeps optimizer state small; plain AdamW on CPU.",
    "fp16": "16-bit compute where the GPU lacks bf16 (a T4).",
    "bf16": "bfloat16 compute on GPUs that have it (A100, L4): fp16's speed without its overflow.",
    "train_sampling_strategy": "group_by_length batches rows of similar length, so little compute goes to padding.",
    "packing": "Pack several rows into each sequence (with per-row positions) so no compute goes to padding.",
    "packing_strategy": "bfd: best-fit-decreasing packing, rows are never split across sequences.",
    "padding_free": "Concatenate rows without any padding (needs flash-attention kernels).",
    "logging_steps": "Log the training loss every this many steps.",
    "report_to": "Experiment tracker: trackio keeps every logged step in the run's tracking/ folder (or tensorboard, wandb, none).",
    "save_steps": "Write a checkpoint every this many steps (plus every checkpoint.save_every_minutes).",
    "eval_steps": "Measure the validation loss every this many steps.",
    "save_total_limit": "Keep this many newest complete checkpoints (plus the best by validation loss).",
    "seed": "Fixes initialisation, dropout and data order, so a resumed run equals an uninterrupted one.",
    "max_length": "Longest row in tokens (model.max_length); longer rows were dropped or cut in 01_data.",
    "r": "LoRA rank: the width of the low-rank update; 16–64 is usual, higher learns more and costs more.",
    "lora_alpha": "LoRA scale (update × alpha/r); alpha = 2r is the common choice.",
    "lora_dropout": "Dropout on the LoRA input: a little regularisation for small datasets.",
    "target_modules": "Which layers get adapters; all-linear = every attention and MLP projection.",
}

def _model_params(cfg: dict) -> tuple[float, dict]:
    """Return (parameter count, {"shape": its ModelShape as a dict}) from the model's config.json, without weights.

    (1.24e9, {}) when the config cannot be read: a Llama-3.2-1B-sized guess, its widths by the Llama rule."""
    from transformers import AutoConfig

    from .memory import shape_from_config
    from .model import model_source

    try:
        mc = AutoConfig.from_pretrained(model_source(cfg), trust_remote_code=bool(cfg["model"].get("trust_remote_code")))
        shape = shape_from_config(mc)
    except Exception:
        return 1.24e9, {}
    return float(shape.params()), {"shape": asdict(shape)}


@dataclass
class TrainPlan:
    """What train_settings() decided for this run on this machine: SFTConfig arguments, model loading, estimate and why."""

    sft: dict[str, Any]  # trl.SFTConfig keyword arguments (the train: section with the hardware's choices filled in)
    attn_implementation: str | None  # for loading the model ("flash_attention_2" where packing was chosen)
    estimate: dict | None  # the MemoryEstimate of the chosen geometry, as a dict
    reasons: list[str] = field(default_factory=list)  # one line per decision
    warnings: list[str] = field(default_factory=list)  # one line per explicit setting that will not fit or work
    hardware: Any = None  # the lab_utils.hardware.Hardware it was planned for

    @property
    def estimated_peak_gib(self) -> float | None:
        """Return the estimated peak memory in GiB, or None without an estimate."""
        return (self.estimate or {}).get("total_gib")

    def with_sft(self, **changes: Any) -> TrainPlan:
        """Return a copy whose SFTConfig arguments have `changes` applied (the OOM back-off's smaller geometry)."""
        return replace(self, sft={**self.sft, **changes}, reasons=list(self.reasons))


def train_settings(run, dataset=None, hardware=None) -> TrainPlan:
    """Return the TrainPlan for this run on this machine: the resolved SFTConfig arguments, with estimate and reasons."""
    from . import defaults
    from .hardware import detect_hardware

    cfg = run.cfg
    hw = hardware or detect_hardware()
    params, real_shape = _model_params(cfg)
    stats = (run.data_report() or {}).get("length_stats")
    user = {k: v for k, v in cfg["train"].items() if k in HARDWARE_KEYS}
    chosen = defaults.choose(
        hw,
        model_params=params,
        max_length=int(cfg["model"]["max_length"]),
        lora_r=int(cfg["lora"].get("r", 32)),
        length_stats=stats,
        user=user,
        fsdp=dist.fsdp_enabled(),
        **real_shape,
    )
    sft = dict(cfg["train"])
    for k in HARDWARE_KEYS:
        if k in chosen and k not in user:
            sft[k] = chosen[k]
    kept = _keep_first_layout(run, sft, user)
    kept += _keep_effective_batch(run, sft, user)
    plan = TrainPlan(
        sft=sft,
        attn_implementation=cfg["train"].get("attn_implementation") or chosen.get("attn_implementation"),
        estimate=chosen.get("estimate"),
        reasons=[*chosen.get("reasons", []), *kept],
        warnings=[*chosen.get("warnings", []), *_cpu_warning(cfg, hw)],
        hardware=hw,
    )
    for w in plan.warnings:
        print(f"⚠ {w}")
    return plan


def _cpu_warning(cfg: dict, hw) -> list[str]:
    """Return the one plain line for a real model on a CPU: what CPU is for, and how the time will be shown."""
    from .embedded import is_embedded

    if getattr(hw, "kind", "cpu") != "cpu" or is_embedded(cfg["model"]["name"]):
        return []
    return ["training a real model on the CPU: fine for checking a run end to end, slow for real training "
            "(SmolLM2-135M took 4–12 s per step of 4 short rows on 2 cores; a 1B model is ~10× that) — the expected "
            "time is printed after the first micro-batches; for real runs use a GPU runtime (Colab: a T4)"]


def _keep_first_layout(run, settings: dict, user: dict) -> list[str]:
    """Keep the packing and sampling order the run's checkpoints were trained with (hardware chose them then).

    A reconnect may land on another GPU (T4 → A100) or a CPU runtime, whose own choice would change
    which rows form each batch; the run keeps its first choice, and a reason line says so.
    """
    from .checkpoints import read_manifest, scan_checkpoints

    complete, _ = scan_checkpoints(run.checkpoints_dir)
    if not complete or "packing" in user:
        return []
    ckpt = complete[-1][1]
    first = read_manifest(ckpt).get("identity", {})
    if "packing" not in first or bool(first["packing"]) == bool(settings.get("packing")):
        return []
    packing = bool(first["packing"])
    order = first.get("train_sampling_strategy") or ("random" if packing else "group_by_length")
    settings.update(packing=packing, padding_free=packing, train_sampling_strategy=order)
    if packing:
        settings["packing_strategy"] = "bfd"
    return [
        f"packing={packing}, train_sampling_strategy={order}: kept from {ckpt.name}, where this run was first "
        "trained on other hardware (the data order stays the same)"
    ]


def effective_batch(settings: dict, processes: int | None = None) -> int:
    """Return the rows per optimizer update: micro-batch × accumulation steps × processes (this launch's by default)."""
    n = dist.world_size() if processes is None else processes
    return int(settings.get("per_device_train_batch_size", 8)) * int(settings.get("gradient_accumulation_steps", 1)) * n


def _keep_effective_batch(run, settings: dict, user: dict) -> list[str]:
    """Split the run's effective batch over this launch's processes (accumulation adjusted); return the reason line.

    The run's effective batch is the newest checkpoint's, else what one process would use: a run started
    in a notebook continues under `torchrun` (and back) with the same updates.
    """
    from .checkpoints import read_manifest, scan_checkpoints

    complete, _ = scan_checkpoints(run.checkpoints_dir)
    saved = read_manifest(complete[-1][1]).get("identity", {}).get("effective_batch") if complete else None
    micro = int(settings.get("per_device_train_batch_size", 8))
    accum = int(settings.get("gradient_accumulation_steps", 1))
    target = int(saved) if isinstance(saved, int) and saved > 0 else micro * accum
    n = dist.world_size()
    fixed = "gradient_accumulation_steps" in user  # the config's own accumulation is never adjusted
    if micro * accum * n == target or (fixed and saved is None):
        return []
    micro, accum = dist.split_batch(target, n, micro, accum, micro_fixed="per_device_train_batch_size" in user,
                                    accumulation_fixed=fixed)
    settings.update(per_device_train_batch_size=micro, gradient_accumulation_steps=accum)
    where = f"{complete[-1][1].name}'s" if saved else "the run's"
    return [
        f"micro-batch {micro} × accumulation {accum} × {n} process{'es' if n > 1 else ''} = {target}: "
        f"{where} effective batch, kept for this process count"
    ]


def total_steps(settings: dict, n_rows: int) -> int:
    """Return the optimizer steps the Trainer will run (max_steps, or epochs × steps per epoch)."""
    if int(settings.get("max_steps", -1)) > 0:
        return int(settings["max_steps"])
    micro = int(settings.get("per_device_train_batch_size", 8))
    accum = int(settings.get("gradient_accumulation_steps", 1))
    batches = math.ceil(n_rows / (micro * dist.world_size()))  # each process takes its share of the rows
    per_epoch = max(batches // accum + int(batches % accum > 0), 1)
    return int(math.ceil(per_epoch * float(settings.get("num_train_epochs", 1))))


def settings_table(run, plan: TrainPlan, n_rows: int) -> list[dict[str, Any]]:
    """Return rows (setting, value, why) for the notebook: every hyperparameter with its one-line reason."""
    settings = plan.sft
    rows = []
    for key, value in settings.items():
        rows.append({"setting": f"train.{key}", "value": value, "why": EXPLAIN.get(key, "")})
    for key, value in run.cfg["lora"].items():
        rows.append({"setting": f"lora.{key}", "value": value, "why": EXPLAIN.get(key, "")})
    rows.append({"setting": "model.max_length", "value": run.cfg["model"]["max_length"], "why": EXPLAIN["max_length"]})
    eb = effective_batch(settings)
    why = "rows per optimizer update (micro × accumulation" + (f" × {dist.world_size()} processes)" if dist.is_distributed() else ")")
    rows.append({"setting": "effective batch", "value": eb, "why": why})
    rows.append({"setting": "total steps", "value": total_steps(settings, n_rows), "why": f"for {n_rows} training rows"})
    return rows


def run_identity(run, settings: dict, fingerprint: str | None) -> dict[str, Any]:
    """Return what a checkpoint must share with this run to be resumed (model, LoRA, data, batch...)."""
    lora = {k: run.cfg["lora"][k] for k in sorted(run.cfg["lora"])}
    return {
        "model": run.cfg["model"]["name"],
        "max_length": run.cfg["model"]["max_length"],
        "load_in_4bit": run.cfg["model"].get("load_in_4bit", True),
        "lora": lora,
        "data_fingerprint": fingerprint,
        "effective_batch": effective_batch(settings),
        "optim": settings.get("optim"),
        "packing": bool(settings.get("packing")),
        "train_sampling_strategy": settings.get("train_sampling_strategy"),
    }


def _data_fingerprint(run) -> str | None:
    return (run.data_report() or {}).get("fingerprint")


def session_start(history: list[dict], step: int) -> tuple[int, float, float]:
    """Return (step, sum of per-step training losses up to it, tokens trained up to it) from a run's log history.

    Each logged `loss` is the mean over the steps since the previous log; steps after the last log (a
    checkpoint between two logs) count at the last logged mean.
    """
    total, prev, last, tokens = 0.0, 0, None, 0.0
    for h in history:
        if h.get("step", 0) > step:
            break
        if "loss" in h:
            total += float(h["loss"]) * (h["step"] - prev)
            prev, last = h["step"], float(h["loss"])
        if "num_tokens" in h:
            tokens = float(h["num_tokens"])
    if last is not None and prev < step:
        total += last * (step - prev)
    return step, total, tokens


def set_sampler_epoch(dataloader, epoch: int) -> int:
    """Set `epoch` on every sampler below `dataloader`; return how many were set.

    Under several processes accelerate wraps the sampler as BatchSamplerShard(BatchSampler(sampler)), and
    after a mid-epoch resume skip_first_batches adds a SkipBatchSampler on top: neither accelerate's nor
    transformers' set_epoch reaches three levels down, so the resumed epoch replayed epoch 0's order.
    """
    from torch.utils.data import BatchSampler, Sampler

    done, seen, todo = 0, set(), [dataloader]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Sampler | BatchSampler) and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(int(epoch))
            done += 1
        todo += [getattr(obj, name, None) for name in ("batch_sampler", "sampler", "base_dataloader")]
    return done


def _trainer_class():
    """Return SFTTrainer with length grouping made resumable: each epoch's order depends on (seed, epoch) only."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        # transformers draws the grouped order from the global RNG, so a run resumed in its second
        # epoch would see another order than the uninterrupted run. The Trainer calls set_epoch().
        def __init__(self, *args, seed: int = 42, **kwargs):
            super().__init__(*args, **kwargs)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return super().__iter__()

    class LabSFTTrainer(SFTTrainer):
        # After a resume, transformers divides this session's loss sum by all steps (train_loss = mean × share)
        # and TRL counts num_tokens from zero: both are made the whole run's from the checkpoint's log history.
        lab_session: tuple[int, float, float] | None = None

        def training_step(self, *args, **kwargs):
            if self.lab_session is None:  # the first step in this process: the history holds what came before
                self.lab_session = session_start(self.state.log_history, self.state.global_step)
                if hasattr(self, "_total_train_tokens"):
                    self._total_train_tokens += self.lab_session[2]
            return super().training_step(*args, **kwargs)

        def log(self, logs, start_time=None):
            if "train_loss" in logs and self.lab_session and self.state.global_step:
                logs["train_loss"] += self.lab_session[1] / self.state.global_step
            super().log(logs, start_time)

        def _run_epoch(self, *args, **kwargs):
            # before the resumed epoch's skip; bound by name (transformers passes keywords, a patched loop may not)
            given = inspect.signature(super()._run_epoch).bind_partial(*args, **kwargs).arguments
            if "train_dataloader" in given and "epoch" in given:
                set_sampler_epoch(given["train_dataloader"], given["epoch"])
            return super()._run_epoch(*args, **kwargs)

        def create_model_card(self, *args, **kwargs):
            return None  # 04_export writes the run's card; TRL's checkpoints/README.md named its base "None"

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochSeededLengthGroupedSampler(
                    sampler.batch_size, lengths=sampler.lengths, seed=int(seed)
                )
            return sampler

        def _load_optimizer_and_scheduler(self, checkpoint):
            # Several CPU processes: transformers loads the optimizer state onto args.device, which accelerate
            # names 'cpu:0', a location torch.load cannot restore to. 'cpu' is the same memory.
            device = self.args.__dict__.get("_setup_devices")  # TrainingArguments.device's cached value
            if not (isinstance(device, torch.device) and device.type == "cpu" and device.index is not None):
                return super()._load_optimizer_and_scheduler(checkpoint)
            self.args.__dict__["_setup_devices"] = torch.device("cpu")
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                self.args.__dict__["_setup_devices"] = device

    return LabSFTTrainer


_LOCKS: dict[Path, RunLock] = {}  # run folder → the lock this process holds on it


def lock_run(run) -> None:
    """Take the run's trainer lock (once per process), or LabError naming the trainer that holds it."""
    if run.dir in _LOCKS or not dist.is_main():  # one lock per run, held by the process that writes
        return
    check_checkpoints_folder(run.checkpoints_dir)
    lock = RunLock(run.dir)
    note = lock.acquire()
    if note:
        print(note)
    if not _LOCKS:
        on_error_exit(_unlock_all)
    _LOCKS[run.dir] = lock


def _unlock_all() -> None:
    for folder in list(_LOCKS):
        _LOCKS.pop(folder).release()


def unlock_run(run) -> None:
    """Release the run's trainer lock if this process holds it."""
    lock = _LOCKS.pop(run.dir, None)
    if lock is not None:
        lock.release()


def build_trainer(run, model, tokenizer, dataset, plan: TrainPlan) -> tuple[Any, CheckpointCallback]:
    """Return (SFTTrainer wired to the run folder, its checkpoint callback); the run is locked: the Trainer writes there."""
    from trl import SFTConfig

    SFTTrainer = _trainer_class()
    lock_run(run)

    settings = plan.sft
    kwargs = dict(settings)
    if kwargs.pop("group_by_length", False):  # transformers 5 spelling of the old flag
        kwargs.setdefault("train_sampling_strategy", "group_by_length")
    keep = kwargs.pop("save_total_limit", 2)
    kwargs.setdefault("eval_steps", kwargs.get("save_steps"))
    kwargs = tracking.trainer_kwargs(run, kwargs)  # report_to checked; trackers write into the run folder
    kwargs.update(dist.trainer_kwargs(kwargs))  # several processes: gloo on CPU, quiet replicas, LoRA-only DDP
    has_val = "validation" in dataset and len(dataset["validation"]) > 0
    args = SFTConfig(
        output_dir=str(run.checkpoints_dir),
        max_length=int(run.cfg["model"]["max_length"]),
        save_strategy="steps",
        eval_strategy="steps" if has_val else "no",
        per_device_eval_batch_size=int(kwargs.get("per_device_train_batch_size", 8)),
        save_total_limit=None,  # pruning is ours: the Trainer's would delete the best and fill Drive's trash
        dataset_num_proc=None,
        **kwargs,
    )
    ck = run.cfg.get("checkpoint", {})
    from .evaluation import validation_sample
    from .model import loaded_base

    callback = CheckpointCallback(
        {**run_identity(run, settings, _data_fingerprint(run)), **loaded_base(model)},  # + path and base loaded
        save_every_minutes=ck.get("save_every_minutes", 20),
        keep=keep,
        min_free_gib=float(ck.get("min_free_gib", 0.5)),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        eval_dataset=validation_sample(run.cfg, dataset["validation"]) if has_val else None,  # 03's rows too
        processing_class=tokenizer,
        callbacks=[callback],
    )
    # TRL casts a quantized model's trainable (LoRA) weights to bf16, but the Trainer's resume reloads
    # them through PEFT, which upcasts to fp32: a resumed run would then differ from an uninterrupted
    # one. Keep the adapters in fp32 from the start (PEFT's own default; a T4 has no bf16 anyway).
    import torch

    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    _canonical_target_modules(trainer.model)
    tracking.attach(run, trainer)  # resumable trackio run + the live view
    return trainer, callback


def _canonical_target_modules(model) -> None:
    """Store target_modules sorted: PEFT keeps a set, whose order (and so adapter_config.json) varies between processes."""
    for pc in (getattr(model, "peft_config", None) or {}).values():
        tm = getattr(pc, "target_modules", None)
        if isinstance(tm, (set, frozenset, list, tuple)):
            pc.target_modules = sorted(tm)


def _adapter_is(run, ckpt: Path) -> bool:
    """Return True if run/adapter holds exactly the weights of checkpoint ckpt."""
    final = run.adapter_dir / "adapter_model.safetensors"
    source = ckpt / "adapter_model.safetensors"
    if not final.is_file() or not source.is_file() or final.stat().st_size != source.stat().st_size:
        return False
    want = (read_manifest(ckpt).get(HASH) or {}).get("adapter_model.safetensors") or file_digest(source)
    return file_digest(final) == want


def plan_resume(run, trainer, callback: CheckpointCallback, explicit: str | None = None) -> ResumePlan:
    """Return where training starts, printing the skipped folders and one line: resume or fresh start."""
    cb = callback
    try:
        plan = dist.from_main(lambda: choose_resume(run.checkpoints_dir, cb.identity, explicit))  # one choice for all
    except BaseException:
        unlock_run(run)
        raise
    for line in plan.skipped:
        print(line)
    n_rows = len(trainer.train_dataset)
    settings = {k: getattr(trainer.args, k) for k in ("max_steps", "num_train_epochs", "per_device_train_batch_size",
                                                       "gradient_accumulation_steps")}
    total = total_steps(settings, n_rows)
    cb.verified = plan.checkpoint
    if plan.checkpoint is not None and plan.step >= total:
        plan.finished, plan.in_the_way = True, []
        unlock_run(run)  # nothing will be trained
        grow = "raise train.max_steps (or num_train_epochs) to continue"
        if _adapter_is(run, plan.checkpoint):
            print(f"Run {run.name} is finished: adapter at {run.display(run.adapter_dir)}, step {plan.step} of {total} — {grow}")
        else:
            print(f"Run {run.name} reached step {plan.step} of {total} at {plan.checkpoint.name}; nothing to train, "
                  f"its adapter is saved from that checkpoint — {grow}")
    elif plan.checkpoint is None:
        print(f"{plan.message} {total} steps to run.")
    else:
        left = max(total - plan.step, 0)
        eta = f"about {left * plan.seconds_per_step / 60:.0f} min left" if plan.seconds_per_step else "time left unknown"
        print(f"Resuming from {plan.checkpoint.name} (step {plan.step} of {total}, {eta})")
    return plan


@dataclass
class TrainResult:
    """What a call to train() did."""

    steps: int
    seconds: float
    resumed_from: str | None
    train_loss: float | None


def _save_now(trainer, callback: CheckpointCallback) -> Path | None:
    """Save a full checkpoint of the current state (used when the user presses stop)."""
    step = trainer.state.global_step
    if step == 0:
        return None
    ckpt = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if ckpt.exists():
        return ckpt
    trainer._save_checkpoint(trainer.model, trial=None)
    callback.finalize(ckpt, trainer.state)
    return ckpt


def _rebuild_after_oom(run, trainer, plan: TrainPlan) -> tuple[Any, CheckpointCallback]:
    """Return (a new trainer on the same model and data with `plan`, its callback), keeping the user's extra callbacks."""
    from .hardware import free_memory

    extra = [
        cb
        for cb in trainer.callback_handler.callbacks
        if not type(cb).__module__.startswith("transformers") and not isinstance(cb, CheckpointCallback)
        and not getattr(cb, "lab_owned", False)
    ]
    model, tok = trainer.model, trainer.processing_class
    data = {"train": trainer.train_dataset}
    if trainer.eval_dataset is not None:
        data["validation"] = trainer.eval_dataset
    trainer.optimizer = trainer.lr_scheduler = None
    del trainer
    free_memory()
    new, callback = build_trainer(run, model, tok, data, plan)
    for cb in extra:
        new.add_callback(cb)
    return new, callback


def train(run, trainer, callback: CheckpointCallback, plan: ResumePlan, settings: TrainPlan) -> TrainResult:
    """Run (or continue) training; back off on CUDA out-of-memory; on the stop button save first. Return a TrainResult."""
    if plan.finished:
        return TrainResult(plan.step, 0.0, plan.checkpoint.name if plan.checkpoint else None, None)
    lock_run(run)  # again, when a first train() released it in this kernel
    try:
        return _train_locked(run, trainer, callback, plan, settings)
    finally:
        unlock_run(run)


def _move_out_of_the_way(run, plan: ResumePlan) -> None:
    """Move checkpoint folders past the resume point aside: the Trainer would write into them in place."""
    if not dist.is_main():
        plan.in_the_way = []
        return
    for old, new in zip(plan.in_the_way, set_aside(run.dir, plan.in_the_way), strict=True):
        print(f"Moved {old.name} aside → {run.display(new)} (training from step {plan.step} would write into it in place)")
    plan.in_the_way = []


def _train_locked(run, trainer, callback: CheckpointCallback, plan: ResumePlan, settings: TrainPlan) -> TrainResult:
    from . import defaults

    t0 = time.monotonic()
    while True:
        _move_out_of_the_way(run, plan)
        try:
            out = trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
            break
        except KeyboardInterrupt:
            ckpt = _save_now(trainer, callback)
            where = f"saved {ckpt.name} → {run.display(ckpt)}" if ckpt else "nothing to save yet"
            print(f"Stopped at step {trainer.state.global_step}: {where}. Run 02_train (or the same command) again to continue.")
            _write_log_history(run, trainer)
            raise
        except Exception as e:  # only CUDA out-of-memory is handled; everything else propagates
            if not defaults.is_oom(e):
                raise
            if dist.is_distributed():  # the processes cannot rebuild their trainers in step: say what to set
                micro = int(trainer.args.per_device_train_batch_size)
                raise LabError(
                    f"out of GPU memory at micro-batch {micro} in process {dist.rank()} — set "
                    f"train.per_device_train_batch_size: {max(micro // 2, 1)} in the config (the effective batch "
                    "is kept) and launch again: training continues from the last checkpoint"
                ) from None
            old = {k: getattr(trainer.args, k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                         "gradient_checkpointing")}
            smaller = defaults.backoff({**settings.sft, **old})
            if smaller is None:
                raise LabError(
                    "out of GPU memory even at micro-batch 1 with gradient checkpointing — lower model.max_length, "
                    "use a smaller model, or a GPU with more memory"
                ) from None
            print(
                f"Out of GPU memory at micro-batch {old['per_device_train_batch_size']}: continuing from the last "
                f"checkpoint with micro-batch {smaller['per_device_train_batch_size']} × accumulation "
                f"{smaller['gradient_accumulation_steps']} (same effective batch"
                f"{', gradient checkpointing on' if smaller.get('gradient_checkpointing') and not old['gradient_checkpointing'] else ''})."
            )
            geometry = {k: smaller[k] for k in old if k in smaller}
            settings = settings.with_sft(**geometry)
            trainer, callback = _rebuild_after_oom(run, trainer, settings)
            plan = plan_resume(run, trainer, callback)
    _write_log_history(run, trainer)
    if callback.stop_reason and dist.is_main():  # the others stopped with it: one line
        raise LabError(callback.stop_reason)
    loss = next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h),
                getattr(out, "training_loss", None))  # the whole run's, also after a resume (LabSFTTrainer.log)
    return TrainResult(trainer.state.global_step, time.monotonic() - t0, plan.checkpoint.name if plan.checkpoint else None, loss)


def _write_log_history(run, trainer) -> None:
    """Write the Trainer's loss history to run/log_history.json (atomically; the main process)."""
    if dist.is_main():
        write_json(run.dir / "log_history.json", trainer.state.log_history, indent=1)


def save_adapter(run, trainer, plan: ResumePlan | None = None) -> Path:
    """Save the final LoRA adapter and tokenizer to run/adapter atomically; return the folder.

    On a finished run (02_train run again) nothing is written when the adapter is already the last
    checkpoint's; when it is missing or another, it is saved from that checkpoint (nothing is trained).
    """
    out = run.adapter_dir
    if plan is not None and plan.finished and _adapter_is(run, plan.checkpoint):
        return out
    finished = plan is not None and plan.finished
    gathered = None if finished else _save_fsdp_adapter(trainer, out)  # under FSDP every process takes part
    if not dist.is_main():  # the main process writes the adapter
        return out
    tmp = gathered or tmp_path(out)
    try:
        if finished:
            tmp.mkdir()
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(plan.checkpoint / name, tmp / name)
        elif gathered is None:
            trainer.model.save_pretrained(str(tmp))
        trainer.processing_class.save_pretrained(str(tmp))
        if out.exists():
            old = tmp_path(out.with_name("adapter.old"))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    source = f" (from {plan.checkpoint.name})" if plan is not None and plan.finished else ""
    print(f"Saved adapter{source} → {run.display(out)}")
    return out


def _save_fsdp_adapter(trainer, out: Path) -> Path | None:
    """Under FSDP, gather the LoRA weights whole (peft's FULL_STATE_DICT at the end) into one shared temporary
    folder, written by the main process; return it (None without FSDP)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    folder = Path(dist.from_main(lambda: str(tmp_path(out))))  # one name for every process
    trainer.save_model(str(folder))  # every process gathers; the main one writes adapter_model.safetensors
    return folder


def memory_table(plan: TrainPlan) -> list[dict[str, Any]]:
    """Return the memory estimate's breakdown as table rows (part, GiB, what it counts)."""
    est = plan.estimate or {}
    notes = (est.get("assumptions") or {}).get("notes", {})
    rows = []
    for part in ("weights", "lora", "optimizer", "gradients", "activations", "overhead"):
        if f"{part}_gib" in est:
            rows.append({"part": part, "GiB": round(est[f"{part}_gib"], 2), "what": notes.get(part, "")})
    if "total_gib" in est:
        hw = plan.hardware
        cap = f" of {hw.memory_gib:.1f} GiB ({hw.name})" if hw is not None else ""
        rows.append({"part": "estimated peak", "GiB": round(est["total_gib"], 2), "what": cap.strip()})
    return rows
