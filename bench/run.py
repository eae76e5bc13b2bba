"""`make bench`: the lab's defaults against the seed configuration and against TRL's own efficient settings.

What it measures, in one run (results in bench/results/latest.json and latest.md):

* **seed**: micro-batch 2 x accumulation 4, every row padded to max_length (the collator's
  `pad_to_multiple_of=max_length`, which is what `padding="max_length"` did), rows in random order,
  no packing.
* **default**: what `lab_utils.training.train_settings()` (i.e. `defaults.choose()`) returns on this
  machine for this model and this data. On a CPU: `train_sampling_strategy="group_by_length"`, the
  micro-batch from the memory estimate (8 x 2), fp32, adamw_torch.
* **what a user who knows TRL would run instead** (PEERS): TRL as is (the default's 8 x 2, random
  order, padded to the longest row of each micro-batch); packing with best-fit-decreasing at micro
  1 x 4 and 2 x 2 (padding-free, per-row positions); padding-free without packing at 8 x 2.
  All share everything else: gradient checkpointing as the default chose it, LoRA r=32 on all
  linear layers, learning rate, seed.
* The real path for all: the embedded tiny Llama loaded in 4-bit nf4 by
  `lab_utils.model.load_for_training` (bitsandbytes -> prepare_model_for_kbit_training -> LoRA),
  data prepared by `lab_utils.data.prepare` (chat template, assistant-only labels), trainer built
  by `lab_utils.training.build_trainer` (TRL's SFTTrainer). The bench changes only what a bench
  must: no checkpoints are written, no validation split, no progress bar.
* Data preparation: rows/s of `lab_utils.data.prepare` beside TRL's own preparation
  (`SFTTrainer._prepare_dataset` with `assistant_only_loss=True` and the tokenizer's training
  template), on the same synthetic rows, interleaved.

Sizes (`make bench` = the defaults below): 2000 synthetic rows at max_length 512; every
configuration trains one epoch over the same 256 rows, 3 interleaved repeats (6 configurations x 3 =
18 worker processes, each paying ~20 s of imports and model loading); 2 repeats of the data
preparation. About 12 min on a quiet 2-core machine (estimated from the CPU seconds); on a loaded
one the wall clock stretches with the load, the CPU-time figures much less.

Length: the seed's rows are 2048 tokens. On 2 CPU cores that is too slow for a 10-minute bench
(the tiny model trains ~1.5k padded tokens/s on one core), so by default everything is scaled
down by 4: max_length 512 (the tiny model's own context) and every row length / 4. Padding waste
is a ratio of lengths and does not change with the scale; the speed ratio changes a little,
because attention's share of the work grows with length (it favours the default at 2048).
`--max-length 2048` runs the seed's own length on a copy of the tiny model whose config allows
2048 positions (same weights: RoPE has no learned positions).

The data: synthetic ShareGPT rows (one user turn, one assistant turn) whose token lengths follow a
long-tailed, FineTome-like shape: at max_length 2048, total tokens per row ~ lognormal with median
420 and sigma 0.75 (mean ~560, p95 ~1440), clipped to [48, 2048]; the prompt takes a uniform 15-50%
of a row. This is an assumed shape (that of single-turn instruction data such as FineTome-100k:
most rows a few hundred tokens, a tail past 2k), not a measurement of FineTome. The text is words
of the Pricer vocabulary; only lengths matter here. Rows longer than max_length after the chat
template are truncated (`data.on_too_long: truncate`). The measured percentiles are in the results.

Metrics:
* padding waste = pad tokens / all tokens the model processed, counted from the batches the real
  collator returned (a wrapper counts attention-mask zeros). Reported for the timed batches and
  for one full epoch of the real Trainer dataloader over the whole data set (no training): the
  default's waste depends on the data set's size, because transformers' LengthGroupedSampler sorts
  rows inside mega-batches of min(rows / (4 x batch), 50) x batch rows.
* trained tokens per CPU-second (and per wall-second) = non-pad tokens / CPU seconds (wall seconds)
  from the start of training to the end of the last optimizer step. Every configuration trains one
  epoch over the same rows (selected before packing), so a ratio is the same whether one counts
  non-pad tokens or loss (assistant) tokens.
* peak memory: each configuration runs in its own subprocess; on CPU the process's peak resident
  memory (`resource.getrusage(...).ru_maxrss`), on CUDA `torch.cuda.max_memory_allocated`.
* Speed is trained (non-pad) tokens per CPU-second of the training loop (`time.process_time()`
  from the start of training to the end of the last optimizer step): on a machine shared by several
  people wall clock swung 0.64x-1.58x for the same pair while CPU time stayed within 1.31x-1.42x.
  Tokens per wall-second are kept beside it. The configurations run interleaved (seed, default,
  peers, seed, default, ...); per configuration min, median and max over the repeats are written,
  and every ratio is the median of the per-repeat ratios. Workers use one CPU thread
  (`--threads`): on a busy 2-core machine two OpenMP threads ran 5-15x slower and erratic.
* latest.json keeps padding_waste_default, padding_waste_seed, tokens_per_s_ratio_default_over_seed
  and adds tokens_per_s_ratio_default_over_best_trl (over the fastest peer), peak_memory_ratio_
  default_over_lowest, and per configuration everything under cpu.configs.

GPU section: when CUDA is present, the same comparison on a randomly initialised Llama with
Llama-3.2-1B's shape at length 2048, with the process capped at a T4's memory
(`torch.cuda.set_per_process_memory_fraction`) and the defaults chosen for a T4, on the plain path
and on unsloth's (if it imports); measured peaks are compared with `defaults.estimate_memory`.
Results go to bench/results/gpu.json and gpu.md; latest.md shows the last one. Without CUDA it is
skipped with one line saying so.

Usage: python bench/run.py [--repeats 3] [--rows 2000] [--timed-rows 256] [--max-length 512]
                           [--prep-repeats 2] [--extra-micro 4 8] [--no-gpu | --gpu-only] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
SEED_LENGTH = 2048  # the seed's row length; the bench runs at --max-length (default 2048 / 4, see docstring)
DEFAULT_BENCH_LENGTH = 512
RUN_NAME = "bench"
GIB = 2**30

# The data's length distribution (tokens per row after the chat template), see the docstring.
LENGTH_MEDIAN = 420  # at max_length 2048; scaled with --max-length
LENGTH_SIGMA = 0.75
LENGTH_MIN = 48  # at max_length 2048; scaled with --max-length
PROMPT_SHARE = (0.15, 0.50)
DATA_SEED = 2024

# The seed configuration: SFTConfig fields that replace the default's.
SEED_SETTINGS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    # "pad_to_multiple_of": max_length is set per run: every row padded to max_length, as padding="max_length" did
    "train_sampling_strategy": "random",
    "packing": False,
    "padding_free": False,
}
# What a user who knows TRL would run instead of the lab's defaults (SFTConfig fields that replace the
# default's; "micro": micro-batch x accumulation, None = the default's). Packing counts packed rows of up
# to max_length tokens per micro-batch, so its micro-batches are smaller for about the same tokens per step.
PEERS: dict[str, dict] = {
    "trl-as-is": {"train_sampling_strategy": "random", "packing": False, "padding_free": False},
    "trl-packing-1x4": {
        "packing": True, "packing_strategy": "bfd", "padding_free": True, "train_sampling_strategy": "random",
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
    },
    "trl-packing-2x2": {
        "packing": True, "packing_strategy": "bfd", "padding_free": True, "train_sampling_strategy": "random",
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
    },
    # padding-free without packing: TRL refuses it while max_length is set (max_length would not be
    # enforced); the prepared rows are already cut to max_length, so the worker passes max_length=None.
    "trl-padding-free": {"padding_free": True, "packing": False, "train_sampling_strategy": "random"},
}
CONFIGS = ("seed", "default", *PEERS)
GOAL_WASTE = 0.05
GOAL_RATIO = 2.0
GOAL_MEMORY_RATIO = 1.2  # the default's peak memory over the lowest of all configurations

# Llama-3.2-1B's shape (config.json of meta-llama/Llama-3.2-1B), for the GPU section.
LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
GPU_TARGET = "T4"  # the hardware the GPU section plans for and caps memory to


# --------------------------------------------------------------------------- data and model


def row_lengths(n: int, max_length: int, seed: int = DATA_SEED) -> list[int]:
    """Return n target token counts per row: lognormal(median 420, sigma 0.75) clipped to [48, 2048], scaled to max_length."""
    rng = random.Random(seed)
    scale = max_length / SEED_LENGTH
    mu = math.log(LENGTH_MEDIAN * scale)
    low = max(8, int(LENGTH_MIN * scale))
    return [max(low, min(max_length, int(rng.lognormvariate(mu, LENGTH_SIGMA)))) for _ in range(n)]


def synthetic_rows(tokenizer, n: int, max_length: int, seed: int = DATA_SEED) -> list[dict]:
    """Return n ShareGPT rows (user, assistant) whose lengths follow row_lengths(), in tokens of `tokenizer`."""
    from lab_utils.chat import tokenize_chat
    from lab_utils.embedded import pricer_rows

    words = sorted({w for r in pricer_rows(200) for t in r["conversations"] for w in t["value"].split()})
    cost = [len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words]
    overhead = len(
        tokenize_chat(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])[
            "input_ids"
        ]
    )
    rng = random.Random(seed + 1)

    def text(tokens: int) -> str:
        out, used = [], 0
        while used < tokens:
            i = rng.randrange(len(words))
            out.append(words[i])
            used += cost[i]
        return " ".join(out)

    rows = []
    for total in row_lengths(n, max_length, seed):
        body = max(2, total - overhead)
        prompt = max(1, int(body * rng.uniform(*PROMPT_SHARE)))
        rows.append(
            {
                "conversations": [
                    {"from": "human", "value": text(prompt)},
                    {"from": "gpt", "value": text(max(1, body - prompt))},
                ]
            }
        )
    return rows


def bench_model(workdir: Path, max_length: int) -> Path:
    """Return the embedded tiny Llama, or a copy whose config allows max_length positions (same weights)."""
    from lab_utils.embedded import EMBEDDED_MODEL, resolve_model

    src = Path(resolve_model(EMBEDDED_MODEL))
    if json.loads((src / "config.json").read_text())["max_position_embeddings"] >= max_length:
        return src
    dst = workdir / f"tiny-llama-{max_length}"
    if not dst.exists():
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["max_position_embeddings"] = max_length
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def llama_1b(workdir: Path) -> Path:
    """Return a folder with a randomly initialised Llama of Llama-3.2-1B's shape (bf16) and the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lab_utils.embedded import tokenizer_dir

    dst = workdir / "llama-1b-random"
    if (dst / "config.json").exists():
        return dst
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    config = LlamaConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **LLAMA_1B,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    shutil.copy(tokenizer_dir() / "tokenizer.model", dst / "tokenizer.model")
    del model
    return dst


def data_file(workdir: Path, rows: int, max_length: int) -> Path:
    """Return the synthetic data file's path."""
    return workdir / f"finetome_like_{rows}x{max_length}.jsonl"


def prepare(workdir: Path, model_dir: Path, rows: int, max_length: int, run_name: str = RUN_NAME) -> dict:
    """Write the synthetic data, prepare it through lab_utils.data.prepare; return the data report."""
    os.environ["LAB_ROOT"] = str(workdir / "runs")
    from lab_utils.config import resolve_config
    from lab_utils.data import prepare as prepare_data
    from lab_utils.model import load_tokenizer
    from lab_utils.run import start

    form = {
        "model.name": str(model_dir),
        "model.max_length": max_length,
        "data.path": str(data_file(workdir, rows, max_length)),
        "data.val_fraction": 0.01,
        "data.on_too_long": "truncate",
        "checkpoint.save_every_minutes": 1e6,  # the bench writes no checkpoints
        "train.save_steps": 10**9,
        "train.logging_steps": 10**9,
    }
    # the file first: start() checks every input before it writes anything, a missing data.path included
    data = Path(form["data.path"])
    if not data.exists():
        tok = load_tokenizer(resolve_config(form={**form, "run_name": run_name}))
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(tok, rows, max_length)))
    run = start(run_name, form=form, quiet=True)
    tok = load_tokenizer(run.cfg)
    prepare_data(run, tok)
    return json.loads((run.data_dir / "data_report.json").read_text())


# --------------------------------------------------------------------------- one configuration


class CountingCollator:
    """Wrap a collator; count the tokens, pad tokens and loss tokens of every batch it returns."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self.batches = self.rows = self.tokens = self.real = self.loss_tokens = 0
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.batches += 1
        self.rows += len(examples)
        self.tokens += ids.numel()
        self.real += int(mask.sum()) if mask is not None else sum(len(e["input_ids"]) for e in examples)
        self.loss_tokens += int((batch["labels"] != -100).sum())
        self.shapes.append(tuple(ids.shape))
        return batch

    def summary(self) -> dict:
        """Return the counts and the padding waste (pad tokens / all tokens)."""
        return {
            "batches": self.batches,
            "rows": self.rows,
            "tokens": self.tokens,
            "real_tokens": self.real,
            "pad_tokens": self.tokens - self.real,
            "loss_tokens": self.loss_tokens,
            "padding_waste": (self.tokens - self.real) / self.tokens if self.tokens else None,
            "widest_batch": max(self.shapes, key=lambda s: s[0] * s[1]) if self.shapes else None,
        }


def _maxrss_gib() -> float:
    """Return this process's peak resident memory in GiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (GIB if sys.platform == "darwin" else 2**20)


def worker(
    config: str,
    workdir: Path,
    timed_rows: int,
    out: Path,
    run_name: str,
    path: str,
    target: str | None,
    micro: int | None = None,
):
    """Train one configuration for one epoch over `timed_rows` rows; write its measurements to `out`."""
    os.environ["LAB_ROOT"] = str(workdir / "runs")
    if path == "unsloth":
        import unsloth  # noqa: F401  (first, so that it patches transformers and trl before they load)
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_utils import SaveStrategy

    from lab_utils import defaults
    from lab_utils.data import load_prepared
    from lab_utils.model import load_for_training, load_tokenizer
    from lab_utils.run import start
    from lab_utils.training import build_trainer, train_settings

    cuda = torch.cuda.is_available()
    hardware = defaults.detect_hardware()
    if cuda and target:
        planned = defaults.hardware_from_name(target)
        torch.cuda.set_per_process_memory_fraction(min(1.0, planned.memory_gib / hardware.memory_gib))
        hardware = planned
    run = start(run_name, quiet=True)
    tok = load_tokenizer(run.cfg)
    data = load_prepared(run, tok)
    plan = train_settings(run, hardware=hardware)
    settings = plan.sft  # the SFTConfig arguments, changed below per configuration
    max_length = int(run.cfg["model"]["max_length"])
    default_micro = settings["per_device_train_batch_size"]
    if config == "seed":
        settings.update(SEED_SETTINGS, pad_to_multiple_of=max_length)
    elif config in PEERS:
        settings.update(PEERS[config])
    elif micro:  # exploration: the default with another micro-batch, same effective batch
        effective = default_micro * settings["gradient_accumulation_steps"]
        settings.update(
            per_device_train_batch_size=micro, gradient_accumulation_steps=max(1, effective // micro)
        )
    if cuda:  # the device's own 16-bit type: a T4's fp16 and an H100's bf16 take the same bytes
        from lab_utils.model import compute_dtype

        bf16 = compute_dtype() == torch.bfloat16
        settings.update(bf16=bf16, fp16=not bf16)
    settings["disable_tqdm"] = True
    settings["report_to"] = "none"  # the bench times training; tracking writes are no configuration's work
    gc = bool(settings.get("gradient_checkpointing"))
    rss_start = _maxrss_gib()
    model, tok = load_for_training(
        run.cfg, path, gradient_checkpointing=gc, attn_implementation=plan.attn_implementation
    )
    rss_loaded = _maxrss_gib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_loaded = torch.cuda.memory_allocated() / GIB

    def counted_trainer(rows):
        unpacked_padding_free = settings.get("padding_free") and not settings.get("packing")
        with _no_max_length_in_sftconfig() if unpacked_padding_free else contextlib.nullcontext():
            trainer, _ = build_trainer(run, model, tok, {"train": rows}, plan)
        trainer.args.save_strategy = SaveStrategy.NO  # measure training, not checkpoint writes
        trainer.data_collator = CountingCollator(trainer.data_collator)
        return trainer, trainer.data_collator

    # one epoch of the real sampler + collator over the whole set, no model
    trainer, counter = counted_trainer(data["train"])
    for _ in trainer.get_train_dataloader():
        pass
    full_epoch = counter.summary()
    # the timed epoch: the first timed_rows rows (selected before packing, so every config sees the same rows)
    trainer, counter = counted_trainer(data["train"].select(range(min(timed_rows, len(data["train"])))))

    class Clock(TrainerCallback):
        start = first = end = cpu_start = cpu_end = None
        steps = 0

        def on_train_begin(self, args, state, control, **kw):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.first = self.first or self.end
            self.steps += 1

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    seconds = clock.end - clock.start
    cpu_seconds = clock.cpu_end - clock.cpu_start
    timed = counter.summary()
    result = {
        "config": config,
        "path": path,
        "settings": {
            k: v
            for k, v in settings.items()
            if k in (*defaults.HARDWARE_KEYS, "pad_to_multiple_of", "max_length", "packing_strategy")
        },
        "default_micro_batch": default_micro,
        "optimizer_steps": clock.steps,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "first_step_seconds": clock.first - clock.start,
        "timed": timed,
        "full_epoch": full_epoch,
        "tokens_per_cpu_s": timed["real_tokens"] / cpu_seconds,
        "tokens_per_s": timed["real_tokens"] / seconds,
        "loss_tokens_per_s": timed["loss_tokens"] / seconds,
        "processed_tokens_per_s": timed["tokens"] / seconds,
        "rss_start_gib": rss_start,
        "rss_after_load_gib": rss_loaded,
        "rss_peak_gib": _maxrss_gib(),
        "hardware": {"name": hardware.name, "memory_gib": hardware.memory_gib, "kind": hardware.kind},
        "estimated_peak_gib": _estimate(settings, run.cfg, hardware, timed["widest_batch"]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if cuda:
        result["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["cuda_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        result["cuda_after_load_gib"] = cuda_loaded
        result["device"] = torch.cuda.get_device_name(0)
    _write(out, json.dumps(result, indent=1))


@contextlib.contextmanager
def _no_max_length_in_sftconfig():
    """Within the block, trl.SFTConfig takes max_length=None (padding-free without packing; rows are already cut)."""
    import trl

    base = trl.SFTConfig

    class SFTConfigWithoutMaxLength(base):
        def __init__(self, *args, **kwargs):
            kwargs["max_length"] = None
            super().__init__(*args, **kwargs)

    trl.SFTConfig = SFTConfigWithoutMaxLength
    try:
        yield
    finally:
        trl.SFTConfig = base


def _estimate(settings: dict, cfg: dict, hardware, widest: tuple[int, int] | None) -> dict:
    """Return defaults.estimate_memory() for these settings: planned (rows of max_length) and for the widest batch seen."""
    from lab_utils import defaults
    from lab_utils.training import _model_params

    params, real_shape = _model_params(cfg)
    kwargs = dict(
        model_params=params,
        lora_r=int(cfg["lora"].get("r", 32)),
        max_length=int(cfg["model"]["max_length"]),
        micro_batch=int(settings["per_device_train_batch_size"]),
        gradient_checkpointing=bool(settings.get("gradient_checkpointing")),
        optim=str(settings.get("optim")),
        lora_dropout=float(cfg["lora"].get("lora_dropout", 0.0)),
        dtype_bytes=2 if hardware.kind == "cuda" else 4,
        device_kind=hardware.kind,
        **real_shape,
    )
    planned = defaults.estimate_memory(**kwargs)
    seen = (
        defaults.estimate_memory(**{**kwargs, "tokens_per_batch": widest[0] * widest[1]}) if widest else None
    )
    return {
        "planned_gib": round(planned.total_gib, 3),
        "widest_batch_gib": round(seen.total_gib, 3) if seen else None,
        "widest_batch": widest,
        "loss_type_assumed": "nll",
    }


# --------------------------------------------------------------------------- data preparation


def _timed(fn) -> tuple[float, float]:
    """Run fn(); return (wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def data_prep(workdir: Path, data_path: Path, model_dir: Path, max_length: int, repeats: int) -> dict:
    """Return rows/s of lab_utils.data.prepare and of TRL's own preparation (assistant_only_loss), interleaved.

    TRL gets the rows already in its `messages` format (converted outside the clock) and the tokenizer's
    training template (generation markers); the lab reads the ShareGPT file itself and also validates,
    deduplicates, measures lengths and writes the processed set and its report.
    """
    import datasets
    from trl import SFTConfig, SFTTrainer

    from lab_utils.config import resolve_config
    from lab_utils.data import prepare as prepare_data
    from lab_utils.model import load_tokenizer
    from lab_utils.run import Run

    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    raw = [json.loads(line) for line in data_path.read_text().splitlines() if line.strip()]
    messages = datasets.Dataset.from_list(
        [{"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]} for r in raw]
    )
    form = {"model.name": str(model_dir), "model.max_length": max_length, "data.path": str(data_path),
            "data.val_fraction": 0.01, "data.on_too_long": "truncate"}
    cfg = resolve_config(form={**form, "run_name": "bench-prep"})
    tok = load_tokenizer(cfg)
    args = SFTConfig(output_dir=str(workdir / "trl-prep"), max_length=max_length, assistant_only_loss=True,
                     report_to="none", dataset_num_proc=None, bf16=False, fp16=False)  # preparation only
    trl_self = type("TRLPrep", (), {"_tokenizer": tok, "chat_template": None, "completion_only_loss": None})()
    datasets.disable_caching()  # measure the work, not a reused datasets.map cache
    runs: dict[str, list] = {"lab": [], "trl": []}
    try:
        for rep in range(repeats):
            run = Run(name="bench-prep", dir=workdir / f"prep-{rep}", cfg=cfg)
            runs["lab"].append(_timed(lambda run=run: prepare_data(run, tok)))
            runs["trl"].append(
                _timed(lambda: SFTTrainer._prepare_dataset(trl_self, messages, tok, args, False, None, "train"))
            )
            shutil.rmtree(run.dir, ignore_errors=True)
    finally:
        datasets.enable_caching()
    n = len(raw)
    out = {"rows": n, "repeats": repeats, "tokenizer": "embedded (512 pieces)"}
    for who, times in runs.items():
        out[who] = {
            "rows_per_cpu_s": _stats([n / c for _, c in times]),
            "rows_per_s": _stats([n / w for w, _ in times]),
            "seconds": [round(w, 2) for w, _ in times],
            "cpu_seconds": [round(c, 2) for _, c in times],
        }
    out["rows_per_cpu_s_ratio_lab_over_trl"] = _median([t[1] / lab[1] for lab, t in zip(runs["lab"], runs["trl"])])
    out["rows_per_s_ratio_lab_over_trl"] = _median([t[0] / lab[0] for lab, t in zip(runs["lab"], runs["trl"])])
    return out


def data_prep_markdown(p: dict) -> list[str]:
    """Return the data-preparation section's lines."""
    return [
        f"{p['rows']} rows, {p['tokenizer']} tokenizer, {p['repeats']} interleaved repeats; TRL's "
        "`SFTTrainer._prepare_dataset` with `assistant_only_loss=True` on the rows already in `messages` format "
        "(its training template) vs the lab's `prepare()` on the ShareGPT file (validation, dedup, length "
        "report and the saved set included).",
        "",
        "| | rows per CPU-s (median, best) | rows per wall-s (median) |",
        "|---|---|---|",
        *(
            f"| {who} | {p[who]['rows_per_cpu_s']['median']:.0f}, {p[who]['rows_per_cpu_s']['max']:.0f} | "
            f"{p[who]['rows_per_s']['median']:.0f} |"
            for who in ("lab", "trl")
        ),
        "",
        f"lab over TRL: **{p['rows_per_cpu_s_ratio_lab_over_trl']:.2f}x** rows per CPU-second, "
        f"{p['rows_per_s_ratio_lab_over_trl']:.2f}x on wall clock.",
    ]


# --------------------------------------------------------------------------- orchestration


def _spawn(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `python bench/run.py ARGS` in a fresh process (so each one's peak memory is its own)."""
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _child_env(workdir: Path, threads: int | None = None) -> dict:
    """Return the environment of a worker: this repository first on PYTHONPATH, the bench's LAB_ROOT, threads."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["LAB_ROOT"] = str(workdir / "runs")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def compare(
    workdir: Path,
    repeats: int,
    timed_rows: int,
    run_name: str,
    path: str,
    target: str | None,
    label: str,
    extra_micro: tuple[int, ...] = (),
    threads: int | None = None,
    timeout: float = 1800,
    peers: tuple[str, ...] | None = None,
) -> dict:
    """Run the configurations interleaved `repeats` times; return the runs and the summary ratios.

    peers: the configurations to run (seed and default always among them); None = CONFIGS.

    extra_micro: also run the default at these micro-batches (same effective batch), for comparison.
    """
    env = _child_env(workdir, threads)
    runs = []
    configs = [(c, None) for c in (peers if peers is not None else CONFIGS)] + [("default", m) for m in extra_micro]
    for rep in range(repeats):
        for config, micro in configs:
            name = config if micro is None else f"default-micro{micro}"
            out = workdir / f"{label}-{name}-{rep}.json"
            args = [
                "--worker",
                config,
                "--workdir",
                str(workdir),
                "--timed-rows",
                str(timed_rows),
                "--run-name",
                run_name,
                "--path",
                path,
                "--result",
                str(out),
            ]
            if target:
                args += ["--target", target]
            if micro:
                args += ["--micro", str(micro)]
            t0 = time.monotonic()
            proc = _spawn(args, env, timeout)
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stdout + proc.stderr)[-3000:]
                raise RuntimeError(f"{label} {config} run {rep} failed (exit {proc.returncode}):\n{tail}")
            r = json.loads(out.read_text())
            r["config"] = name
            r["rep"] = rep
            r["wall_seconds"] = time.monotonic() - t0
            runs.append(r)
            print(
                f"  {label} {name:<16} rep {rep}: {r['tokens_per_cpu_s']:6.0f} trained tok per CPU-s, "
                f"{r['tokens_per_s']:6.0f} per wall-s, waste {r['timed']['padding_waste']:.1%}, "
                f"{r['optimizer_steps']} steps in {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU-s), "
                f"peak {r.get('cuda_peak_allocated_gib', r['rss_peak_gib']):.2f} GiB",
                flush=True,
            )
    return summarize(runs)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _peak(r: dict) -> float:
    """Return a run's peak memory: CUDA max allocated on a GPU, else the process's peak RSS."""
    return r.get("cuda_peak_allocated_gib", r["rss_peak_gib"])


def _stats(values: list[float]) -> dict:
    """Return {min, median, max} of the repeats."""
    return {"min": min(values), "median": _median(values), "max": max(values)}


def _pair_ratios(runs: list[dict], a: str, b: str, key: str) -> list[float]:
    """Return run a's key over run b's key, per repeat (interleaved runs of the same repeat pair up)."""
    by_rep = {(r["config"], r["rep"]): r for r in runs}
    reps = sorted({r["rep"] for r in runs})
    return [by_rep[a, i][key] / by_rep[b, i][key] for i in reps if (a, i) in by_rep and (b, i) in by_rep]


def summarize(runs: list[dict]) -> dict:
    """Return the headline numbers from interleaved runs: waste, speed per CPU-second and wall-second, peaks, ratios.

    Speed ratios are medians of per-repeat ratios of trained (non-pad) tokens per CPU-second of the
    training loop: on a shared machine CPU time moves far less than wall time. Wall-clock ratios are
    kept beside them (`_wall`).
    """
    names = [c for c in dict.fromkeys(r["config"] for r in runs)]
    by = {c: [r for r in runs if r["config"] == c] for c in names}
    one = {c: by[c][0] for c in names}
    table = {
        c: {
            "settings": one[c]["settings"],
            "padding_waste": one[c]["timed"]["padding_waste"],
            "padding_waste_full_epoch": one[c]["full_epoch"]["padding_waste"],
            "tokens_per_cpu_s": _stats([r["tokens_per_cpu_s"] for r in by[c]]),
            "tokens_per_s": _stats([r["tokens_per_s"] for r in by[c]]),
            "cpu_seconds": _stats([r["cpu_seconds"] for r in by[c]]),
            "seconds": _stats([r["seconds"] for r in by[c]]),
            "peak_memory_gib": _stats([_peak(r) for r in by[c]]),
            "tokens_per_cpu_s_ratio_over_seed": _median(_pair_ratios(runs, c, "seed", "tokens_per_cpu_s")),
        }
        for c in names
    }
    peers = [c for c in names if c in PEERS]
    best_peer = max(peers, key=lambda c: table[c]["tokens_per_cpu_s"]["median"]) if peers else None
    lowest = min(names, key=lambda c: table[c]["peak_memory_gib"]["median"])
    fastest = max(names, key=lambda c: table[c]["tokens_per_cpu_s"]["median"])
    out = {
        "padding_waste_seed": table["seed"]["padding_waste"],
        "padding_waste_default": table["default"]["padding_waste"],
        "padding_waste_full_epoch_seed": table["seed"]["padding_waste_full_epoch"],
        "padding_waste_full_epoch_default": table["default"]["padding_waste_full_epoch"],
        "speed_measure": "trained (non-pad) tokens per CPU-second of the training loop",
        "tokens_per_s_ratio_default_over_seed": _median(_pair_ratios(runs, "default", "seed", "tokens_per_cpu_s")),
        "tokens_per_s_ratio_pairs": _pair_ratios(runs, "default", "seed", "tokens_per_cpu_s"),
        "tokens_per_s_ratio_default_over_seed_wall": _median(_pair_ratios(runs, "default", "seed", "tokens_per_s")),
        "tokens_per_s_ratio_pairs_wall": _pair_ratios(runs, "default", "seed", "tokens_per_s"),
        "best_trl_setting": best_peer,
        "tokens_per_s_ratio_default_over_best_trl": _median(
            _pair_ratios(runs, "default", best_peer, "tokens_per_cpu_s")
        )
        if best_peer
        else None,
        "tokens_per_s_ratio_default_over_best_trl_wall": _median(
            _pair_ratios(runs, "default", best_peer, "tokens_per_s")
        )
        if best_peer
        else None,
        "fastest": fastest,
        "lowest_memory": lowest,
        "peak_memory_ratio_default_over_lowest": table["default"]["peak_memory_gib"]["median"]
        / table[lowest]["peak_memory_gib"]["median"],
        "tokens_per_s_seed_median": table["seed"]["tokens_per_cpu_s"]["median"],
        "tokens_per_s_default_median": table["default"]["tokens_per_cpu_s"]["median"],
        "peak_memory_unit": "cuda max_memory_allocated GiB"
        if "cuda_peak_allocated_gib" in one["seed"]
        else "process peak RSS GiB (ru_maxrss)",
        "peak_memory_gib_seed": table["seed"]["peak_memory_gib"]["max"],
        "peak_memory_gib_default": table["default"]["peak_memory_gib"]["max"],
        "estimated_peak_gib_seed": one["seed"]["estimated_peak_gib"],
        "estimated_peak_gib_default": one["default"]["estimated_peak_gib"],
        "settings_seed": one["seed"]["settings"],
        "settings_default": one["default"]["settings"],
        "configs": table,
        "runs": runs,
    }
    return out


def defaults_cli_table() -> list[dict]:
    """Return `python -m lab_utils defaults --gpu G --model-params 1.24e9 --max-length 2048 --json` per GPU."""
    rows = []
    for gpu in ("T4", "L4", "A100-40GB", "cpu"):
        cmd = [
            sys.executable,
            "-m",
            "lab_utils",
            "defaults",
            "--gpu",
            gpu,
            "--model-params",
            "1.24e9",
            "--max-length",
            "2048",
            "--json",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_child_env(Path(tempfile.gettempdir())), cwd=REPO
        )
        if proc.returncode != 0:
            rows.append({"gpu": gpu, "error": (proc.stderr or proc.stdout).strip()[-300:]})
            continue
        out = json.loads(proc.stdout)
        rows.append(
            {
                "gpu": gpu,
                **{k: v for k, v in out.items() if k not in ("reasons", "estimate")},
                "estimate": out.get("estimate"),
            }
        )
    return rows


def gpu_section(
    workdir: Path, repeats: int, timed_rows: int, rows: int, paths: tuple[str, ...] = ("unsloth", "plain")
) -> dict:
    """Return the GPU comparison (1B-shaped Llama, T4 memory cap, plain and unsloth paths), or why it was skipped."""
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        return {
            "skipped": "no CUDA device on this machine: the 1B-shaped GPU comparison runs only where torch.cuda.is_available()"
        }
    from lab_utils import defaults

    device = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    target = defaults.hardware_from_name(GPU_TARGET)
    model_dir = llama_1b(workdir)
    report = prepare(workdir, model_dir, rows, SEED_LENGTH, run_name="bench-1b")
    section: dict = {
        "device": device,
        "device_memory_gib": round(total, 2),
        "planned_for": target.name,
        "memory_cap_gib": target.memory_gib,
        "memory_fraction": round(target.memory_gib / total, 4),
        "model": {
            "shape": "Llama-3.2-1B (random init, tied embeddings)",
            **{
                k: LLAMA_1B[k]
                for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
            },
        },
        "length_stats": report.get("length_stats"),
        "paths": {},
    }
    paths = list(paths)
    if "unsloth" in paths:
        try:
            probe = subprocess.run(
                [sys.executable, "-c", "import unsloth"],
                capture_output=True,
                text=True,
                timeout=300,
                env=_child_env(workdir),
            )
            if probe.returncode != 0:
                paths.remove("unsloth")
                last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
                section["paths"]["unsloth"] = {"skipped": f"unsloth does not import: {last[:300]}"}
        except subprocess.TimeoutExpired:
            paths.remove("unsloth")
            section["paths"]["unsloth"] = {"skipped": "import unsloth took over 300 s"}
    for path in paths:
        try:
            section["paths"][path] = compare(
                workdir, repeats, timed_rows, "bench-1b", path, GPU_TARGET, f"gpu-{path}", peers=("seed", "default")
            )
        except Exception as e:  # one path failing must not lose the other's numbers
            section["paths"][path] = {"error": str(e)[-2000:]}
    return section


# --------------------------------------------------------------------------- report


def _write(path: Path, text: str) -> None:
    """Write text to path atomically (a reader never sees half a file)."""
    from lab_utils.files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _megabatch(rows: int, batch: int) -> int:
    """Return the rows per LengthGroupedSampler mega-batch (transformers 5.17: min(rows // (4 * batch), 50) * batch)."""
    return max(1, min(rows // (batch * 4), 50)) * batch


def notes(res: dict) -> list[str]:
    """Return one line per finding: what the numbers say and why, including goals missed."""
    c, out = res["cpu"], []
    d, s = c["settings_default"], c["settings_seed"]
    effective = d["per_device_train_batch_size"] * d["gradient_accumulation_steps"]
    train_rows = c["runs"][0]["full_epoch"]["rows"]
    timed = c["runs"][0]["timed"]["rows"]
    ratio, waste, full = (
        c["tokens_per_s_ratio_default_over_seed"],
        c["padding_waste_default"],
        c["padding_waste_full_epoch_default"],
    )
    out.append(
        f"Speed: the default trains {ratio:.2f}x the seed's non-pad tokens per second "
        f"({'meets' if ratio >= GOAL_RATIO else 'misses'} the {GOAL_RATIO:.0f}x goal). The seed pads every row to "
        f"{s.get('pad_to_multiple_of')} tokens ({_pct(c['padding_waste_seed'])} of its work is padding) and runs "
        f"{next(r for r in c['runs'] if r['config'] == 'seed')['timed']['batches']} micro-batches per epoch where the default runs "
        f"{next(r for r in c['runs'] if r['config'] == 'default')['timed']['batches']}."
    )
    out.append(
        f"Padding: the default wastes {_pct(waste)} in the timed epoch ({timed} rows) and {_pct(full)} over one epoch "
        f"of all {train_rows} rows (goal <= {GOAL_WASTE:.0%}). transformers' LengthGroupedSampler sorts rows only "
        f"inside mega-batches of min(rows / (4 x {effective}), 50) x {effective} rows: {_megabatch(timed, effective)} "
        f"rows for the timed epoch, {_megabatch(train_rows, effective)} for the whole set, 800 for a FineTome-sized "
        f"set (100k rows). The fewer rows sorted together, the more a micro-batch of "
        f"{d['per_device_train_batch_size']} mixes lengths."
    )
    best, over_best = c.get("best_trl_setting"), c.get("tokens_per_s_ratio_default_over_best_trl")
    if best:
        mem = c["peak_memory_ratio_default_over_lowest"]
        fast = c["fastest"] == "default"
        out.append(
            f"Against TRL's own settings: the default trains {over_best:.2f}x the tokens per CPU-second of the best "
            f"of them ({best}; {c['tokens_per_s_ratio_default_over_best_trl_wall']:.2f}x on wall clock) and is "
            f"{'the fastest of all' if fast else 'not the fastest: ' + c['fastest'] + ' is'} (goal: fastest). "
            f"Peak memory {mem:.2f}x the lowest ({c['lowest_memory']}) "
            f"({'meets' if mem <= GOAL_MEMORY_RATIO else 'misses'} the {GOAL_MEMORY_RATIO}x goal)."
        )
    low = c.get("lowest_memory")
    if low and low != "default":
        widest = {
            n: next(r for r in c["runs"] if r["config"] == n)["estimated_peak_gib"].get("widest_batch")
            for n in ("default", low)
        }
        if all(widest.values()):
            out.append(
                f"Why the memory differs: peak memory follows the tokens of the widest micro-batch (activations "
                f"kept for the backward pass, gradient checkpointing "
                f"{'on' if d.get('gradient_checkpointing') else 'off'}): the default's widest was "
                f"{widest['default'][0]} x {widest['default'][1]} = {widest['default'][0] * widest['default'][1]} "
                f"tokens, {low}'s {widest[low][0]} x {widest[low][1]} = {widest[low][0] * widest[low][1]}. "
                "On a CPU the memory plan has the machine's RAM as budget, so choose() takes speed; on a GPU "
                "the same estimate caps the micro-batch (and turns checkpointing on) to fit the card, and on "
                "capability >= 8 packing with flash-attention is the default itself."
            )
    extra = [n for n in c.get("configs", {}) if n.startswith("default-micro")]
    if extra:
        out.append(
            "default-microN: the default at another micro-batch (same effective batch). Bigger micro-batches pad "
            "more (a row is padded to the longest of its micro-batch); smaller ones pay a fixed cost per "
            "micro-batch on a CPU (4-bit dequantization of every layer, Python overhead)."
        )
    est_s, est_d = (
        c["estimated_peak_gib_seed"]["widest_batch_gib"],
        c["estimated_peak_gib_default"]["widest_batch_gib"],
    )
    base = min(r["rss_after_load_gib"] for r in c["runs"])
    out.append(
        f"Memory: peak {c['peak_memory_gib_seed']:.2f} GiB (seed) and {c['peak_memory_gib_default']:.2f} GiB "
        f"(default) of process RSS; estimate_memory() said {est_s:.2f} and {est_d:.2f} GiB for the widest batches "
        f"(it assumes 1.0 GiB of process overhead on CPU; this process held {base:.2f} GiB after loading the model)."
    )
    return out


def markdown(res: dict) -> str:
    """Return the readable report of a results dict."""
    cpu = res["cpu"]

    ls = res["data"]["length_stats"]
    scale = SEED_LENGTH / res["max_length"]
    scale_note = (
        "the seed's own" if scale == 1 else f"the seed's {SEED_LENGTH} scaled down {scale:g}x, lengths too"
    )
    lines = [
        "# Bench: lab defaults vs the seed configuration and TRL's own efficient settings",
        "",
        f"{res['date']} · {res['machine']['platform']} · {res['machine']['cpus']} CPUs · torch {res['machine']['torch']}"
        f" · load average {res['machine']['loadavg_start']} at the start, {res.get('loadavg_end')} at the end",
        "",
        f"`{res.get('command', 'python bench/run.py')}` took {res.get('seconds', 0) / 60:.1f} min.",
        "",
        f"Model: embedded tiny Llama (4-bit nf4, LoRA r=32), max_length {res['max_length']} "
        f"({scale_note}), "
        f"{res.get('threads')} CPU thread(s) per run. Data: {ls['rows']} synthetic rows, "
        f"FineTome-like lengths: p50 {ls['p50']}, p95 {ls['p95']}, p99 {ls['p99']}, max {ls['max']}, mean {ls['mean']:.0f} tokens. "
        f"Timed: one epoch over the same {res['timed_rows']} rows per run, {res['repeats']} interleaved pairs.",
        "",
        "Speed is trained (non-pad) tokens per CPU-second of the training loop (the primary measure: on a shared "
        "machine wall clock swings with the load, CPU time much less), min and median over the repeats; "
        "wall clock beside it.",
        "",
        "| configuration | micro x accum | order / padding | tokens per CPU-s (median, best) | tokens per wall-s "
        "(median) | ratio over seed | peak memory GiB (median) | padding waste (timed / whole set) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in cpu.get("configs", {}).items():
        st = t["settings"]
        how = (
            f"packing {st.get('packing_strategy')}"
            if st.get("packing")
            else "padding-free"
            if st.get("padding_free")
            else f"pad to {st['pad_to_multiple_of']}"
            if st.get("pad_to_multiple_of")
            else "pad to longest"
        )
        bold = "**" if name == "default" else ""
        lines.append(
            f"| {bold}{name}{bold} | {st['per_device_train_batch_size']} x {st['gradient_accumulation_steps']} | "
            f"{st.get('train_sampling_strategy')}, {how} | {t['tokens_per_cpu_s']['median']:.0f}, "
            f"{t['tokens_per_cpu_s']['max']:.0f} | {t['tokens_per_s']['median']:.0f} | "
            f"{t['tokens_per_cpu_s_ratio_over_seed']:.2f}x | {t['peak_memory_gib']['median']:.2f} | "
            f"{_pct(t['padding_waste'])} / {_pct(t['padding_waste_full_epoch'])} |"
        )
    best = cpu.get("best_trl_setting")
    lines += [
        "",
        "| headline | value | goal |",
        "|---|---|---|",
        f"| padding waste seed / default (timed) | {_pct(cpu['padding_waste_seed'])} / "
        f"{_pct(cpu['padding_waste_default'])} | default ≤ {GOAL_WASTE:.0%} |",
        f"| default over seed, tokens per CPU-s (median of pairs) | **{cpu['tokens_per_s_ratio_default_over_seed']:.2f}x** "
        f"({', '.join(f'{p:.2f}' for p in cpu['tokens_per_s_ratio_pairs'])}); wall clock "
        f"{cpu.get('tokens_per_s_ratio_default_over_seed_wall', float('nan')):.2f}x | ≥ {GOAL_RATIO:.0f}x |",
    ]
    if best:
        lines += [
            f"| default over the best TRL setting ({best}) | **{cpu['tokens_per_s_ratio_default_over_best_trl']:.2f}x**; "
            f"wall clock {cpu['tokens_per_s_ratio_default_over_best_trl_wall']:.2f}x | ≥ 1 (fastest of all) |",
            f"| default's peak memory over the lowest ({cpu['lowest_memory']}) | "
            f"**{cpu['peak_memory_ratio_default_over_lowest']:.2f}x** | ≤ {GOAL_MEMORY_RATIO}x |",
        ]
    lines += [
        f"| estimate_memory() for the widest batch seen, seed / default | "
        f"{cpu['estimated_peak_gib_seed']['widest_batch_gib']:.2f} / "
        f"{cpu['estimated_peak_gib_default']['widest_batch_gib']:.2f} GiB | |",
        "",
        "Per run (in the order they ran):",
        "",
        "| config | rep | steps | seconds | CPU-s | tokens per CPU-s | tokens per wall-s | waste | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cpu["runs"]:
        lines.append(
            f"| {r['config']} | {r['rep']} | {r['optimizer_steps']} | {r['seconds']:.1f} | {r.get('cpu_seconds', 0):.1f} | "
            f"{r.get('tokens_per_cpu_s', 0):.0f} | {r['tokens_per_s']:.0f} | {_pct(r['timed']['padding_waste'])} | "
            f"{r['rss_peak_gib']:.2f} |"
        )
    if res.get("data_prep"):
        lines += ["", "## Data preparation: the lab's prepare() beside TRL's own", ""] + data_prep_markdown(
            res["data_prep"]
        )
    lines += [
        "",
        "## What `python -m lab_utils defaults --model-params 1.24e9 --max-length 2048` chooses",
        "",
        "| gpu | micro x accum | checkpointing | precision | optim | padding | attn | estimated peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in res["defaults_cli"]:
        if "error" in row:
            lines.append(f"| {row['gpu']} | error: {row['error']} | | | | | | |")
            continue
        prec = "bf16" if row.get("bf16") else "fp16" if row.get("fp16") else "fp32"
        pad = "packing (bfd), padding-free" if row.get("packing") else row.get("train_sampling_strategy")
        lines.append(
            f"| {row['gpu']} | {row['per_device_train_batch_size']} x {row['gradient_accumulation_steps']} | "
            f"{row['gradient_checkpointing']} | {prec} | {row['optim']} | {pad} | {row['attn_implementation']} | "
            f"{row['estimated_peak_gib']:.2f} |"
        )
    lines += ["", "## GPU", ""] + gpu_markdown(res["gpu"])
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def gpu_markdown(gpu: dict) -> list[str]:
    """Return the GPU section's lines: the table of a run, or why it was skipped (and the last run, if any)."""
    lines: list[str] = []
    if "skipped" in gpu:
        lines.append(f"Skipped here: {gpu['skipped']}.")
        gpu = gpu.get("last_run") or {}
        if not gpu:
            return lines
        lines += ["", f"Last GPU run ({gpu.get('date')}, `bench/results/gpu.json`):", ""]
    lines.append(
        f"{gpu['device']} capped at {gpu['memory_cap_gib']} GiB (a {gpu['planned_for']}'s memory), Llama-3.2-1B-shaped "
        f"model (random init, 4-bit), defaults chosen for a {gpu['planned_for']}; data p50 "
        f"{(gpu.get('length_stats') or {}).get('p50')}, p95 {(gpu.get('length_stats') or {}).get('p95')} tokens; "
        f"one epoch over {gpu.get('timed_rows')} rows per run."
    )
    lines += [
        "",
        "| path | micro x accum seed / default | waste seed | waste default | tok/s seed | tok/s default | "
        "ratio | peak GiB seed | peak GiB default | estimate seed | estimate default |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, p in gpu["paths"].items():
        if "skipped" in p or "error" in p:
            why = (p.get("skipped") or p.get("error") or "").replace("\n", " ").replace("|", "/")
            lines.append(f"| {path} | {why[-400:]} | | | | | | | | | |")
            continue
        s, d = p["settings_seed"], p["settings_default"]
        lines.append(
            f"| {path} | {s['per_device_train_batch_size']} x {s['gradient_accumulation_steps']} / "
            f"{d['per_device_train_batch_size']} x {d['gradient_accumulation_steps']} | "
            f"{_pct(p['padding_waste_seed'])} | {_pct(p['padding_waste_default'])} | "
            f"{p['tokens_per_s_seed_median']:.0f} | {p['tokens_per_s_default_median']:.0f} | "
            f"{p['tokens_per_s_ratio_default_over_seed']:.2f}x | {p['peak_memory_gib_seed']:.2f} | "
            f"{p['peak_memory_gib_default']:.2f} | {p['estimated_peak_gib_seed']['widest_batch_gib']:.2f} | "
            f"{p['estimated_peak_gib_default']['widest_batch_gib']:.2f} |"
        )
    lines += [
        "",
        "Peaks are `torch.cuda.max_memory_allocated`; estimates are `defaults.estimate_memory()` for the "
        "widest batch each run saw (full logits, loss_type nll: an upper bound for TRL's chunked loss).",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the bench (or one worker, with --worker); return the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every configuration")
    p.add_argument("--rows", type=int, default=2000, help="rows in the synthetic data set")
    p.add_argument("--timed-rows", type=int, default=256, help="rows each timed run trains on (one epoch)")
    p.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_BENCH_LENGTH,
        help=f"the seed's row length on CPU; {SEED_LENGTH} is the seed's own, "
        f"{DEFAULT_BENCH_LENGTH} keeps 2 cores within ~10 min (lengths scale with it)",
    )
    p.add_argument(
        "--extra-micro",
        type=int,
        nargs="*",
        default=[],
        help="also time the default at these micro-batches (same effective batch)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per worker (1: on a busy machine OpenMP's spinning threads made 2 erratic and 5-15x slower)",
    )
    p.add_argument("--prep-repeats", type=int, default=2, help="repeats of the data-preparation comparison (0: skip)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU section even when CUDA is present")
    p.add_argument("--gpu-only", action="store_true", help="run only the GPU section")
    p.add_argument("--gpu-timed-rows", type=int, default=128, help="rows each timed GPU run trains on")
    p.add_argument(
        "--gpu-rows", type=int, default=1000, help="rows in the GPU section's data set (length 2048)"
    )
    p.add_argument("--gpu-repeats", type=int, default=2, help="interleaved pairs per GPU path")
    p.add_argument("--gpu-paths", nargs="+", default=["unsloth", "plain"], choices=["unsloth", "plain"])
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.json and latest.md")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--prep-only", action="store_true", help="run only the data-preparation comparison into latest.json")
    p.add_argument(
        "--markdown-only", action="store_true", help="rewrite latest.md from latest.json, run nothing"
    )
    # internal: one configuration in its own process
    p.add_argument("--worker", choices=CONFIGS)
    p.add_argument("--result", type=Path)
    p.add_argument("--run-name", default=RUN_NAME)
    p.add_argument("--path", default="plain")
    p.add_argument("--target", default=None)
    p.add_argument("--micro", type=int, default=None)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.workdir, a.timed_rows, a.result, a.run_name, a.path, a.target, a.micro)
        return 0

    if a.prep_only:  # add the data-preparation comparison to an existing latest.json (same workdir)
        res = json.loads((a.out / "latest.json").read_text())
        workdir = a.workdir or Path(tempfile.mkdtemp(prefix="lab-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        prepare(workdir, bench_model(workdir, a.max_length), a.rows, a.max_length)
        res["data_prep"] = data_prep(
            workdir, data_file(workdir, a.rows, a.max_length), bench_model(workdir, a.max_length), a.max_length,
            a.prep_repeats or 2,
        )
        res.pop("data_prep_error", None)
        _write(a.out / "latest.json", json.dumps(res, indent=1, default=str))
        _write(a.out / "latest.md", markdown(res))
        print(f"data preparation rows per CPU-s lab/TRL {res['data_prep']['rows_per_cpu_s_ratio_lab_over_trl']:.2f}x")
        return 0
    if a.markdown_only:
        res = json.loads((a.out / "latest.json").read_text())
        if "cpu" in res:
            res["notes"] = notes(res)
            _write(a.out / "latest.json", json.dumps(res, indent=1, default=str))
        _write(a.out / "latest.md", markdown(res))
        print(f"Wrote {a.out / 'latest.md'}")
        return 0
    t0 = time.monotonic()
    for var in ("LAB_CONFIG", "LAB_RUN_NAME"):  # the bench sets its own config; a user's must not replace it
        os.environ.pop(var, None)
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="lab-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import torch

    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "platform": platform.platform(terse=True),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "command": " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "repeats": a.repeats,
        "timed_rows": a.timed_rows,
        "max_length": a.max_length,
        "threads": a.threads,
        "goals": {"padding_waste_default_max": GOAL_WASTE, "tokens_per_s_ratio_min": GOAL_RATIO},
    }
    if not a.gpu_only:
        print(f"Preparing {a.rows} FineTome-like rows in {workdir} ...", flush=True)
        report = prepare(workdir, bench_model(workdir, a.max_length), a.rows, a.max_length)
        res["data"] = {
            "rows": a.rows,
            "distribution": f"lognormal(median {LENGTH_MEDIAN}, sigma {LENGTH_SIGMA}) clipped to "
            f"[{LENGTH_MIN}, {SEED_LENGTH}] at 2048 tokens, scaled by {a.max_length}/{SEED_LENGTH}; prompt share "
            f"uniform{PROMPT_SHARE}; seed {DATA_SEED}",
            "length_stats": report["length_stats"],
        }
        print(f"CPU comparison (the tiny model), {len(CONFIGS)} configurations x {a.repeats} repeats:", flush=True)
        res["cpu"] = compare(
            workdir, a.repeats, a.timed_rows, RUN_NAME, "plain", None, "cpu", tuple(a.extra_micro), a.threads
        )
        if a.prep_repeats:
            print(f"Data preparation, lab vs TRL, {a.prep_repeats} repeats ...", flush=True)
            try:
                res["data_prep"] = data_prep(
                    workdir, data_file(workdir, a.rows, a.max_length), bench_model(workdir, a.max_length),
                    a.max_length, a.prep_repeats,
                )
            except Exception as e:  # the training comparison's numbers must not be lost with it
                res["data_prep_error"] = f"{type(e).__name__}: {e}"[-2000:]
                print(f"Data preparation comparison failed: {res['data_prep_error']}")
        res["defaults_cli"] = defaults_cli_table()
        res["notes"] = notes(res)
    if a.no_gpu:
        res["gpu"] = {"skipped": "--no-gpu given"}
    else:
        res["gpu"] = gpu_section(workdir, a.gpu_repeats, a.gpu_timed_rows, a.gpu_rows, tuple(a.gpu_paths))
        if "skipped" in res["gpu"]:
            print(f"GPU section skipped: {res['gpu']['skipped']}")
        else:
            res["gpu"].update(date=res["date"], timed_rows=a.gpu_timed_rows, repeats=a.gpu_repeats)
            _write(a.out / "gpu.json", json.dumps(res["gpu"], indent=1, default=str))
            _write(a.out / "gpu.md", "# Bench on a GPU\n\n" + "\n".join(gpu_markdown(res["gpu"])) + "\n")
    if "skipped" in res["gpu"] and (a.out / "gpu.json").exists():
        res["gpu"]["last_run"] = json.loads((a.out / "gpu.json").read_text())
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if not a.gpu_only:
        _write(a.out / "latest.json", json.dumps(res, indent=1, default=str))
        _write(a.out / "latest.md", markdown(res))
        c = res["cpu"]
        print(
            f"padding waste: seed {_pct(c['padding_waste_seed'])}, default {_pct(c['padding_waste_default'])} "
            f"(one full epoch: {_pct(c['padding_waste_full_epoch_default'])}); trained tokens per CPU-s default/seed "
            f"{c['tokens_per_s_ratio_default_over_seed']:.2f}x, default/best TRL ({c['best_trl_setting']}) "
            f"{c['tokens_per_s_ratio_default_over_best_trl']:.2f}x; peak memory default/lowest "
            f"({c['lowest_memory']}) {c['peak_memory_ratio_default_over_lowest']:.2f}x"
        )
        if res.get("data_prep"):
            print(f"data preparation rows per CPU-s lab/TRL {res['data_prep']['rows_per_cpu_s_ratio_lab_over_trl']:.2f}x")
    print(f"Wrote {a.out} in {res['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
