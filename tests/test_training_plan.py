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
