"""Several processes, one run: `python -m lab_utils train` under torchrun (CPU, gloo), and the FSDP-QLoRA checks.

The slow stories launch `torchrun --nproc_per_node 2 -m lab_utils train` as a user would, on the embedded
model with a tiny config, and share one uninterrupted 2-process run as the reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_resume import _adapter, _max_diff  # the run's final adapter, and the largest weight difference

from lab_utils import distributed as dist
from lab_utils.checkpoints import missing_required, verify_checkpoint
from lab_utils.errors import LabError

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FSDP_YAML = REPO / "accelerate" / "fsdp_qlora.yaml"
# 48 training rows at max_length 64; the defaults pick micro-batch 8 × accumulation 2 = 16 on a CPU
CONFIG = {
    "run_name": "ddp",
    "data": {"limit": 96},
    "model": {"max_length": 64},
    "train": {"max_steps": 8, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "save_total_limit": 3},
}  # 3 steps an epoch: checkpoint-4 lies one step into the second epoch, checkpoint-6 on its end


# ------------------------------------------------------------------------------------ fast specifications


def test_split_batch_keeps_the_effective_batch_and_lowers_accumulation_first():
    assert dist.split_batch(16, 2, 8, 2) == (8, 1)
    assert dist.split_batch(16, 1, 8, 1) == (8, 2)  # 2 processes → 1: accumulation back up
    assert dist.split_batch(16, 4, 8, 2) == (4, 1)  # the micro-batch shrinks only when it must
    assert dist.split_batch(24, 2, 8, 3) == (6, 2)  # micro 8 does not divide 12: the largest that does


def test_split_batch_refuses_in_one_line_when_the_batch_cannot_be_split():
    with pytest.raises(LabError, match=r"effective batch of 16 rows cannot be split evenly over 3 processes — launch"):
        dist.split_batch(16, 3, 8, 2)
    with pytest.raises(LabError, match="per_device_train_batch_size=3 does not divide"):
        dist.split_batch(16, 2, 3, 1, micro_fixed=True)
    with pytest.raises(LabError, match="effective batch of 32, but this run's checkpoints were trained with 16 — remove"):
        dist.split_batch(16, 2, 8, 2, accumulation_fixed=True)  # the config's accumulation is never adjusted


def test_checkpoint_of_several_processes_counts_as_complete():
    one = ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"]
    assert missing_required(one + ["rng_state_0.pth", "rng_state_1.pth"]) == []
    assert missing_required(one + ["rng_state.pth"]) == []
    assert missing_required(one) == ["rng_state.pth"]


def test_only_a_dead_peers_error_ends_a_process_without_a_line():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5")
    assert dist._peer_failed(gloo)
    try:
        raise ValueError("while waiting") from gloo
    except ValueError as e:
        assert dist._peer_failed(e)  # found through the chain
    assert not dist._peer_failed(LabError("the run is locked"))
    assert not dist._peer_failed(RuntimeError("CUDA out of memory"))


def test_a_resumed_later_epoch_under_several_processes_draws_that_epochs_order():
    """accelerate's chain under 2 processes, as skip_first_batches leaves it on a resume one batch into epoch 1."""
    from accelerate.data_loader import (
        BatchSamplerShard,
        DataLoaderShard,
        SeedableRandomSampler,
        skip_first_batches,
    )
    from torch.utils.data import BatchSampler

    from lab_utils.training import set_sampler_epoch

    def loader():
        sampler = SeedableRandomSampler(range(32), data_seed=7)
        shard = BatchSamplerShard(BatchSampler(sampler, 4, drop_last=False), num_processes=2, process_index=0)
        return DataLoaderShard(list(range(32)), batch_sampler=shard)

    def order(dataloader, epoch):
        dataloader.set_epoch(epoch)  # what accelerate and transformers reach by themselves
        return [batch.tolist() for batch in dataloader]

    uninterrupted = order(loader(), 1)
    assert uninterrupted != order(loader(), 0)
    assert order(skip_first_batches(loader(), 1), 1) == order(loader(), 0)[1:]  # the fault: epoch 0's order
    resumed = skip_first_batches(loader(), 1)
    assert set_sampler_epoch(resumed, 1) == 1
    assert order(resumed, 1) == uninterrupted[1:]


def _accelerate_env(config_file: Path) -> dict[str, str]:
    """Return the environment `accelerate launch --config_file config_file` gives each process (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(config_file), "--num_processes", "2", "-m", "lab_utils", "train"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}


@pytest.fixture
def fsdp_env(monkeypatch):
    """Set the variables accelerate launch derives from the shipped FSDP-QLoRA config; return a setter for changes."""
    for key, value in _accelerate_env(FSDP_YAML).items():
        monkeypatch.setenv(key, value)
    return monkeypatch


QLORA = {"model": {"load_in_4bit": True}}
A100_SETTINGS = {"bf16": True, "optim": "adamw_torch", "gradient_checkpointing": True}


def test_shipped_fsdp_config_passes_the_lab_checks_as_accelerate_launch_passes_it(fsdp_env):
    assert dist.fsdp_enabled()
    assert dist.fsdp_problems(QLORA, A100_SETTINGS, bf16=True) == []


@pytest.mark.parametrize(
    ("change", "settings", "named"),
    [
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}, {}, "set fsdp_cpu_ram_efficient_loading: true"),
        ({"FSDP_USE_ORIG_PARAMS": "true"}, {}, "set fsdp_use_orig_params: false"),
        ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, {}, "set fsdp_state_dict_type: FULL_STATE_DICT"),
        ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, {}, "TRANSFORMER_BASED_WRAP"),
        ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {}, "set mixed_precision: bf16"),
        ({}, {"optim": "paged_adamw_8bit"}, "set train.optim: adamw_torch"),
        ({}, {"gradient_checkpointing_kwargs": {"use_reentrant": True}}, "non-reentrant"),
    ],
)
def test_a_wrong_fsdp_qlora_setting_is_named_with_its_fix(fsdp_env, change, settings, named):
    for key, value in change.items():
        fsdp_env.setenv(key, value)
    problems = dist.fsdp_problems(QLORA, {**A100_SETTINGS, **settings}, bf16=True)
    assert len(problems) == 1 and named in problems[0], problems


def test_fsdp_stores_4bit_weights_in_the_compute_dtype(fsdp_env):
    import torch

    assert dist.quant_storage_dtype(torch.bfloat16) == torch.bfloat16
    assert dist.quant_storage_dtype(torch.float16) == torch.float32  # peft: fp16 mixed precision stores in fp32
    fsdp_env.delenv("ACCELERATE_USE_FSDP")
    assert dist.quant_storage_dtype(torch.bfloat16) == torch.uint8  # one process: bitsandbytes' default


def test_fsdp_load_keeps_one_dtype_per_shard_and_ddp_asks_for_cpu_ranks(fsdp_env):
    """Under FSDP the 4-bit model is loaded in its storage dtype with no fp32 norms (FSDP flattens one dtype)."""
    import torch

    from lab_utils.config import resolve_config
    from lab_utils.model import add_lora, load_base_model

    cfg = resolve_config()
    model = load_base_model(cfg, dtype=torch.bfloat16)
    assert model.hf_quantizer.quantization_config.bnb_4bit_quant_storage == torch.bfloat16
    model = add_lora(model, cfg)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}, frozen
    fsdp_env.setenv("WORLD_SIZE", "2")
    kwargs = dist.trainer_kwargs({"gradient_checkpointing": True})
    assert kwargs["use_cpu"] is True and kwargs["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


# ------------------------------------------------------------------------------------ 2 processes (slow)


def _launch(root: Path, config: dict, processes: int, tmp: Path, **popen) -> subprocess.Popen:
    cfg = tmp / f"lab-{time.monotonic_ns()}.yml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "LAB_ROOT": str(root), "LAB_CONFIG": str(cfg), "LAB_LIVE": "lines", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("LAB_RUN_NAME", None)
    cmd = ([TORCHRUN, "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable])
    return subprocess.Popen([*cmd, "-m", "lab_utils", "train"], env=env, cwd=str(REPO), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _train(root: Path, tmp: Path, processes: int = 2, **changes) -> str:
    """Run the command to its end; return its output (stdout and stderr, as a person sees them)."""
    config = {**CONFIG, "train": {**CONFIG["train"], **changes}}
    proc = _launch(root, config, processes, tmp, start_new_session=True)
    out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Return the launch's output once it ended; kill it and its workers if it has not within timeout."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 2-process run of 8 steps: (run folder, its output, its adapter)."""
    tmp = tmp_path_factory.mktemp("ddp-ref")
    out = _train(tmp / "runs", tmp)
    run_dir = tmp / "runs" / CONFIG["run_name"]
    return run_dir, out, _adapter(run_dir)


@pytest.mark.slow
def test_two_processes_train_one_set_of_checkpoints_written_by_the_main_process(reference):
    run_dir, out, _ = reference
    assert "Processes: 2" in out
    assert "micro-batch 8 × accumulation 1 × 2 processes = 16" in out
    for line in ("Starting fresh (no checkpoint yet). 8 steps to run.", "step 5/8 · loss", "Saved adapter →"):
        assert out.count(line) == 1, line  # printed once, by the main process
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert names == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]  # one set, pruned to save_total_limit 3
    for name in names:
        ckpt = run_dir / "checkpoints" / name
        assert verify_checkpoint(ckpt) is None
        manifest = json.loads((ckpt / "lab_manifest.json").read_text())
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])  # each process's RNG, listed
        assert manifest["identity"]["effective_batch"] == 16
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert leftovers == [] and not (run_dir / "trainer.lock").exists()
    history = json.loads((run_dir / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 9))  # each step logged once
    from lab_utils.tracking import _read

    tracked = [(s, m) for _, s, m in _read(run_dir / "tracking", CONFIG["run_name"]) if "train/loss" in m]
    assert [s for s, _ in tracked] == list(range(1, 9))


def _descendants(pid: int) -> list[int]:
    """Return the pids of every live process below pid (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.slow
def test_killed_launcher_relaunched_resumes_to_the_uninterrupted_adapter(reference, tmp_path):
    _, _, want = reference
    root = tmp_path / "runs"
    proc = _launch(root, CONFIG, 2, tmp_path, start_new_session=True)
    ckpt = root / CONFIG["run_name"] / "checkpoints" / "checkpoint-4"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)  # a dead machine: the launcher's group at once, mid-save
    _finish(proc, 60)
    time.sleep(1.0)
    assert len(workers) >= 2 and not [p for p in workers if Path(f"/proc/{p}").exists()
                                      and "zombie" not in Path(f"/proc/{p}/status").read_text()]
    out = _train(root, tmp_path)
    assert out.count("Resuming from checkpoint-") == 1, out[-3000:]
    diff = _max_diff(_adapter(root / CONFIG["run_name"]), want)
    assert diff <= 1e-6, (diff, [line for line in out.splitlines() if "Resuming from" in line])


@pytest.mark.slow
def test_two_processes_resumed_inside_a_later_epoch_end_on_the_uninterrupted_adapter(reference, tmp_path):
    """Resumed one step into epoch 2, the run must draw epoch 2's order (it replayed epoch 1's: 1.3e-3 off)."""
    run_dir, _, want = reference
    root = tmp_path / "runs"
    shutil.copytree(run_dir, root / run_dir.name)
    for name in ("checkpoint-6", "checkpoint-8"):
        shutil.rmtree(root / run_dir.name / "checkpoints" / name)
    shutil.rmtree(root / run_dir.name / "adapter")
    out = _train(root, tmp_path)
    assert out.count("Resuming from checkpoint-4 (step 4 of 8") == 1, out[-3000:]
    assert _max_diff(_adapter(root / run_dir.name), want) <= 1e-6


@pytest.mark.slow
def test_one_process_run_continues_under_two_with_the_same_effective_batch(tmp_path):
    root = tmp_path / "runs"
    first = _train(root, tmp_path, processes=1, max_steps=4)
    assert "Processes: 1" in first and "effective batch                    16" in first
    out = _train(root, tmp_path, processes=2)
    assert out.count("Resuming from checkpoint-4") == 1
    assert "micro-batch 8 × accumulation 1 × 2 processes = 16: checkpoint-4's effective batch" in out
    manifest = json.loads((root / "ddp" / "checkpoints" / "checkpoint-8" / "lab_manifest.json").read_text())
    assert manifest["identity"]["effective_batch"] == 16


@pytest.mark.slow
def test_two_process_run_continues_in_one_process_with_the_same_effective_batch(reference, tmp_path):
    run_dir, _, want = reference
    root = tmp_path / "runs"
    shutil.copytree(run_dir, root / run_dir.name)
    shutil.rmtree(root / run_dir.name / "checkpoints" / "checkpoint-8")
    shutil.rmtree(root / run_dir.name / "adapter")
    out = _train(root, tmp_path, processes=1)
    assert out.count("Resuming from checkpoint-6") == 1
    assert "train.gradient_accumulation_steps  2 " in out and "effective batch                    16 " in out
    assert _max_diff(_adapter(root / run_dir.name), want) < 1e-3  # same rows per update; only sums reordered


@pytest.mark.slow
def test_a_failure_in_one_process_ends_every_process_with_one_line(reference, tmp_path):
    """Another trainer holds the run (its lock, live): the main process refuses; the other ends without a word."""
    run_dir, _, _ = reference
    root = tmp_path / "runs"
    shutil.copytree(run_dir, root / run_dir.name)
    lock = root / run_dir.name / "trainer.lock"
    import socket

    body = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": "other",
            "heartbeat": time.time()}
    lock.write_text(json.dumps(body))
    proc = _launch(root, CONFIG, 2, tmp_path, start_new_session=True)
    out = _finish(proc)
    assert proc.returncode != 0
    lines = [line for line in out.splitlines() if line.startswith("✗")]
    assert len(lines) == 1 and "is being trained by another process" in lines[0], out[-3000:]
    assert "[rank" not in out  # no process printed a traceback (torch prefixes theirs with [rankN])
    assert out.count("Traceback (most recent call last)") <= 1 and "ChildFailedError" in out  # the launcher's summary
    assert json.loads(lock.read_text())["token"] == "other"  # the other trainer's lock is untouched


@pytest.mark.slow
def test_ctrl_c_stops_every_process_with_one_line_and_the_run_continues_from_its_checkpoint(tmp_path):
    """Ctrl-C in a terminal reaches the launcher and every worker (one process group): one ✗ line, not one each."""
    root = tmp_path / "runs"
    proc = _launch(root, {**CONFIG, "train": {**CONFIG["train"], "max_steps": 40}}, 2, tmp_path,
                   start_new_session=True)
    ckpt = root / CONFIG["run_name"] / "checkpoints" / "checkpoint-2" / "lab_manifest.json"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out = _finish(proc, 120)
    assert proc.returncode != 0
    assert [line for line in out.splitlines() if line.startswith("✗")] == ["✗ Stopped by the user."], out[-3000:]
    assert out.count("Stopped at step ") == 1 and "[rank" not in out
    stopped = int(out.split("Stopped at step ")[1].split(":")[0])
    assert (root / CONFIG["run_name"] / "checkpoints" / f"checkpoint-{stopped}" / "lab_manifest.json").exists()
