"""Several processes, one run: who writes, who waits, and what every process must agree on.

Under `torchrun --nproc_per_node N -m lab_utils train` or `accelerate launch --num_processes N -m
lab_utils train` every process runs the same command; the launcher sets WORLD_SIZE, RANK and
LOCAL_RANK. The main process (rank 0) alone writes into the run folder (config, processed data,
checkpoint manifests, logs, tracking, the adapter, the lock); the others compute beside it and wait
at barriers where they need what it wrote. One decision that changes what the processes do next
(save now, stop now, resume from which checkpoint) is taken once and shared.

In one process (a notebook, `python -m lab_utils train`) every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = [
    "world_size",
    "rank",
    "local_rank",
    "is_distributed",
    "is_main",
    "init",
    "barrier",
    "main_first",
    "from_main",
    "agree_any",
    "quiet_replicas",
    "install_handler",
    "trainer_kwargs",
    "split_batch",
    "fsdp_enabled",
    "fsdp_problems",
    "quant_storage_dtype",
]

T = TypeVar("T")

# Long enough for the main process to prepare a large dataset while the others wait at a barrier.
SETUP_TIMEOUT = _dt.timedelta(hours=2)
# On a failed rank, how long the other ranks' error line waits: the launcher ends them first when the
# main process failed for the same reason, so one line is printed, not one per process.
REPLICA_GRACE_S = 5.0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def world_size() -> int:
    """Return the number of training processes the launcher started (1 without a launcher)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def rank() -> int:
    """Return this process's global rank (0 without a launcher)."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """Return this process's rank on its machine: the GPU it trains on (0 without a launcher)."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """Return True when a launcher started more than one process."""
    return world_size() > 1


def is_main() -> bool:
    """Return True in the process that writes the run folder (rank 0, or the only process)."""
    return rank() == 0


def _group_ready() -> bool:
    if not is_distributed():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _end_with_launcher() -> None:
    """On Linux, end this process when its launcher ends, even by SIGKILL (torchrun starts each worker in its own
    session, so a killed launcher would leave them training on, holding the run's lock)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher ended before the line above
        os._exit(1)


def init() -> None:
    """Join the launcher's process group (nccl on GPUs, gloo on CPU) through Accelerate; no-op in one process."""
    if not is_distributed() or _group_ready():
        return
    _end_with_launcher()
    from accelerate import PartialState

    from .hardware import cuda_available

    PartialState(cpu=not cuda_available(), timeout=SETUP_TIMEOUT)


def barrier() -> None:
    """Wait until every process reaches this point (no-op in one process)."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block in the main process first, then in the others (which then read what it wrote).

    When the main process fails inside the block, the others never start it: the launcher ends them,
    and the person reads one error line, not one per process.
    """
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(fn: Callable[[], T]) -> T:
    """Return fn()'s result computed in the main process and sent to the others (a choice made once)."""
    if not _group_ready():
        return fn()
    return _broadcast(fn() if is_main() else None)


def agree_any(*flags: bool) -> tuple[bool, ...]:
    """Return each flag OR-ed over all processes, so that every process saves or stops at the same step."""
    if not _group_ready():
        return tuple(bool(f) for f in flags)
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def quiet_replicas() -> None:
    """Silence the other processes' output (stdout, warnings, progress bars): each line is printed once, by the main process."""
    if is_main():
        return
    import warnings

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — for the life of the process
    warnings.simplefilter("ignore")
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _peer_failed(exc: BaseException) -> bool:
    """Return True for the error a process gets when another process of the run died (its line says why)."""
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(seen) < 8 and e not in seen:
        seen.append(e)
        name = type(e).__name__
        text = str(e)
        if name in ("DistBackendError", "DistNetworkError", "DistError") or (
            isinstance(e, RuntimeError)
            and any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                        "NCCL communicator was aborted", "Socket Timeout", "[Gloo]"))
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def install_handler() -> None:
    """errors.install_handler, made right for several processes: one ✗ line per failure, not one per process.

    A process that fails because another one died ends without a line (the launcher's summary and the
    first process's line say what happened); the non-main processes hold their line for a moment, so
    that when every process fails alike the launcher ends them before they print it again.
    """
    from . import errors

    errors.install_handler()
    if not is_distributed() or getattr(sys, "_lab_dist_hook", False):
        return
    sys._lab_dist_hook = True  # type: ignore[attr-defined]
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if _peer_failed(exc):
            errors._run_cleanups()
            os._exit(1)
        if not is_main() and issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C reaches every process: one line
            errors._run_cleanups()
            os._exit(130)
        if not is_main():
            time.sleep(REPLICA_GRACE_S)
            print(f"(process {rank()} of {world_size()})", file=sys.stderr)
        previous(exc_type, exc, tb)

    sys.excepthook = hook  # SIGTERM from the launcher keeps its default: a process blocked in a collective ends at once


def trainer_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Return the SFTConfig arguments several processes need: CPU ranks over gloo, replicas quiet, LoRA-only DDP."""
    if not is_distributed():
        return {}
    from .hardware import cuda_available

    out: dict[str, Any] = {"log_level_replica": "error"}
    if not cuda_available():
        out["use_cpu"] = True  # without it transformers stays NOT_PARALLEL on CPU (measured): N copies of one run
    if not fsdp_enabled():
        out["ddp_find_unused_parameters"] = False  # frozen base weights never get gradients: skip DDP's search
    if settings.get("gradient_checkpointing"):
        kwargs = dict(settings.get("gradient_checkpointing_kwargs") or {})
        kwargs.setdefault("use_reentrant", False)  # reentrant checkpointing breaks DDP and FSDP with LoRA
        out["gradient_checkpointing_kwargs"] = kwargs
    return out


def split_batch(target: int, processes: int, micro: int, accumulation: int, *, micro_fixed: bool = False,
                accumulation_fixed: bool = False) -> tuple[int, int]:
    """Return (micro-batch, accumulation) with micro × accumulation × processes == target: accumulation adjusted,
    the micro-batch lowered only where it must be (memory stays within the chosen one).

    LabError naming the fix when the target cannot be split evenly, or when the config's own
    accumulation (an explicit choice, never adjusted) makes another effective batch.
    """
    from .errors import problem

    if accumulation_fixed and micro * accumulation * processes != target:
        raise problem(
            f"micro-batch {micro} × train.gradient_accumulation_steps {accumulation} × {processes} "
            f"process{'es' if processes > 1 else ''} makes an effective batch of {micro * accumulation * processes}, "
            f"but this run's checkpoints were trained with {target}",
            fix="remove train.gradient_accumulation_steps from the config (the lab then keeps the effective batch), "
                "or use a new run_name",
        )
    if accumulation_fixed:
        return micro, accumulation
    if target % processes:
        raise problem(
            f"the run's effective batch of {target} rows cannot be split evenly over {processes} processes",
            fix=f"launch a process count that divides {target} (e.g. {_divisors_hint(target)}), or start a new run_name",
        )
    per_process = target // processes
    if micro_fixed:
        if per_process % micro:
            raise problem(
                f"train.per_device_train_batch_size={micro} does not divide the {per_process} rows each of "
                f"{processes} processes takes per update (effective batch {target})",
                fix=f"set train.per_device_train_batch_size to a divisor of {per_process}, or remove it",
            )
        return micro, per_process // micro
    best = max(m for m in range(1, min(micro, per_process) + 1) if per_process % m == 0)
    return best, per_process // best


def _divisors_hint(n: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0 and d > 1)[:40] or "1"


# ------------------------------------------------------------------------------------------------ FSDP


def fsdp_enabled() -> bool:
    """Return True when Accelerate was launched with an FSDP config (`accelerate launch --config_file ...fsdp...`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def _env_true(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes")


def fsdp_problems(cfg: dict, settings: dict, *, bf16: bool) -> list[str]:
    """Return what is wrong with this FSDP-QLoRA combination, one "what — fix" line each ([] when it is right).

    Read before the model loads: Accelerate's FSDP settings (from its config file, passed as FSDP_*
    variables) and the run's model and train settings. bf16: the GPUs compute in bfloat16.
    """
    if not fsdp_enabled():
        return []
    out = []
    yaml_hint = "in the Accelerate config (accelerate/fsdp_qlora.yaml ships it)"
    if _env_true("FSDP_CPU_RAM_EFFICIENT_LOADING") is not True:
        out.append("fsdp_cpu_ram_efficient_loading is off: every process would load the whole model into CPU RAM — "
                   f"set fsdp_cpu_ram_efficient_loading: true {yaml_hint}")
    if _env_true("FSDP_SYNC_MODULE_STATES") is False:
        out.append("fsdp_sync_module_states is off: with CPU-efficient loading the other processes would keep "
                   f"empty weights — set fsdp_sync_module_states: true {yaml_hint}")
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version == "1" and _env_true("FSDP_USE_ORIG_PARAMS") is True:
        out.append("fsdp_use_orig_params is true: with frozen 4-bit weights FSDP then keeps full-size gradients "
                   f"for them (no memory saved) — set fsdp_use_orig_params: false {yaml_hint}")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "").strip().upper()
    if policy and policy != "TRANSFORMER_BASED_WRAP":
        out.append(f"fsdp_auto_wrap_policy is {policy}: QLoRA shards one decoder layer at a time (the LoRA layers "
                   f"wrapped apart by peft) — set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP {yaml_hint}")
    if not cfg["model"].get("load_in_4bit", True):
        out.append("model.load_in_4bit is false: the shipped FSDP config is for QLoRA — set model.load_in_4bit: true, "
                   "or launch without the FSDP config")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    want = "bf16" if bf16 else "fp16"
    if precision not in ("no", want):
        out.append(f"Accelerate's mixed_precision is {precision}, but these GPUs compute in {want} — set "
                   f"mixed_precision: {want} (or 'no') {yaml_hint}")
    gc_kwargs = settings.get("gradient_checkpointing_kwargs") or {}
    if settings.get("gradient_checkpointing") and gc_kwargs.get("use_reentrant") is True:
        out.append("train.gradient_checkpointing_kwargs.use_reentrant is true: FSDP with LoRA needs non-reentrant "
                   "checkpointing — remove it (the lab sets use_reentrant: false)")
    optim = str(settings.get("optim") or "")
    if "8bit" in optim or "paged" in optim:
        out.append(f"train.optim is {optim}: FSDP-QLoRA cannot save a checkpoint with a paged/8-bit optimizer (peft) — "
                   "set train.optim: adamw_torch")
    state = os.environ.get("FSDP_STATE_DICT_TYPE", "").strip().upper()
    if state and "FULL_STATE_DICT" not in state:
        out.append(f"fsdp_state_dict_type is {state}: checkpoints would hold shards, not the adapter the lab verifies "
                   f"and resumes (also with another process count) — set fsdp_state_dict_type: FULL_STATE_DICT {yaml_hint}")
    if _env_true("FSDP_ACTIVATION_CHECKPOINTING") and settings.get("gradient_checkpointing"):
        out.append("fsdp_activation_checkpointing and train.gradient_checkpointing are both on — keep one: set "
                   "train.gradient_checkpointing: false")
    return out


def quant_storage_dtype(compute_dtype):
    """Return the dtype 4-bit weights are stored in: uint8 in one process; under FSDP a float FSDP can shard.

    bf16 compute stores in bf16 (the compute dtype, so FSDP's flat parameters hold one dtype); fp16
    compute stores in fp32, as peft's FSDP-QLoRA guide says for stable fp16 mixed precision.
    """
    import torch

    if not fsdp_enabled():
        return torch.uint8
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32
