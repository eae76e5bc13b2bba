"""Specification of lab_utils.defaults: hardware-aware train settings and the memory estimate behind them.

Pure arithmetic: no torch import, no GPU; the whole file runs in milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lab_utils.__main__ import defaults_cli as cli
from lab_utils.defaults import (
    HARDWARE_KEYS,
    PROFILES,
    Hardware,
    backoff,
    choose,
    detect_hardware,
    estimate_memory,
    hardware_from_name,
    is_oom,
    model_shape,
    profile_for,
    sft_kwargs,
)
from lab_utils.errors import LabError

LLAMA_1B = {"model_params": 1.24e9, "max_length": 2048}  # Llama-3.2-1B, the lab's model
COLAB_CPU = Hardware("cpu", "cpu", 12.7, None, False)  # Colab's CPU runtime
BASE = dict(model_params=1.24e9, lora_r=32, max_length=2048, micro_batch=2, gradient_checkpointing=True)
SFT_FIELDS = set(HARDWARE_KEYS) - {"packing_strategy"}  # packing_strategy is set only with packing


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def peak(settings: dict, **overrides) -> float:
    """Estimated peak for the settings' own inputs with some of them changed."""
    inputs = {**settings["estimate"]["assumptions"]["inputs"], **overrides}
    return estimate_memory(**inputs).total_gib


# --- Acceptance: the three Colab machines ------------------------------------------------------


def test_t4_trains_the_1b_model_in_fp16_with_effective_batch_16_inside_15_gib():
    s = choose(hardware_from_name("T4"), **LLAMA_1B)
    assert (s["fp16"], s["bf16"]) == (True, False)
    assert s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] == 16
    assert is_power_of_two(s["per_device_train_batch_size"])
    assert is_power_of_two(s["gradient_accumulation_steps"])
    assert s["estimated_peak_gib"] <= 15
    assert s["estimated_peak_gib"] <= 0.85 * hardware_from_name("T4").memory_gib
    assert s["optim"] == "paged_adamw_8bit"
    assert s["warnings"] == []
    assert any(r.startswith("bf16: False (Tesla T4, capability 7.5 has no bf16)") for r in s["reasons"])


def test_the_plan_leaves_15_percent_of_memory_free():
    four_rows = estimate_memory(**{**BASE, "micro_batch": 4}).total_gib
    tight = Hardware("cuda", "a card where 4 rows use 92%", four_rows / 0.92, (8, 0), True)
    roomy = Hardware("cuda", "a card where 4 rows use 80%", four_rows / 0.80, (8, 0), True)
    kwargs = dict(**LLAMA_1B, attn_implementation="sdpa")  # padded rows, as in BASE
    assert choose(tight, **kwargs)["per_device_train_batch_size"] == 2
    assert choose(roomy, **kwargs)["per_device_train_batch_size"] == 4


def test_micro_batch_is_the_largest_power_of_two_that_fits():
    hw = hardware_from_name("T4")
    s = choose(hw, **LLAMA_1B)
    micro = s["per_device_train_batch_size"]
    assert peak(s) <= 0.85 * hw.memory_gib
    doubled = micro * 2
    assert peak(s, micro_batch=doubled, tokens_per_batch=doubled * 2048) > 0.85 * hw.memory_gib


def test_a100_uses_bf16_and_a_larger_micro_batch_than_t4():
    t4 = choose(hardware_from_name("T4"), **LLAMA_1B)
    a100 = choose(hardware_from_name("A100-40GB"), **LLAMA_1B)
    assert (a100["bf16"], a100["fp16"]) == (True, False)
    assert a100["per_device_train_batch_size"] > t4["per_device_train_batch_size"]
    assert a100["per_device_train_batch_size"] * a100["gradient_accumulation_steps"] == 16


def test_cpu_uses_fp32_and_plain_adamw():
    s = choose(COLAB_CPU, **LLAMA_1B)
    assert (s["fp16"], s["bf16"]) == (False, False)
    assert s["optim"] == "adamw_torch"
    assert s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] == 16


def test_cpu_micro_batch_stops_at_8_because_more_rows_only_add_padding():
    tiny = dict(model_params=983_040, hidden_size=128, num_layers=4, vocab_size=512, max_length=512)
    s = choose(COLAB_CPU, **tiny)  # the embedded tiny Llama: 16 rows would fit in memory
    assert (s["per_device_train_batch_size"], s["gradient_accumulation_steps"]) == (8, 2)
    assert any("at most 8 on a CPU" in r for r in s["reasons"])
    assert choose(hardware_from_name("A100-80GB"), **tiny)["per_device_train_batch_size"] == 16
    mine = choose(COLAB_CPU, **tiny, user={"per_device_train_batch_size": 16})
    assert (mine["per_device_train_batch_size"], mine["warnings"]) == (16, [])


def test_effective_batch_follows_the_target():
    s = choose(hardware_from_name("L4"), **LLAMA_1B, target_effective_batch=32)
    assert s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] == 32


def test_effective_batch_must_be_a_power_of_two():
    with pytest.raises(LabError, match=r"power of two, got 12 — use"):
        choose(hardware_from_name("T4"), **LLAMA_1B, target_effective_batch=12)


def test_result_keys_are_sft_fields_plus_the_explanation():
    s = choose(hardware_from_name("T4"), **LLAMA_1B)
    assert SFT_FIELDS <= set(sft_kwargs(s))
    assert not {"estimate", "reasons", "warnings", "estimated_peak_gib", "attn_implementation"} & set(
        sft_kwargs(s)
    )
    assert "group_by_length" not in s  # transformers 5 has no such TrainingArguments field
    assert s["estimate"]["total_gib"] == pytest.approx(s["estimated_peak_gib"], abs=0.01)
    assert all(isinstance(r, str) and "\n" not in r for r in s["reasons"])


# --- Padding: the reason this module exists ----------------------------------------------------


def test_ampere_and_newer_pack_with_flash_attention():
    for gpu in ("L4", "A100-40GB", "H100"):
        s = choose(hardware_from_name(gpu), **LLAMA_1B)
        assert (s["packing"], s["packing_strategy"], s["padding_free"]) == (True, "bfd", True)
        assert s["attn_implementation"] == "flash_attention_2"
        assert any(r.startswith("padding: packing=True") for r in s["reasons"])


def test_t4_and_cpu_group_by_length_because_they_have_no_flash_attention():
    for hw in (hardware_from_name("T4"), hardware_from_name("V100"), COLAB_CPU):
        s = choose(hw, **LLAMA_1B)
        assert (s["packing"], s["padding_free"]) == (False, False)
        assert s["train_sampling_strategy"] == "group_by_length"
        assert s["attn_implementation"] == "sdpa"


def test_a_non_flash_attention_rules_out_packing_even_on_an_a100():
    s = choose(hardware_from_name("A100-40GB"), **LLAMA_1B, attn_implementation="sdpa")
    assert (s["packing"], s["padding_free"], s["train_sampling_strategy"]) == (
        False,
        False,
        "group_by_length",
    )
    hub = choose(
        hardware_from_name("A100-40GB"), **LLAMA_1B, attn_implementation="kernels-community/flash-attn2"
    )
    assert hub["packing"] is True


def test_length_stats_replace_max_length_when_rows_are_shorter():
    hw = hardware_from_name("T4")
    padded = choose(hw, **LLAMA_1B)
    short = choose(hw, **LLAMA_1B, length_stats={"p50": 180, "p95": 420, "max": 512})
    assert short["estimate"]["assumptions"]["tokens_per_batch"] == short["per_device_train_batch_size"] * 512
    assert short["per_device_train_batch_size"] > padded["per_device_train_batch_size"]
    assert any("~91% of compute on padding" in r for r in short["reasons"])


def test_padding_free_memory_scales_with_real_row_lengths_not_max_length():
    hw = hardware_from_name("A100-40GB")
    user = {"packing": False, "padding_free": True}
    stats = {"p50": 200, "p95": 400, "max": 2048}
    s = choose(hw, **LLAMA_1B, length_stats=stats, user=user)
    micro = s["per_device_train_batch_size"]
    assert s["estimate"]["assumptions"]["tokens_per_batch"] == max(2048, micro * 400)
    assert s["estimate"]["assumptions"]["tokens_per_batch"] < micro * 2048
    # and TRL 1.14 refuses padding_free without packing while max_length is set: say so
    assert any("padding_free=True without packing" in w for w in s["warnings"])


def test_packed_rows_fill_max_length_whatever_the_row_lengths():
    s = choose(hardware_from_name("L4"), **LLAMA_1B, length_stats={"p50": 200, "p95": 400, "max": 512})
    assert s["estimate"]["assumptions"]["tokens_per_batch"] == s["per_device_train_batch_size"] * 2048


# --- Explicit user settings win, with a warning when they cannot work ---------------------------


def test_user_micro_batch_that_does_not_fit_wins_and_warns_with_the_fix():
    s = choose(hardware_from_name("T4"), **LLAMA_1B, user={"per_device_train_batch_size": 16})
    assert s["per_device_train_batch_size"] == 16
    assert s["gradient_accumulation_steps"] == 1  # effective batch kept
    assert s["estimated_peak_gib"] > 15
    [warning] = s["warnings"]
    assert warning.startswith("does not fit: per_device_train_batch_size=16 needs ~")
    assert "Tesla T4 has 14.8 GiB" in warning
    assert "fix: per_device_train_batch_size=2 with gradient_accumulation_steps=8" in warning


def test_user_settings_that_fit_give_no_warning():
    s = choose(
        hardware_from_name("A100-80GB"),
        **LLAMA_1B,
        user={"per_device_train_batch_size": 2, "optim": "adamw_torch"},
    )
    assert (s["per_device_train_batch_size"], s["gradient_accumulation_steps"]) == (2, 8)
    assert s["optim"] == "adamw_torch"
    assert s["estimate"]["assumptions"]["inputs"]["optim"] == "adamw_torch"  # the estimate follows it
    assert s["warnings"] == []
    assert any(r.startswith("your settings win: per_device_train_batch_size=2") for r in s["reasons"])


def test_bf16_on_a_t4_warns():
    s = choose(hardware_from_name("T4"), **LLAMA_1B, user={"bf16": True, "fp16": False})
    assert s["bf16"] is True
    assert any("has no bf16" in w and "fix: fp16: true, bf16: false" in w for w in s["warnings"])


def test_old_group_by_length_key_is_translated_with_a_warning():
    s = choose(hardware_from_name("A100-40GB"), **LLAMA_1B, user={"group_by_length": True})
    assert s["train_sampling_strategy"] == "group_by_length"
    assert "group_by_length" not in s
    assert any("train_sampling_strategy: group_by_length" in w for w in s["warnings"])


def test_a_model_too_big_for_the_gpu_warns_with_a_shorter_max_length():
    s = choose(hardware_from_name("T4"), model_params=8.03e9, max_length=8192)
    assert s["per_device_train_batch_size"] == 1 and s["gradient_checkpointing"] is True
    [warning] = s["warnings"]
    assert "even micro-batch 1" in warning and "fix: max_length: " in warning


def test_user_chunked_loss_lets_the_t4_take_a_bigger_micro_batch():
    full = choose(hardware_from_name("T4"), **LLAMA_1B)
    chunked = choose(hardware_from_name("T4"), **LLAMA_1B, user={"loss_type": "chunked_nll"})
    assert chunked["per_device_train_batch_size"] > full["per_device_train_batch_size"]


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4", True])
def test_a_nonsense_user_micro_batch_is_an_error_that_names_the_fix(bad):
    with pytest.raises(LabError, match=r"train.per_device_train_batch_size must be a whole number >= 1, got .* — e.g."):
        choose(hardware_from_name("T4"), **LLAMA_1B, user={"per_device_train_batch_size": bad})


# --- Backoff after an out-of-memory error -----------------------------------------------------


def test_backoff_keeps_the_effective_batch_until_it_cannot_back_off():
    settings = {
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "gradient_checkpointing": False,
    }
    steps = []
    while settings is not None:
        steps.append((settings["per_device_train_batch_size"], settings["gradient_checkpointing"]))
        assert settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] == 16
        settings = backoff(settings)
    assert steps == [(8, False), (4, False), (2, False), (1, False), (1, True)]


def test_backoff_does_not_change_its_input_and_explains_itself():
    settings = choose(hardware_from_name("T4"), **LLAMA_1B)
    before = json.dumps(settings, sort_keys=True)
    smaller = backoff(settings)
    assert json.dumps(settings, sort_keys=True) == before
    assert smaller is not None and smaller["reasons"][-1].startswith("backoff after out-of-memory")


def test_backoff_of_an_odd_micro_batch_keeps_the_effective_batch_exact():
    smaller = backoff({"per_device_train_batch_size": 3, "gradient_accumulation_steps": 4})
    assert smaller is not None
    assert smaller["per_device_train_batch_size"] * smaller["gradient_accumulation_steps"] == 12


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError, matched by name so is_oom needs no torch import."""


def test_is_oom_recognises_cuda_out_of_memory_errors():
    assert is_oom(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    try:
        try:
            raise OutOfMemoryError("boom")
        except OutOfMemoryError as inner:
            raise ValueError("wrapped by a callback") from inner
    except ValueError as outer:
        assert is_oom(outer)
    assert not is_oom(ValueError("shapes do not match"))
    assert not is_oom(RuntimeError("expected scalar type Half but found Float"))


# --- The memory estimate -----------------------------------------------------------------------


def test_estimate_grows_with_max_length_and_micro_batch():
    e = estimate_memory(**BASE).total_gib
    assert estimate_memory(**{**BASE, "max_length": 4096}).total_gib > e
    assert estimate_memory(**{**BASE, "micro_batch": 4}).total_gib > e


def test_estimate_shrinks_with_gradient_checkpointing():
    on = estimate_memory(**BASE)
    off = estimate_memory(**{**BASE, "gradient_checkpointing": False})
    assert on.activations_gib < off.activations_gib
    assert on.total_gib < off.total_gib


def test_estimate_parts_add_up_and_the_table_shows_each():
    e = estimate_memory(**BASE)
    parts = [e.weights_gib, e.lora_gib, e.optimizer_gib, e.gradients_gib, e.activations_gib, e.overhead_gib]
    assert e.total_gib == pytest.approx(sum(parts))
    rows = e.table().splitlines()
    assert [row.split()[0] for row in rows] == [
        "part",
        "weights",
        "lora",
        "optimizer",
        "gradients",
        "activations",
        "overhead",
        "total",
    ]


def test_full_logits_dominate_with_a_128k_vocabulary():
    e = estimate_memory(**BASE)
    # 2 rows x 2048 tokens x 128256 vocab x 12 bytes (fp32 upcast + log-softmax + gradient at the peak)
    assert e.logits_gib == pytest.approx(2 * 2048 * 128256 * 12 / 2**30)
    assert e.logits_gib > e.activations_gib / 2
    chunked = estimate_memory(**BASE, loss_type="chunked_nll")
    assert chunked.logits_gib == pytest.approx(256 * 128256 * 12 / 2**30)


def test_eight_bit_optimizer_state_is_a_quarter_of_fp32_adam():
    paged = estimate_memory(**BASE, optim="paged_adamw_8bit").optimizer_gib
    fp32 = estimate_memory(**BASE, optim="adamw_torch").optimizer_gib
    assert paged == pytest.approx(fp32 / 4)


def test_lora_covers_all_seven_projections():
    e = estimate_memory(**{**BASE, "lora_r": 16})
    # Llama-3.2-1B: hidden 2048, kv 512, MLP 8192, 16 layers; PEFT reports 11,272,192 trainable at r=16
    assert e.assumptions["lora_params"] == pytest.approx(11_272_192, rel=0.01)


def test_4bit_weights_are_about_a_third_of_16bit_for_a_1b_model():
    q4 = estimate_memory(**BASE).weights_gib
    f16 = estimate_memory(**BASE, load_in_4bit=False).weights_gib
    assert 0.3 < q4 / f16 < 0.45  # not 0.25: the 128k x 2048 embedding stays 16-bit


def test_llama_rule_recovers_llama_3_2_1b_from_its_parameter_count():
    shape = model_shape(1.24e9)
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (2048, 16, 128256)
    assert shape.intermediate_size == pytest.approx(8192, rel=0.02)
    assert shape.tied_embeddings
    given = model_shape(6.74e9, hidden_size=4096, num_layers=32, vocab_size=32000)
    assert given.derived == () and not given.tied_embeddings


def test_model_smaller_than_its_embeddings_is_an_error_naming_the_fix():
    with pytest.raises(LabError, match="smaller than the embeddings alone, got .* — check model_params"):
        estimate_memory(**{**BASE, "model_params": 1e6})


# Published numbers the estimate is checked against (see the comment at the constants in defaults.py).


@pytest.mark.parametrize(
    ("tokens", "published_gb"), [(1024, 6), (2048, 7), (4096, 9), (8192, 12), (16384, 19), (32768, 32)]
)
def test_estimate_tracks_llama_factory_qlora_7b_measurements(tokens, published_gb):
    # LLaMA-Factory wiki: LLaMA2-7B, 4-bit, LoRA r=8 on all modules, batch 1, FlashAttention-2, A100-40GB
    e = estimate_memory(
        model_params=6.74e9, hidden_size=4096, num_layers=32, vocab_size=32000, lora_r=8,
        max_length=tokens, micro_batch=1, gradient_checkpointing=True, optim="adamw_torch",
    )  # fmt: skip
    # their 2024 stack kept one more fp32 copy of the logits than transformers 5.17 does
    assert 0.80 * published_gb <= e.total_gib <= 1.0 * published_gb


def test_estimate_of_a_7b_qlora_at_batch_1_is_5_to_6_gib():
    # unsloth's minimum for 7B QLoRA is 5 GB; Mistral-7B shape, 512 tokens, r=16
    e = estimate_memory(
        model_params=7.24e9, hidden_size=4096, num_layers=32, vocab_size=32000, lora_r=16,
        max_length=512, micro_batch=1, gradient_checkpointing=True,
    )  # fmt: skip
    assert 5.0 <= e.total_gib <= 6.0


def test_llama_3_2_1b_4bit_weights_match_the_published_checkpoint_size():
    # unsloth/Llama-3.2-1B-Instruct-bnb-4bit is about 1.0 GB on disk
    assert 0.85 <= estimate_memory(**BASE).weights_gib <= 1.05


# --- Hardware and profiles ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("T4", "Tesla T4"),
        ("tesla t4", "Tesla T4"),
        ("l4", "NVIDIA L4"),
        ("a100", "NVIDIA A100-SXM4-40GB"),
        ("A100-40GB", "NVIDIA A100-SXM4-40GB"),
        ("a100_80gb", "NVIDIA A100-SXM4-80GB"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"),
        ("H100", "NVIDIA H100 80GB HBM3"),
        ("CPU", "cpu"),
    ],
)
def test_hardware_from_name_is_tolerant(name, expected):
    assert hardware_from_name(name).name == expected


def test_hardware_capability_decides_bf16():
    assert hardware_from_name("T4").capability == (7, 5) and not hardware_from_name("T4").bf16
    assert (
        hardware_from_name("L4").bf16 and hardware_from_name("A100").bf16 and hardware_from_name("H100").bf16
    )
    assert hardware_from_name("cpu").capability is None and hardware_from_name("cpu").kind == "cpu"


def test_unknown_gpu_name_lists_the_known_ones():
    with pytest.raises(LabError) as err:
        hardware_from_name("RTX 9090")
    for known in ("T4", "L4", "A100-40GB", "A100-80GB", "H100", "cpu"):
        assert known in str(err.value)
    assert "got 'RTX 9090' — use one of" in str(err.value) and "\n" not in str(err.value)


def fake_torch(
    name: str, capability: tuple[int, int], total_memory: int, bf16_supported: bool
) -> types.ModuleType:
    """A stand-in for `torch` with one CUDA device, so detect_hardware runs without a GPU or torch."""
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(
        is_available=lambda: True,
        get_device_properties=lambda i: types.SimpleNamespace(name=name, total_memory=total_memory),
        get_device_capability=lambda i: capability,
        is_bf16_supported=lambda: bf16_supported,
    )
    torch.backends = types.SimpleNamespace()
    return torch


def test_detect_hardware_reads_capability_not_is_bf16_supported(monkeypatch):
    # torch.cuda.is_bf16_supported() says True on a T4 (emulated bf16); capability 7.5 says no
    monkeypatch.setitem(sys.modules, "torch", fake_torch("Tesla T4", (7, 5), 15_835_660_288, True))
    hw = detect_hardware()
    assert hw == Hardware("cuda", "Tesla T4", 14.75, (7, 5), False)
    assert profile_for(hw) == "colab-t4"


def test_detect_hardware_falls_back_to_cpu(monkeypatch):
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_available=lambda: False)
    torch.backends = types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", torch)
    hw = detect_hardware()
    assert (hw.kind, hw.capability, hw.bf16) == ("cpu", None, False)
    assert hw.memory_gib > 0


@pytest.mark.parametrize(
    ("gpu", "profile"),
    [("T4", "colab-t4"), ("V100", "colab-t4"), ("L4", "colab-l4"), ("A100-40GB", "colab-a100"),
     ("A100-80GB", "colab-a100"), ("H100", "colab-a100"), ("cpu", "cpu-smoke")],
)  # fmt: skip
def test_profile_for_resolves_auto(gpu, profile):
    assert profile_for(hardware_from_name(gpu)) == profile


def test_profile_for_a_small_ampere_card_is_the_frugal_one():
    assert profile_for(Hardware("cuda", "NVIDIA GeForce RTX 3060", 11.8, (8, 6), True)) == "colab-t4"


def test_each_profile_is_what_choose_picks_on_its_hardware_for_its_reference_model():
    for name, profile in PROFILES.items():
        hw = COLAB_CPU if profile["hardware"] == "cpu" else hardware_from_name(profile["hardware"])
        chosen = choose(hw, **profile["reference"])
        assert {k: chosen[k] for k in profile["train"]} == profile["train"], name
        assert chosen["attn_implementation"] == profile["attn_implementation"], name
        assert chosen["warnings"] == [], name


def test_profiles_cover_the_colab_runtimes():
    assert set(PROFILES) == {"colab-t4", "colab-l4", "colab-a100", "cpu-smoke"}
    for profile in PROFILES.values():
        assert SFT_FIELDS <= set(profile["train"])
        hardware_from_name(profile["hardware"])  # a known name


# --- Command line ------------------------------------------------------------------------------


def test_cli_json_parses_and_has_the_settings(capsys):
    assert cli(["defaults", "--gpu", "T4", "--model-params", "1.24e9", "--max-length", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "fp16",
        "bf16",
        "gradient_checkpointing",
        "optim",
        "estimated_peak_gib",
        "estimate",
        "reasons",
        "warnings",
    ):
        assert key in out
    assert (
        out["fp16"] is True and out["per_device_train_batch_size"] * out["gradient_accumulation_steps"] == 16
    )


def test_cli_table_is_readable_and_takes_explicit_settings(capsys):
    argv = [
        "--gpu",
        "a100",
        "--model-params",
        "1.24B",
        "--max-length",
        "2048",
        "--set",
        "per_device_train_batch_size=4",
    ]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "NVIDIA A100-SXM4-40GB" in out and "Estimated peak:" in out and "Why:" in out
    assert "per_device_train_batch_size    4" in out


def test_cli_unknown_gpu_is_an_error_not_a_traceback(capsys):
    assert cli(["--gpu", "K80", "--model-params", "1e9", "--max-length", "512"]) == 2
    assert "unknown GPU name" in capsys.readouterr().err


def test_importing_the_module_does_not_import_torch():
    code = "import sys, lab_utils.defaults; print('torch' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert result.stdout.strip() == "False"


@pytest.mark.slow
def test_chosen_settings_are_fields_the_pinned_trl_accepts(tmp_path):
    """Imports trl (seconds): catches names like group_by_length that transformers 5 dropped."""
    import dataclasses

    from trl import SFTConfig

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    for hw in (hardware_from_name("T4"), hardware_from_name("A100-40GB"), COLAB_CPU):
        settings = sft_kwargs(choose(hw, **LLAMA_1B))
        assert set(settings) <= fields, hw.name
    for hw in (hardware_from_name("T4"), COLAB_CPU):  # bf16 ones are refused on a machine without a bf16 GPU
        config = SFTConfig(output_dir=str(tmp_path), max_length=2048, **sft_kwargs(choose(hw, **LLAMA_1B)))
        assert config.train_sampling_strategy == "group_by_length"
