"""Specification of lab_utils.memory's one model-shape function: parameter and LoRA counts from a config."""

from __future__ import annotations

import pytest

from lab_utils.memory import LORA_TARGETS, shape_from_config


def _smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )


def _embedded_config():
    from transformers import AutoConfig

    from lab_utils.embedded import resolve_model

    return AutoConfig.from_pretrained(resolve_model("embedded:tiny-llama"))


def _counts(config, r: int = 16) -> tuple[int, int]:
    """Return (sum of the model's parameters, peft's trainable count at rank r on all linear layers), on meta."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return total, trainable


@pytest.mark.parametrize("make_config", [_smollm2_config, _embedded_config], ids=["smollm2-135m", "embedded-tiny"])
def test_parameter_and_lora_counts_from_a_config_equal_the_built_model(make_config):
    config = make_config()
    shape = shape_from_config(config)
    total, lora = _counts(config, r=16)
    assert shape.params() == total
    assert shape.lora_params(16) == lora


def test_smollm2_135m_known_answer():
    shape = shape_from_config(_smollm2_config())
    assert shape.params() == pytest.approx(134.5e6, rel=1e-3)
    assert shape.lora_params(16) == 4_884_480
    assert shape.lora_params(16, targets=("q_proj", "v_proj")) < shape.lora_params(16, LORA_TARGETS)
