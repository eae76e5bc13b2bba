"""Loading the tokenizer, the 4-bit base model and its LoRA adapter — unsloth on a GPU, plain otherwise.

Both paths read the same config and produce a PEFT model whose checkpoints and adapters have
the same format, so a run started on one path resumes on the other.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from .distributed import fsdp_enabled, local_rank, quant_storage_dtype
from .embedded import EMBEDDED_MODEL, is_embedded, resolve_model, tokenizer_dir
from .errors import LabError, problem

__all__ = [
    "load_tokenizer",
    "load_base_model",
    "add_lora",
    "load_for_training",
    "compute_dtype",
    "model_source",
    "check_model_source",
    "check_target_modules",
    "remote_code",
    "loaded_base",
    "unsloth_lora_kwargs",
    "hub_model_id",
]

def model_source(cfg: dict) -> str:
    """Return the path or hub id the model weights load from (embedded names resolved)."""
    return resolve_model(cfg["model"]["name"])


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_warned_remote_code: set[str] = set()


def remote_code(cfg: dict) -> bool:
    """Return model.trust_remote_code (off unless the config says true); say once per model when it is on."""
    on = cfg["model"].get("trust_remote_code") is True
    name = cfg["model"]["name"]
    if on and name not in _warned_remote_code:
        _warned_remote_code.add(name)
        print(
            f"⚠ model.trust_remote_code is true: loading {name!r} runs Python code from its repository on this "
            "machine — keep it only for repositories you trust"
        )
    return on


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def hub_model_id(name: str | None) -> str | None:
    """Return `name` when it is a hub id (owner/name) naming nothing on this machine; None for embedded, paths, files."""
    if not isinstance(name, str) or is_embedded(name) or _looks_local(name) or Path(name).expanduser().exists():
        return None
    return name if _HUB_ID.match(name) else None


def check_model_source(
    name: str, *, key: str = "model.name", revision: str | None = None, need: tuple[str, ...] = ("config.json",)
) -> None:
    """LabError naming the key and the fix when `name` is neither a usable folder nor a reachable hub id.

    Seconds at most: a folder is looked at, a hub id is looked up in the local cache and then asked of
    the Hub once (no retries), so a typo or a missing network shows before anything loads.
    """
    if is_embedded(name):
        if name != EMBEDDED_MODEL:
            raise LabError(f"{key} {name!r} is not a built-in model — the embedded one is {EMBEDDED_MODEL!r}")
        return
    path = Path(name).expanduser()
    if path.exists() or _looks_local(name) or not _HUB_ID.match(name):
        if not path.exists():
            hint = " (is Google Drive mounted?)" if name.startswith("/content/drive") else ""
            raise LabError(
                f"{key} {name!r} is not a folder on this machine{hint} and not a hub id (owner/name) — "
                "check the path, or use a hub id such as unsloth/Llama-3.2-1B-Instruct"
            )
        if path.is_file() and path.suffix.lower() == ".gguf":
            return  # converted once to a model folder (lab_utils.gguf_source)
        if not path.is_dir():
            raise LabError(f"{key} {name!r} is a file — point it at the folder that holds {need[0]}, or at a .gguf file")
        if not any((path / f).is_file() for f in need):
            raise LabError(
                f"{key} folder {name!r} has no {' or '.join(need)} — point it at a folder written by "
                "save_pretrained (the one that holds config.json and the weights)"
            )
        return
    from .environment import check_hub_repo, hub_offline

    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, need[0], revision=revision)
    except Exception:
        cached = None
    if isinstance(cached, str):
        return
    if hub_offline():
        raise LabError(
            f"{key} {name!r} is not in this machine's Hugging Face cache and HF_HUB_OFFLINE is set — unset "
            "HF_HUB_OFFLINE to download it, or check the spelling"
        )
    check_hub_repo(name, key=key, revision=revision)


def _friendly_load_error(what: str, name: str, e: Exception) -> LabError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if re.search(r"flash.?attention|flash_attn|attn_implementation", text, re.IGNORECASE):
        # the attention kernel, not the name, is what failed (seen on a GPU without the flash-attn package)
        return problem(
            f"{what} {name!r} could not be loaded with its attention implementation", got=f"({text[:160]})",
            fix="set train.attn_implementation: sdpa, or pip install flash-attn and restart the runtime",
        )
    return LabError(
        f"{what} {name!r} could not be loaded ({text[:160]}) — check the spelling of the hub id or the folder, "
        "your connection, and HF_TOKEN for gated models"
    )


def load_tokenizer(cfg: dict):
    """Return the run's tokenizer (model.tokenizer or model.name), with a pad token and a chat template set."""
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg["model"].get("tokenizer") else "model.name"
    name = cfg["model"].get("tokenizer") or cfg["model"]["name"]
    need = ("config.json",) if key == "model.name" else ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
    check_model_source(name, key=key, revision=cfg["model"].get("revision"), need=need)
    # the embedded model's tokenizer ships as files: 01_data never needs to build the weights
    source = str(tokenizer_dir()) if name == EMBEDDED_MODEL else resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=remote_code(cfg), revision=cfg["model"].get("revision"))
    except Exception as e:
        raise _friendly_load_error("tokenizer", name, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    from .chat import ensure_chat_template

    try:
        added = ensure_chat_template(tok)
    except ValueError:
        raise LabError(
            f"the tokenizer of {name!r} has neither a chat template nor an end-of-sequence token — set "
            "model.tokenizer to the instruct/chat version of this model"
        ) from None
    if added:
        print(
            f"The tokenizer of {name!r} has no chat template: using the lab's default ChatML template "
            "(set model.tokenizer to a chat model's tokenizer to use its own)."
        )
    return tok


def check_target_modules(cfg: dict) -> None:
    """LabError when lora.target_modules names layers the model does not have (built on the meta device: no weights)."""
    targets = cfg["lora"].get("target_modules", "all-linear")
    if targets == "all-linear":
        return
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        remote = cfg["model"].get("trust_remote_code") is True
        mc = AutoConfig.from_pretrained(model_source(cfg), trust_remote_code=remote, revision=cfg["model"].get("revision"))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(mc, trust_remote_code=remote)
    except Exception:
        return  # the model itself cannot be read here: loading it reports that, with its own message
    names = [n for n, _ in model.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"})
    shown = f"its linear layers are {', '.join(linear)}" if linear else "see model.named_modules()"
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise LabError(
                f"lora.target_modules pattern {targets} (matched against full layer names) matches no layer of "
                f"{cfg['model']['name']!r} — use all-linear, or a list of names; {shown}"
            )
        return
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            close = difflib.get_close_matches(target, linear, n=1, cutoff=0.6)
            hint = f" → did you mean {close[0]!r}?" if close else ""
            raise LabError(
                f"lora.target_modules has {target!r}, which is no layer of {cfg['model']['name']!r}{hint} — "
                f"use all-linear, or names from: {', '.join(linear)}"
            )


def compute_dtype(device: str | None = None):
    """Return the dtype for 4-bit compute: bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    from .hardware import bf16_capable, cuda_available

    if device is None:
        device = "cuda" if cuda_available() else "cpu"
    if device != "cuda":
        return torch.float32

    return torch.bfloat16 if bf16_capable() else torch.float16


def load_base_model(cfg: dict, *, four_bit: bool | None = None, dtype=None, attn_implementation: str | None = None):
    """Return the base causal LM: 4-bit nf4 with double quantization (as configured), or plain weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .hardware import cuda_available

    name = cfg["model"]["name"]
    four_bit = cfg["model"].get("load_in_4bit", True) if four_bit is None else four_bit
    cdtype = dtype or compute_dtype()
    check_model_source(name, revision=cfg["model"].get("revision"))
    kwargs: dict[str, Any] = {
        "trust_remote_code": remote_code(cfg),
        "revision": cfg["model"].get("revision"),
        "dtype": cdtype,
    }
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # NormalFloat4: the QLoRA paper's data type for normal-ish weights
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants too (~0.4 bit/param saved)
            bnb_4bit_compute_dtype=cdtype,
            bnb_4bit_quant_storage=quant_storage_dtype(cdtype),  # uint8; a float FSDP can shard under FSDP
        )
    if fsdp_enabled():  # Accelerate places and shards the weights (rank 0 loads them, CPU-efficiently)
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_quant_storage if four_bit else cdtype
    elif cuda_available():
        kwargs["device_map"] = {"": local_rank()}  # each process trains on its own GPU (0 in a notebook)
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
    if fsdp_enabled():  # no fp32 upcast of norms: FSDP shards units of one dtype (the 4-bit storage dtype)
        for param in model.parameters():
            param.requires_grad = False
    elif getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        return get_peft_model(model, lora_config(cfg))
    except (ValueError, TypeError) as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
            linear = [n for n in names if n.endswith("proj")] or names[:12]
            raise LabError(
                f"lora.target_modules {cfg['lora'].get('target_modules')!r} not found in the model — "
                f"use 'all-linear' or names such as {linear[:8]}"
            ) from None
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise LabError(f"peft could not add the LoRA adapters ({text}) — change the lora: keys it names") from None


def unsloth_lora_kwargs(cfg: dict) -> dict[str, Any]:
    """Return FastLanguageModel.get_peft_model's LoRA arguments: exactly the plain path's LoraConfig.

    "all-linear" goes through as it is (unsloth resolves it like PEFT, for any architecture); every
    other `lora:` key is a LoraConfig field, which unsloth passes on to LoraConfig; peft's defaults are
    sent where unsloth's differ (r, lora_alpha). task_type is set by unsloth: only CAUSAL_LM is possible.
    """
    lora = dict(cfg["lora"])
    task = lora.pop("task_type", "CAUSAL_LM")
    if str(task) != "CAUSAL_LM":
        raise LabError(
            f"lora.task_type {task!r} cannot be trained by the lab (a causal language model) — remove lora.task_type"
        )
    plain = lora_config(cfg)
    kwargs: dict[str, Any] = {
        "r": plain.r,
        "lora_alpha": plain.lora_alpha,
        "lora_dropout": plain.lora_dropout,
        "bias": plain.bias,
        "use_rslora": plain.use_rslora,
        "init_lora_weights": plain.init_lora_weights,
    }
    kwargs.update(lora)
    kwargs["target_modules"] = lora.get("target_modules", "all-linear")
    return kwargs


def loaded_base(model) -> dict[str, str]:
    """Return {"path", "base"}: the training path and the base weights actually loaded (for the run's identity)."""
    return dict(getattr(model, "_lab_loaded", {}) or {})


def _mark_loaded(model, path: str, cfg: dict):
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or model_source(cfg)
    model._lab_loaded = {"path": path, "base": str(base)}
    return model


def _load_unsloth(cfg: dict, gradient_checkpointing: bool):
    """Return (peft_model, tokenizer) through unsloth, or None (one line says why) when unsloth cannot be imported."""
    try:
        from unsloth import FastLanguageModel  # type: ignore[import-not-found]
    except Exception as e:  # a broken install or a torch it does not support: the plain path trains the same
        print(f"⚠ unsloth could not be imported ({type(e).__name__}: {str(e)[:120]}) — training takes the plain path")
        return None
    lora = unsloth_lora_kwargs(cfg)  # refused keys before anything loads
    model, _ = FastLanguageModel.from_pretrained(
        model_name=model_source(cfg),
        max_seq_length=int(cfg["model"]["max_length"]),
        load_in_4bit=bool(cfg["model"].get("load_in_4bit", True)),
        dtype=compute_dtype(),  # the one bf16 decision: fp16 on a T4
        use_exact_model_name=True,  # the named weights, as 03_evaluate and 04_export load them (no -bnb-4bit swap)
        revision=cfg["model"].get("revision"),
        trust_remote_code=remote_code(cfg),
    )
    model = FastLanguageModel.get_peft_model(
        model,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        random_state=int(cfg["train"].get("seed", 42)),
        **lora,
    )
    return _mark_loaded(model, "unsloth", cfg), load_tokenizer(cfg)  # the plain path's tokenizer and chat template


def load_for_training(cfg: dict, path: str, *, gradient_checkpointing: bool = False, attn_implementation: str | None = None):
    """Return (peft_model, tokenizer) on the chosen path ("unsloth" or "plain")."""
    if path == "unsloth":
        loaded = _load_unsloth(cfg, gradient_checkpointing)
        if loaded is not None:
            return loaded
    tok = load_tokenizer(cfg)
    model = load_base_model(cfg, attn_implementation=attn_implementation)
    if gradient_checkpointing:
        model.config.use_cache = False
    return _mark_loaded(add_lora(model, cfg, gradient_checkpointing=gradient_checkpointing), "plain", cfg), tok
