"""Hardware-aware training defaults: what fits in memory, what runs fast, and why.

`choose()` turns (hardware, model size, max_length) into the `train:` settings that depend on the
machine, as `trl.SFTConfig` field names, with a memory estimate and one reason line per decision.
`backoff()` is the recovery step after a CUDA out-of-memory error. `import lab_utils.defaults` needs
no torch; only `detect_hardware()` imports it.

Rules (each one also appears in the result's `reasons`):

* Precision: `bf16` where the GPU has it (compute capability >= 8.0: L4, A100, H100); `fp16` on
  older GPUs (T4 7.5, V100 7.0); neither on CPU/MPS (fp32). `torch.cuda.is_bf16_supported()` is not
  used: it says True on a T4 because bf16 can be emulated there, slowly.
* Optimizer: `paged_adamw_8bit` on CUDA (bitsandbytes, 2 bytes of state per trainable parameter,
  paged to CPU RAM during spikes); `adamw_torch` on CPU/MPS (bitsandbytes' paged optimizers need CUDA).
* Micro-batch: the largest power of two <= the target effective batch whose estimated peak fits
  85% of device memory with gradient checkpointing on, and at most 8 on a CPU (CPU_MAX_MICRO_BATCH:
  more rows add no speed there, only padding); `gradient_accumulation_steps` makes up the rest, so
  micro * accumulation == target. Checkpointing stays on only if that micro-batch does not fit
  without it (it costs about one extra forward pass, ~30% more compute).
* Padding, read from the installed trl 1.14.2 and transformers 5.17.0:
  - `SFTConfig(padding_free=True)` flattens a micro-batch into one row with `position_ids` and no
    attention mask. TRL only warns (does not refuse) when the attention implementation is not one of
    `trl.trainer.sft_trainer.FLASH_ATTENTION_VARIANTS` ("flash_attention_2", "flash_attention_3",
    "kernels-community/flash-attn2", "kernels-community/flash-attn3",
    "kernels-community/vllm-flash-attn3"). `packing=True` with `packing_strategy="bfd"` (or
    "bfd_split") switches padding_free on by itself. `padding_free=True` without packing while
    `max_length` is set raises ValueError in `SFTTrainer.__init__` (max_length would not be enforced).
  - With sdpa or eager, transformers 5.17 is *not* silently wrong for Llama-style models:
    `masking_utils.find_packed_sequence_indices` reads the position_ids and builds a block-diagonal
    causal mask. Checked on a tiny Llama: packed logits equal per-row logits to 2e-7 with sdpa and
    eager. Two catches: that path runs only when no KV cache is built (`use_cache=False`, which TRL's
    `compute_loss` sets; a plain forward with the default `use_cache=True` mixes the rows, max logit
    error 0.39 in the same check), and the mask is dense over the flattened micro-batch, (micro *
    len)^2 entries, so sdpa loses its flash kernel and eager stores heads * (micro * len)^2 scores.
    Correct but slow and memory-hungry: padding-free is only worth it with flash-attention kernels.
  - Flash-attention 2 needs compute capability >= 8.0. transformers 5.17 loads
    `attn_implementation="flash_attention_2"` from the flash-attn package or, without it, from the
    `kernels` package (`kernels-community/flash-attn2`).
  - So: CUDA with capability >= 8.0 -> `packing=True, packing_strategy="bfd"` (padding_free on, no
    padding, no cross-row attention) and the result's `attn_implementation="flash_attention_2"` for
    model loading. Note: the effective batch then counts packed rows of up to max_length tokens, not
    examples, so a run has fewer, fuller steps than the same data unpacked.
  - Otherwise (T4, V100, CPU, or a non-flash attn_implementation) -> length grouping:
    `train_sampling_strategy="group_by_length"`. transformers 5 removed
    `TrainingArguments.group_by_length` (`SFTConfig(group_by_length=True)` raises TypeError); the
    sampler is now chosen by `train_sampling_strategy`. Length grouping is correct with any
    attention; TRL's collator pads each micro-batch only to its own longest row, and
    `LengthGroupedSampler` puts the longest batch first, so an OOM shows at step 1.
  - unsloth (the GPU fast path) has its own attention kernels and padding-free handling; nothing
    here depends on it.
* Memory model: see `estimate_memory()`; the comparison with published numbers is next to its
  constants below.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import problem
from .hardware import GIB, KNOWN_GPU_NAMES, Hardware, detect_hardware, hardware_from_name  # noqa: F401 (re-exported)
from .memory import (  # noqa: F401 (re-exported: moved to memory.py)
    LORA_TARGETS,
    MemoryEstimate,
    ModelShape,
    _check_positive,
    _optimizer_bytes,
    estimate_memory,
    model_shape,
)

BUDGET_FRACTION = 0.85  # plan to this share of device memory; the rest absorbs estimate error
# A CPU gains nothing from micro-batches past 8 rows, while length-grouped rows are padded to the
# longest of their micro-batch. `make bench` (tiny model, FineTome-like lengths, one thread):
# micro-batch 16 x 1 trained 1180-1300 tokens/s with 6.3% padding over an epoch, 8 x 2 trained
# 1080-1410 tokens/s with 3.0%, 4 x 4 1105 tokens/s with 1.3% (per-micro-batch overhead wins there).
CPU_MAX_MICRO_BATCH = 8


# Profile defaults for the `train:` section (SFTConfig field names), with the hardware they expect
# and the model they were sized for. tests/test_defaults.py checks each against choose().
_REFERENCE_1B = {"model_params": 1.24e9, "max_length": 2048, "lora_r": 32, "target_effective_batch": 16}
PROFILES: dict[str, dict] = {
    "colab-t4": {
        "hardware": "T4",
        "reference": _REFERENCE_1B,
        "attn_implementation": "sdpa",
        "train": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 8,
            "gradient_checkpointing": True,
            "fp16": True,
            "bf16": False,
            "optim": "paged_adamw_8bit",
            "padding_free": False,
            "packing": False,
            "train_sampling_strategy": "group_by_length",
        },
    },
    "colab-l4": {
        "hardware": "L4",
        "reference": _REFERENCE_1B,
        "attn_implementation": "flash_attention_2",
        "train": {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 4,
            "gradient_checkpointing": True,
            "fp16": False,
            "bf16": True,
            "optim": "paged_adamw_8bit",
            "padding_free": True,
            "packing": True,
            "packing_strategy": "bfd",
            "train_sampling_strategy": "random",
        },
    },
    "colab-a100": {
        "hardware": "A100-40GB",
        "reference": _REFERENCE_1B,
        "attn_implementation": "flash_attention_2",
        "train": {
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "gradient_checkpointing": True,
            "fp16": False,
            "bf16": True,
            "optim": "paged_adamw_8bit",
            "padding_free": True,
            "packing": True,
            "packing_strategy": "bfd",
            "train_sampling_strategy": "random",
        },
    },
    "cpu-smoke": {
        "hardware": "cpu",
        # a SmolLM2-135M-sized model in fp32, short rows, small batches: plumbing, not quality
        "reference": {
            "model_params": 1.35e8,
            "hidden_size": 576,
            "num_layers": 30,
            "vocab_size": 49_152,
            "max_length": 512,
            "lora_r": 8,
            "target_effective_batch": 4,
            "load_in_4bit": False,
        },
        "attn_implementation": "sdpa",
        "train": {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False,
            "fp16": False,
            "bf16": False,
            "optim": "adamw_torch",
            "padding_free": False,
            "packing": False,
            "train_sampling_strategy": "group_by_length",
        },
    },
}


def profile_for(hardware: Hardware) -> str:
    """Return the PROFILES name that LAB_PROFILE=auto means on this hardware."""
    if hardware.kind != "cuda":
        return "cpu-smoke"
    for name in ("colab-a100", "colab-l4", "colab-t4"):
        expected = hardware_from_name(PROFILES[name]["hardware"])
        if hardware.memory_gib >= 0.95 * expected.memory_gib and (hardware.bf16 or not expected.bf16):
            return name
    return "colab-t4"  # a smaller CUDA card: the most frugal profile; choose() sizes the batch


# --- Choosing settings -------------------------------------------------------------------------

FLASH_ATTENTION_VARIANTS = frozenset(
    {
        # trl.trainer.sft_trainer.FLASH_ATTENTION_VARIANTS (trl 1.14.2), plus the name one loads them by
        "flash_attention_2",
        "flash_attention_3",
        "kernels-community/flash-attn2",
        "kernels-community/flash-attn3",
        "kernels-community/vllm-flash-attn3",
    }
)
# Keys choose() returns that are not SFTConfig fields; sft_kwargs() drops them.
NON_SFT_KEYS = ("attn_implementation", "estimated_peak_gib", "estimate", "reasons", "warnings")
# The train: settings chosen from the hardware unless the config sets them: the one list (training reads it too).
HARDWARE_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "fp16",
    "bf16",
    "optim",
    "padding_free",
    "packing",
    "packing_strategy",
    "train_sampling_strategy",
)


def sft_kwargs(settings: dict) -> dict:
    """Return settings without the keys that are not SFTConfig fields (estimate, reasons, ...)."""
    return {k: v for k, v in settings.items() if k not in NON_SFT_KEYS}


def _is_int(value: Any) -> bool:
    """Return True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_power_of_two(n: Any) -> bool:
    """Return True for 1, 2, 4, 8, ..."""
    return _is_int(n) and n > 0 and n & (n - 1) == 0


def _uses_flash(attn_implementation: str) -> bool:
    """Return True if the attention implementation keeps packed rows apart without a dense mask."""
    return attn_implementation.split("@")[0].split(":")[0] in FLASH_ATTENTION_VARIANTS


def _row_tokens(settings: dict, max_length: int, length_stats: dict | None, micro: int) -> tuple[int, str]:
    """Return tokens in the largest micro-batch of `micro` rows, and how that number was reached."""
    stats = length_stats or {}
    longest = min(max_length, int(stats.get("max", max_length)))
    src = "length_stats max" if "max" in stats and longest < max_length else "max_length"
    if settings.get("packing"):
        return micro * max_length, f"{micro} packed rows x max_length {max_length}"
    if settings.get("padding_free"):
        # One flattened row holding the batch's real tokens: the mean sets the throughput, but the peak
        # is a heavy batch, so plan for p95-long rows (and never less than one longest row).
        p95 = min(longest, int(stats.get("p95", longest)))
        tokens = min(micro * longest, max(longest, micro * p95))
        return tokens, f"padding-free: {micro} rows x p95 {p95} tokens (at least one {src} row)"
    return micro * longest, f"{micro} rows padded to the longest, {longest} ({src})"


@dataclass
class _Choice:
    """choose()'s working state: the machine and its budget, the settings so far, and a line for each decision."""

    hardware: Hardware
    max_length: int
    length_stats: dict | None
    fsdp: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # estimate_memory() inputs that do not vary with the batch

    @property
    def cuda(self) -> bool:
        """Return True on a CUDA GPU."""
        return self.hardware.kind == "cuda"

    @property
    def budget(self) -> float:
        """Return the GiB the plan may use: BUDGET_FRACTION of the device's memory."""
        return BUDGET_FRACTION * self.hardware.memory_gib

    @property
    def cap_text(self) -> str:
        """Return "capability 7.5" on a GPU, else the device kind."""
        cap = self.hardware.capability
        return f"capability {cap[0]}.{cap[1]}" if cap else self.hardware.kind

    @property
    def flash_capable(self) -> bool:
        """Return True on a GPU that runs flash-attention kernels (capability >= 8.0, flash-attn installed)."""
        return self.flash_gpu and self.hardware.flash_attn

    @property
    def flash_gpu(self) -> bool:
        """Return True on a GPU whose capability (>= 8.0) runs flash-attention kernels."""
        cap = self.hardware.capability
        return self.cuda and cap is not None and cap >= (8, 0)

    def estimate(self, micro: int, gc: bool) -> MemoryEstimate:
        """Return the memory estimate of these settings at micro-batch `micro`, checkpointing `gc`."""
        tokens, _ = _row_tokens(self.settings, self.max_length, self.length_stats, micro)
        return estimate_memory(
            **self.model,
            max_length=self.max_length,
            micro_batch=micro,
            gradient_checkpointing=gc,
            optim=str(self.settings["optim"]),
            tokens_per_batch=tokens,
        )

    def largest_fitting(self, cap: int, gc: bool) -> int | None:
        """Return the largest power-of-two micro-batch <= cap that fits the budget, or None."""
        micro = cap
        while micro >= 1:
            if self.estimate(micro, gc).total_gib <= self.budget:
                return micro
            micro //= 2
        return None


def choose(
    hardware: Hardware,
    *,
    model_params: float,
    max_length: int,
    lora_r: int = 32,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    target_effective_batch: int = 16,
    length_stats: dict | None = None,
    user: dict | None = None,
    load_in_4bit: bool = True,
    lora_dropout: float = 0.0,
    attn_implementation: str | None = None,
    fsdp: bool = False,
    shape: dict | None = None,
) -> dict:
    """Return the chosen train settings (SFTConfig field names) with estimate, reasons and warnings.

    Keys: per_device_train_batch_size, gradient_accumulation_steps, gradient_checkpointing, fp16,
    bf16, optim, padding_free, packing, packing_strategy, train_sampling_strategy (SFTConfig fields);
    attn_implementation (for loading the model: "flash_attention_2" where packing was chosen);
    estimated_peak_gib, estimate (MemoryEstimate as a dict), reasons (one line per decision) and
    warnings (one line per explicit user setting that will not fit or not work: what, estimate vs
    memory, fix). `sft_kwargs(result)` keeps only the SFTConfig fields.

    `user` holds settings the user set explicitly (SFTConfig names); they win. `loss_type` in it
    changes the plan; by default the plan assumes full logits ("nll"), an upper bound that also
    holds for TRL 1.14's default "chunked_nll". `length_stats` ({"p50", "p95", "max"}: tokens per
    row) replaces max_length with the real longest row. `attn_implementation` is what the model will
    be loaded with, if already decided; a non-flash one rules out packing. `fsdp`: launched with an
    FSDP config, where the optimizer state is sharded, not paged (the estimate then counts its bytes).
    `shape`: the model's real widths (memory.ModelShape as a dict, from its config.json), where known.
    """
    _check_choose_inputs(model_params, max_length, lora_r, target_effective_batch, length_stats)
    c = _Choice(hardware, max_length, length_stats, fsdp=fsdp)
    user = _renamed_user_keys(c, dict(user or {}))
    c.reasons.append(
        f"hardware: {hardware.name}, {hardware.memory_gib:.1f} GiB, {c.cap_text} "
        f"-> plan to {BUDGET_FRACTION:.0%} = {c.budget:.1f} GiB"
    )
    _precision(c)
    attn = _padding(c, attn_implementation)
    _user_settings_win(c, user)
    loss_type = user.get("loss_type", "nll")
    c.model = dict(
        model_params=model_params,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        shape=shape,
        lora_r=lora_r,
        load_in_4bit=load_in_4bit,
        loss_type=loss_type,
        lora_dropout=lora_dropout,
        dtype_bytes=2 if c.cuda else 4,
        device_kind="cuda" if c.cuda else "cpu",
    )
    cap = min(target_effective_batch, CPU_MAX_MICRO_BATCH) if hardware.kind == "cpu" else target_effective_batch
    micro, accum, gc = _batch_geometry(c, user, cap, target_effective_batch)
    final = c.estimate(micro, gc)
    _explain_estimate(c, final, micro, model_params, loss_type)
    _warnings(c, user, final, micro * accum, cap, attn)
    result = {k: c.settings[k] for k in HARDWARE_KEYS if k in c.settings}
    result["attn_implementation"] = attn
    result["estimated_peak_gib"] = round(final.total_gib, 2)
    result["estimate"] = _rounded(asdict(final))
    result["reasons"] = c.reasons
    result["warnings"] = c.warnings
    return result


def _check_choose_inputs(
    model_params: float, max_length: int, lora_r: int, target_effective_batch: int, length_stats: dict | None
) -> None:
    """Raise a LabError naming the first input choose() cannot plan with."""
    _check_positive(model_params=model_params, max_length=max_length, lora_r=lora_r)
    if not _is_power_of_two(target_effective_batch):
        raise problem("target_effective_batch must be a power of two", got=repr(target_effective_batch), fix="use 8, 16 or 32")
    for key, value in (length_stats or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise problem(
                f"length_stats[{key!r}] must be a positive token count",
                got=repr(value),
                fix="pass e.g. {'p50': 310, 'p95': 900, 'max': 2048}",
            )


def _renamed_user_keys(c: _Choice, user: dict) -> dict:
    """Return user with transformers 4's group_by_length turned into train_sampling_strategy (and a warning)."""
    if "group_by_length" in user:
        wanted = user.pop("group_by_length")
        user.setdefault("train_sampling_strategy", "group_by_length" if wanted else "random")
        c.warnings.append(
            f"group_by_length={wanted!r} is not a field in transformers 5 (SFTConfig raises TypeError) — "
            f"train_sampling_strategy: {user['train_sampling_strategy']} (used here)"
        )
    return user


def _precision(c: _Choice) -> None:
    """Step 1: fp16/bf16 from the compute capability, and the optimizer the device can run."""
    hw, cuda = c.hardware, c.cuda
    c.settings["fp16"] = cuda and not hw.bf16
    c.settings["bf16"] = cuda and hw.bf16
    if not cuda:
        c.reasons.append(f"bf16: False, fp16: False ({hw.name}: no CUDA mixed precision) -> fp32")
    elif hw.bf16:
        c.reasons.append(f"bf16: True ({hw.name}, {c.cap_text} has bf16) -> bf16, no loss scaling")
    else:
        c.reasons.append(f"bf16: False ({hw.name}, {c.cap_text} has no bf16) -> fp16")
    c.settings["optim"] = "paged_adamw_8bit" if cuda and not c.fsdp else "adamw_torch"
    if c.fsdp:  # peft: FSDP-QLoRA cannot checkpoint a paged/8-bit optimizer
        why = "(FSDP shards the optimizer state instead of paging it)"
    else:
        why = "(8-bit Adam states, paged to CPU RAM during spikes)" if cuda else "(bitsandbytes' paged 8-bit optimizers need CUDA)"
    c.reasons.append(f"optim: {c.settings['optim']} {why}")


def _padding(c: _Choice, attn_implementation: str | None) -> str:
    """Step 2: packing with flash-attention where the GPU has it, else length grouping; return the attention."""
    max_length, length_stats = c.max_length, c.length_stats
    if c.flash_capable and (attn_implementation is None or _uses_flash(attn_implementation)):
        c.settings.update(
            padding_free=True, packing=True, packing_strategy="bfd", train_sampling_strategy="random"
        )
        attn = attn_implementation or "flash_attention_2"
        per_row = ""
        if length_stats and length_stats.get("p50"):
            per_row = f", ~{max(1, max_length // int(length_stats['p50']))} median rows per packed row"
        c.reasons.append(
            f"padding: packing=True, packing_strategy=bfd, padding_free=True ({c.cap_text} runs flash-attention; "
            f"load the model with attn_implementation='{attn}') -> no padding and no cross-row attention; "
            f"the effective batch counts packed rows of <= {max_length} tokens, not examples{per_row}"
        )
    else:
        c.settings.update(padding_free=False, packing=False, train_sampling_strategy="group_by_length")
        attn = attn_implementation or "sdpa"
        why = (
            f"attn_implementation={attn_implementation!r} is not flash-attention"
            if c.flash_capable
            else f"{c.cap_text} runs flash-attention but the flash-attn package is not installed "
            "(pip install flash-attn, then packing is chosen)"
            if c.flash_gpu
            else f"{c.cap_text}: no flash-attention kernels"
            if c.cuda
            else f"{c.hardware.name}: no flash-attention"
        )
        c.reasons.append(
            f"padding: train_sampling_strategy=group_by_length ({why}; padding-free would need a dense "
            "(micro x len)^2 mask) -> rows of similar length share a micro-batch, padded only to the "
            "longest of them; correct with any attention; the longest batch runs first"
        )
    if length_stats and length_stats.get("p50"):
        waste = 1 - min(int(length_stats["p50"]), max_length) / max_length
        c.reasons.append(
            f"rows: p50 {length_stats.get('p50')}, p95 {length_stats.get('p95', '?')}, max "
            f"{length_stats.get('max', '?')} tokens; padding every row to {max_length} would spend "
            f"~{waste:.0%} of compute on padding"
        )
    return attn


def _user_settings_win(c: _Choice, user: dict) -> None:
    """Step 3: the user's explicit hardware keys replace the chosen ones (packing off takes padding_free with it)."""
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if key in user and not (_is_int(user[key]) and user[key] >= 1):
            raise problem(f"train.{key} must be a whole number >= 1", got=repr(user[key]), fix=f"e.g. {key}: 2")
    settings = c.settings
    overridden = {k: user[k] for k in HARDWARE_KEYS if k in user and user[k] != settings.get(k)}
    settings.update({k: user[k] for k in HARDWARE_KEYS if k in user})
    if not settings["packing"] and settings["padding_free"] and "padding_free" not in user:
        settings["padding_free"] = False  # chosen only as part of packing, which the user turned off
        if "train_sampling_strategy" not in user:
            settings["train_sampling_strategy"] = "group_by_length"
    if overridden:
        c.reasons.append("your settings win: " + ", ".join(f"{k}={v!r}" for k, v in overridden.items()))


def _batch_geometry(c: _Choice, user: dict, cap: int, target: int) -> tuple[int, int, bool]:
    """Step 4: return (micro-batch, accumulation, checkpointing): the largest micro-batch that fits, then the rest."""
    settings, budget = c.settings, c.budget
    user_micro = "per_device_train_batch_size" in user
    user_gc = "gradient_checkpointing" in user
    plan_gc = bool(settings["gradient_checkpointing"]) if user_gc else True
    if user_micro:
        micro = int(settings["per_device_train_batch_size"])
        why_micro = "your setting"
    else:
        micro = c.largest_fitting(cap, plan_gc) or 1
        if micro == cap < target:
            why_micro = f"at most {cap} on a CPU: more rows per micro-batch add no speed there, only padding and memory"
        elif micro < target:
            over = c.estimate(micro * 2, plan_gc).total_gib
            why_micro = (
                f"largest power of two that fits: {micro * 2} would need ~{over:.1f} GiB > {budget:.1f} GiB"
            )
        else:
            why_micro = "the whole effective batch fits in one micro-batch"
    if user_gc:
        gc = bool(settings["gradient_checkpointing"])
        why_gc = "your setting"
    else:
        without = c.estimate(micro, False).total_gib
        gc = without > budget
        why_gc = (
            f"micro-batch {micro} without it needs ~{without:.1f} GiB > {budget:.1f} GiB; costs ~30% more compute"
            if gc
            else f"micro-batch {micro} fits without it (~{without:.1f} GiB), saving the ~30% recompute"
        )
    if "gradient_accumulation_steps" in user:
        accum = int(settings["gradient_accumulation_steps"])
    else:
        accum = max(1, target // micro)
    settings["per_device_train_batch_size"] = micro
    settings["gradient_accumulation_steps"] = accum
    settings["gradient_checkpointing"] = gc
    c.reasons.append(
        f"per_device_train_batch_size: {micro} x gradient_accumulation_steps {accum} = effective batch "
        f"{micro * accum} ({why_micro})"
    )
    c.reasons.append(f"gradient_checkpointing: {gc} ({why_gc})")
    return micro, accum, gc


def _explain_estimate(c: _Choice, final: MemoryEstimate, micro: int, model_params: float, loss_type: str) -> None:
    """Step 5: reason lines for the model shape, tokens per micro-batch, the logits and the estimated peak."""
    tokens, how = _row_tokens(c.settings, c.max_length, c.length_stats, micro)
    shape = final.assumptions["shape"]
    derived = (
        f" (derived from {model_params / 1e9:.3g}B params by the Llama rule)" if shape["derived"] else ""
    )
    c.reasons.append(
        f"model: hidden {shape['hidden_size']}, {shape['num_layers']} layers, vocab {shape['vocab_size']}{derived}"
    )
    c.reasons.append(f"tokens per micro-batch at the peak: {tokens} ({how})")
    if loss_type == "chunked_nll":
        c.reasons.append("logits: loss_type=chunked_nll keeps 256 tokens' logits at a time")
    else:
        chunked = estimate_memory(**{**_estimate_kwargs(final), "loss_type": "chunked_nll"})
        c.reasons.append(
            f"logits: planned for full fp32 logits (loss_type={loss_type}): {final.logits_gib:.1f} GiB of the peak; "
            f"TRL 1.14's default loss_type=chunked_nll would peak at ~{chunked.total_gib:.1f} GiB instead"
        )
    c.reasons.append(f"estimated peak: {final.total_gib:.2f} GiB of {c.hardware.memory_gib:.2f} GiB")


def _warnings(c: _Choice, user: dict, final: MemoryEstimate, effective: int, cap: int, attn: str) -> None:
    """Step 6: one warning per explicit setting that will not fit or not work, each with its fix."""
    settings, hw, budget, cuda = c.settings, c.hardware, c.budget, c.cuda
    optim = str(settings["optim"])
    if final.total_gib > budget:
        c.warnings.append(_does_not_fit(c, user, final, effective, cap))
    if settings["bf16"] and not hw.bf16:
        c.warnings.append(
            f"bf16=True but {hw.name} ({c.cap_text}) has no bf16: it is emulated or refused — "
            f"{'fp16: true, bf16: false' if cuda else 'bf16: false'}"
        )
    if settings["fp16"] and not cuda:
        c.warnings.append(f"fp16=True on {hw.name}: fp16 mixed precision needs CUDA — fp16: false")
    if settings["fp16"] and settings["bf16"]:
        c.warnings.append("fp16=True and bf16=True: pick one — keep bf16 where the GPU has it, else fp16")
    if not cuda and "paged" in optim:
        c.warnings.append(f"optim={optim} on {hw.name}: paged optimizers need CUDA — optim: adamw_torch")
    if settings["padding_free"] and not settings["packing"]:
        c.warnings.append(
            "padding_free=True without packing: TRL 1.14 raises ValueError while max_length is set — "
            "packing: true (packing_strategy: bfd), or max_length: null with rows truncated beforehand"
        )
    if (settings["padding_free"] or settings["packing"]) and not _uses_flash(attn):
        c.warnings.append(
            f"padding_free/packing with attn_implementation={attn!r}: correct in transformers 5.17 only through a "
            f"dense (micro x len)^2 mask, slow and memory-hungry — "
            + (
                "load the model with attn_implementation='flash_attention_2'"
                if c.flash_capable
                else "train_sampling_strategy: group_by_length, padding_free: false, packing: false"
            )
        )


def _does_not_fit(c: _Choice, user: dict, final: MemoryEstimate, effective: int, cap: int) -> str:
    """Return the warning for a plan over budget: what does not fit, and the fix (a smaller geometry or max_length)."""
    explicit = [k for k in ("per_device_train_batch_size", "gradient_checkpointing") if k in user]
    fit_micro = c.largest_fitting(cap, True) if explicit else None
    if fit_micro is not None:
        fix = (
            f"per_device_train_batch_size={fit_micro} with gradient_accumulation_steps="
            f"{max(1, effective // fit_micro)} (same effective batch) and gradient_checkpointing=True, "
            "or drop these settings and let the profile choose"
        )
    else:
        fix = _shorter_max_length_fix(c.estimate, c.max_length, c.budget)
    what = (
        ", ".join(f"{k}={user[k]}" for k in explicit)
        if explicit
        else f"even micro-batch 1 with gradient checkpointing at max_length {c.max_length}"
    )
    return (
        f"does not fit: {what} needs ~{final.total_gib:.1f} GiB, {c.hardware.name} has "
        f"{c.hardware.memory_gib:.1f} GiB (plan {c.budget:.1f}) — {fix}"
    )


def _estimate_kwargs(est: MemoryEstimate) -> dict:
    """Return the estimate_memory() keyword arguments that reproduce `est` (kept in its assumptions)."""
    return dict(est.assumptions["inputs"])


def _shorter_max_length_fix(estimate: Any, max_length: int, budget: float) -> str:
    """Return a fix line naming the longest power-of-two max_length that fits at micro-batch 1."""
    base = _estimate_kwargs(estimate(1, True))
    length = 1 << ((max_length - 1).bit_length() - 1) if max_length > 1 else 0
    while length >= 64:
        if estimate_memory(**{**base, "max_length": length, "tokens_per_batch": length}).total_gib <= budget:
            return f"max_length: {length} (fits at micro-batch 1 with checkpointing), a smaller model, or a bigger GPU"
        length //= 2
    return "a smaller model or a bigger GPU (nothing from max_length 64 up fits)"


def _rounded(value: Any) -> Any:
    """Return value with floats rounded to 3 decimals, recursively (for JSON output)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


# --- After an out-of-memory error --------------------------------------------------------------


def backoff(settings: dict) -> dict | None:
    """Return settings one step smaller after a CUDA OOM (same effective batch), or None at the floor.

    Halves per_device_train_batch_size and doubles gradient_accumulation_steps; at micro-batch 1 it
    turns gradient_checkpointing on; with both already there it returns None. Missing keys take
    SFTConfig's defaults (8, 1, True). The estimate keys are left as they were: they were too low.
    """
    micro = int(settings.get("per_device_train_batch_size", 8))
    accum = int(settings.get("gradient_accumulation_steps", 1))
    gc = bool(settings.get("gradient_checkpointing", True))
    new = dict(settings)
    if micro > 1:
        # an odd micro-batch (set by hand) drops to 1 so that micro * accumulation stays exact
        new_micro = micro // 2 if micro % 2 == 0 else 1
        new["per_device_train_batch_size"] = new_micro
        new["gradient_accumulation_steps"] = accum * micro // new_micro
        step = (
            f"per_device_train_batch_size {micro} -> {new_micro}, "
            f"gradient_accumulation_steps {accum} -> {new['gradient_accumulation_steps']}"
        )
    elif not gc:
        new["gradient_checkpointing"] = True
        step = "gradient_checkpointing False -> True at micro-batch 1"
    else:
        return None
    new["reasons"] = [*settings.get("reasons", []), f"backoff after out-of-memory: {step}"]
    return new


def is_oom(exc: BaseException) -> bool:
    """Return True if exc (or an exception it was raised from) is an out-of-memory error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # torch.OutOfMemoryError (alias torch.cuda.OutOfMemoryError), matched by name: no torch import
        if any(cls.__name__ == "OutOfMemoryError" for cls in type(current).__mro__):
            return True
        if isinstance(current, (RuntimeError, MemoryError)) and re.search(
            r"out of memory|CUBLAS_STATUS_ALLOC_FAILED", str(current), re.IGNORECASE
        ):
            return True
        current = current.__cause__ or current.__context__
    return False
