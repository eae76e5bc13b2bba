"""Loading the tokenizer, the 4-bit base model and its LoRA adapter — unsloth on a GPU, plain otherwise.

Both paths read the same config and produce a PEFT model whose checkpoints and adapters have
the same format, so a run started on one path resumes on the other.
"""

from __future__ import annotations

from typing import Any

from .embedded import EMBEDDED_MODEL, resolve_model, tokenizer_dir
from .errors import LabError

__all__ = ["load_tokenizer", "load_base_model", "add_lora", "load_for_training", "compute_dtype", "model_source"]

# What "all-linear" means for a Llama-style decoder: every projection, never the LM head.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_source(cfg: dict) -> str:
    """Return the path or hub id the model weights load from (embedded names resolved)."""
    return resolve_model(cfg["model"]["name"])


def _friendly_load_error(what: str, name: str, e: Exception) -> LabError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return LabError(
        f"{what} {name!r} could not be loaded ({text[:160]}) — check the spelling of the hub id or the folder, "
        "your connection, and HF_TOKEN for gated models"
    )


def load_tokenizer(cfg: dict):
    """Return the run's tokenizer (model.tokenizer or model.name), with a pad token set."""
    from transformers import AutoTokenizer

    name = cfg["model"].get("tokenizer") or cfg["model"]["name"]
    # the embedded model's tokenizer ships as files: 01_data never needs to build the weights
    source = str(tokenizer_dir()) if name == EMBEDDED_MODEL else resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(
            source,
            trust_remote_code=bool(cfg["model"].get("trust_remote_code")),
            revision=cfg["model"].get("revision"),
        )
    except Exception as e:
        raise _friendly_load_error("tokenizer", name, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    from .chat import ensure_chat_template

    if ensure_chat_template(tok):
        print(f"The tokenizer of {name!r} has no chat template: using the lab's default ChatML template.")
    return tok


def compute_dtype(device: str | None = None):
    """Return the dtype for 4-bit compute: bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_base_model(cfg: dict, *, four_bit: bool | None = None, dtype=None, attn_implementation: str | None = None):
    """Return the base causal LM: 4-bit nf4 with double quantization (as configured), or plain weights."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = cfg["model"]["name"]
    four_bit = cfg["model"].get("load_in_4bit", True) if four_bit is None else four_bit
    cdtype = dtype or compute_dtype()
    kwargs: dict[str, Any] = {
        "trust_remote_code": bool(cfg["model"].get("trust_remote_code")),
        "revision": cfg["model"].get("revision"),
        "dtype": cdtype,
    }
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # NormalFloat4: the QLoRA paper's data type for normal-ish weights
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants too (~0.4 bit/param saved)
            bnb_4bit_compute_dtype=cdtype,
        )
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(model_source(cfg), **kwargs)
    except Exception as e:
        raise _friendly_load_error("model", name, e) from None
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel the first time
    # it runs without gradients (an evaluation), and training then computes through that kernel:
    # a run resumed in a new process (no evaluation yet) would drift from an uninterrupted one.
    # Keep one numeric path for training and evaluation.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def lora_config(cfg: dict):
    """Return the peft.LoraConfig for the run's `lora:` section."""
    from peft import LoraConfig

    kwargs = dict(cfg["lora"])
    kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("bias", "none")
    return LoraConfig(**kwargs)


def add_lora(model, cfg: dict, *, gradient_checkpointing: bool = False):
    """Return the 4-bit model prepared for k-bit training with fresh LoRA adapters attached."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    set_seed(int(cfg["train"].get("seed", 42)))  # LoRA's random init, the same for the same seed in any process
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        return get_peft_model(model, lora_config(cfg))
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
            linear = [n for n in names if n.endswith("proj")] or names[:12]
            raise LabError(
                f"lora.target_modules {cfg['lora'].get('target_modules')!r} not found in the model — "
                f"use 'all-linear' or names such as {linear[:8]}"
            ) from None
        raise


def _load_unsloth(cfg: dict, gradient_checkpointing: bool):
    from unsloth import FastLanguageModel  # type: ignore[import-not-found]

    model, tok = FastLanguageModel.from_pretrained(
        model_name=model_source(cfg),
        max_seq_length=int(cfg["model"]["max_length"]),
        load_in_4bit=bool(cfg["model"].get("load_in_4bit", True)),
        dtype=None,  # unsloth picks bf16 where supported, fp16 on a T4
        trust_remote_code=bool(cfg["model"].get("trust_remote_code")),
    )
    lora = dict(cfg["lora"])
    targets = lora.pop("target_modules", "all-linear")
    if targets == "all-linear":
        targets = LLAMA_PROJECTIONS
    model = FastLanguageModel.get_peft_model(
        model,
        target_modules=targets,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        random_state=int(cfg["train"].get("seed", 42)),
        **{k: v for k, v in lora.items() if k in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora")},
    )
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return model, tok


def load_for_training(cfg: dict, path: str, *, gradient_checkpointing: bool = False, attn_implementation: str | None = None):
    """Return (peft_model, tokenizer) on the chosen path ("unsloth" or "plain")."""
    if path == "unsloth":
        return _load_unsloth(cfg, gradient_checkpointing)
    tok = load_tokenizer(cfg)
    model = load_base_model(cfg, attn_implementation=attn_implementation)
    if gradient_checkpointing:
        model.config.use_cache = False
    return add_lora(model, cfg, gradient_checkpointing=gradient_checkpointing), tok
