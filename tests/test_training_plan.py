"""Specification of training.TrainPlan: what train_settings() hands to 02_train, the sweep and the bench."""

from __future__ import annotations

import pytest

SMALL = {"model.max_length": 128, "data.limit": 200, "train.max_steps": 4}


@pytest.fixture
def run(lab_root):
    from lab_utils.run import start

    return start("plan", form={**SMALL, "train.per_device_train_batch_size": 2}, quiet=True)


@pytest.mark.parametrize("gpu, attn, packing", [("T4", "sdpa", False), ("A100-40GB", "flash_attention_2", True)])
def test_train_settings_is_a_typed_plan_with_only_sftconfig_arguments(run, gpu, attn, packing):
    from lab_utils.defaults import HARDWARE_KEYS
    from lab_utils.hardware import hardware_from_name
    from lab_utils.training import TrainPlan, memory_table, train_settings

    plan = train_settings(run, hardware=hardware_from_name(gpu))
    assert isinstance(plan, TrainPlan)
    assert not [k for k in plan.sft if k.startswith("_")]
    assert set(HARDWARE_KEYS) - {"packing_strategy"} <= set(plan.sft)
    assert plan.sft["per_device_train_batch_size"] == 2  # the config's own setting wins
    assert plan.sft["max_steps"] == 4  # the train: section passes through
    assert (plan.attn_implementation, plan.sft["packing"]) == (attn, packing)
    assert plan.hardware.name == hardware_from_name(gpu).name
    assert plan.reasons and plan.estimated_peak_gib == plan.estimate["total_gib"]
    assert memory_table(plan)[-1]["what"].endswith(f"({plan.hardware.name})")


def test_with_sft_changes_a_copy_and_leaves_the_plan_as_it_was(run):
    from lab_utils.hardware import hardware_from_name
    from lab_utils.training import train_settings

    plan = train_settings(run, hardware=hardware_from_name("T4"))
    smaller = plan.with_sft(per_device_train_batch_size=1, gradient_accumulation_steps=32)
    assert smaller.sft["per_device_train_batch_size"] == 1
    assert plan.sft["per_device_train_batch_size"] == 2
    assert smaller.attn_implementation == plan.attn_implementation and smaller.estimate == plan.estimate


def test_under_fsdp_the_plan_and_its_memory_table_name_the_same_optimizer(run, monkeypatch):
    """FSDP-QLoRA cannot checkpoint a paged 8-bit optimizer: the chooser picks adamw_torch, and the estimate counts it."""
    from lab_utils.hardware import hardware_from_name
    from lab_utils.training import memory_table, train_settings

    paged = train_settings(run, hardware=hardware_from_name("A100-40GB"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    plan = train_settings(run, hardware=hardware_from_name("A100-40GB"))
    assert (paged.sft["optim"], plan.sft["optim"]) == ("paged_adamw_8bit", "adamw_torch")
    rows = {r["part"]: r["what"] for r in memory_table(plan)}
    assert rows["optimizer"] == "adamw_torch: 8 B/param", rows
    assert {r["part"]: r["what"] for r in memory_table(paged)}["optimizer"] == "paged_adamw_8bit: 2 B/param"
    assert plan.estimate["optimizer_gib"] > paged.estimate["optimizer_gib"]  # 8 bytes a parameter, not 2
    assert "optim: adamw_torch (FSDP shards the optimizer state instead of paging it)" in plan.reasons


def test_the_plan_estimates_with_the_configs_own_widths_not_the_llama_rule(tmp_path):
    """SmolLM2-135M's config (3 of 9 heads for k/v, MLP 1536): its real parameter and LoRA counts, as peft counts them."""
    from transformers import LlamaConfig

    from lab_utils.defaults import choose
    from lab_utils.hardware import hardware_from_name
    from lab_utils.training import _model_params

    LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49_152, tie_word_embeddings=True).save_pretrained(tmp_path)
    params, shape = _model_params({"model": {"name": str(tmp_path)}})
    assert params == 134_515_008  # transformers' count of SmolLM2-135M (make real-check)
    plan = choose(hardware_from_name("T4"), model_params=params, max_length=512, lora_r=16, **shape)
    widths = plan["estimate"]["assumptions"]["shape"]
    assert (widths["kv_size"], widths["intermediate_size"], widths["derived"]) == (192, 1536, [])
    assert plan["estimate"]["assumptions"]["lora_params"] == 4_884_480  # peft's trainable count at r=16
    ruled = choose(hardware_from_name("T4"), model_params=params, max_length=512, lora_r=16, hidden_size=576,
                   num_layers=30, vocab_size=49_152)
    assert ruled["estimate"]["assumptions"]["shape"]["kv_size"] == 144  # what the Llama rule guessed before
    assert "model: hidden 576, 30 layers, vocab 49152" in plan["reasons"]
