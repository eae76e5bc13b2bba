"""The memory model: what one QLoRA training step needs, by part, before anything is allocated.

`estimate_memory()` returns a `MemoryEstimate` (weights, LoRA, optimizer, gradients, activations,
overhead); `model_shape()` fills the dimensions it needs. No torch import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import problem
from .hardware import GIB

LLAMA3_VOCAB = 128_256  # vocab assumed when none is given (Llama 3.x)
TIED_BELOW_PARAMS = 4e9  # smaller models tie lm_head to the embeddings (Llama 3.2 1B/3B, Qwen2.5 <= 3B)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# --- Memory model constants -------------------------------------------------------------------
# 4-bit nf4 with double quantization (bitsandbytes): 4 bits per weight, an 8-bit absmax per block of
# 64 weights, and an fp32 absmax per 256 of those blocks: (4 + 8/64 + 32/(64*256)) / 8 bytes.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 0.5159
LORA_BYTES = 4  # PEFT keeps adapters in fp32 (autocast_adapter_dtype=True) ...
GRAD_BYTES = 4  # ... so their gradients are fp32 too
ADAM_FP32_BYTES = 8  # two fp32 moments per trainable parameter
ADAM_8BIT_BYTES = 2  # two 8-bit moments (+ an fp32 absmax per 256 values, negligible)
# Logits with loss_type="nll" (transformers' ForCausalLMLoss), bytes per token per vocab entry at the
# peak: the 16-bit lm_head output (2) + its fp32 upcast (4) + the fp32 log-softmax kept for backward
# (4) in the forward; in the backward the 16-bit copy is gone but two fp32 gradients (4 + 4) join the
# saved log-softmax. 12 bytes, i.e. three batch*len*vocab fp32 tensors, not one.
LOGITS_BYTES_PER_VOCAB_TOKEN = 12
CHUNKED_NLL_TOKENS = 256  # trl.trainer.sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE in trl 1.14.2
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN workspaces as nvidia-smi counts them
CPU_PROCESS_GIB = 1.0  # Python, torch, tokenizer and dataset in RAM
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a share of activation memory
# Sanity check against published numbers (GiB from this model; the sources say GB):
# * LLaMA-Factory wiki "Performance comparison": LLaMA2-7B (hidden 4096, 32 layers, vocab 32000),
#   4-bit QLoRA, LoRA r=8 on all modules, batch 1, FlashAttention-2, A100-40GB:
#     tokens      1024  2048  4096  8192  16384  32768
#     published      6     7     9    12     19     32
#     this model   5.5   6.2   7.6  10.4   16.0   27.1   (adamw_torch, checkpointing on)
#   8-16% low. Most of the gap at long lengths is that 2024 stack's loss, which also kept a
#   contiguous fp32 copy of the shifted logits (16 bytes per vocab entry, not 12): with 16 this
#   model gives 5.7, 6.5, 8.2, 11.5, 18.1, 31.4. The 85% budget absorbs the rest.
# * unsloth "Unsloth Requirements", minimum QLoRA VRAM: 7B 5 GB, 8B 6 GB. This model at batch 1 x
#   512 tokens, r=16, checkpointing: Mistral-7B shape (vocab 32000) 5.5; Llama-3.1-8B 7.6 (7.2 with
#   the chunked loss). The 8B weights alone are 5.3 (untied 16-bit embeddings + lm_head are 2.0 of
#   it; unsloth's own 8B bnb-4bit checkpoint is 5.7 GB on disk), so 6 GB is a floor without context.
# * Llama-3.2-1B (1.24e9) at 2048 tokens, r=32, fp16: weights 0.96 (unsloth's 1B bnb-4bit checkpoint
#   is about 1.0 GB). The old lab setting, batch 2 with checkpointing, estimates 8.75 on a T4 with
#   full logits (5.9 of it logits) and 3.0 with TRL 1.14's default chunked loss.
# tests/test_defaults.py pins these ranges.


@dataclass(frozen=True)
class ModelShape:
    """A decoder's dimensions as its config.json gives them (or model_shape() derives them), and which were derived."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int  # MLP width
    kv_size: int  # width of k_proj/v_proj outputs: num_key_value_heads * head_dim
    tied_embeddings: bool
    derived: tuple[str, ...] = ()
    q_size: int = 0  # width of q_proj's output (num_attention_heads * head_dim); 0 means hidden_size
    attention_bias: bool = False
    mlp_bias: bool = False

    def projections(self) -> dict[str, tuple[int, int]]:
        """Return (in, out) features of each linear layer of one decoder layer, by its Llama module name."""
        h, q, kv, i = self.hidden_size, self.q_size or self.hidden_size, self.kv_size, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def params(self) -> int:
        """Return the parameter count: layers of projections (+ biases) and two RMSNorms, a final norm, embeddings."""
        proj = self.projections()
        per_layer = sum(a * b for a, b in proj.values()) + 2 * self.hidden_size
        if self.attention_bias:
            per_layer += sum(proj[k][1] for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if self.mlp_bias:
            per_layer += sum(proj[k][1] for k in ("gate_proj", "up_proj", "down_proj"))
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * per_layer + self.hidden_size + embeddings

    def lora_params(self, r: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        """Return LoRA's trainable parameters at rank r on `targets` of every layer: r * (in + out) each."""
        proj = self.projections()
        return self.num_layers * sum(r * (proj[t][0] + proj[t][1]) for t in targets if t in proj)


def shape_from_config(config: Any) -> ModelShape:
    """Return the ModelShape a transformers config describes (a multimodal config's text_config is used)."""
    cfg = getattr(config, "text_config", None) or config
    h, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return ModelShape(
        hidden_size=h,
        num_layers=int(cfg.num_hidden_layers),
        vocab_size=int(cfg.vocab_size),
        intermediate_size=int(getattr(cfg, "intermediate_size", None) or 4 * h),
        kv_size=kv_heads * head_dim,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        q_size=heads * head_dim,
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
    )


def _llama_shape(hidden: int, layers: int, vocab: int, tied: bool, intermediate: int | None = None) -> ModelShape:
    """Return the Llama-rule ModelShape: k/v width hidden/4, MLP width 4*hidden unless given."""
    return ModelShape(hidden, layers, vocab, 4 * hidden if intermediate is None else intermediate, max(1, hidden // 4), tied)


def model_shape(
    model_params: float,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    vocab_size: int | None = None,
) -> ModelShape:
    """Return the ModelShape, filling missing dimensions by the Llama rule.

    The rule (Llama 3.x): head_dim 128 so num_layers = hidden/128; grouped-query attention with
    k/v width hidden/4; MLP width 4*hidden. A layer then has 2.5h^2 attention + 12h^2 MLP = 14.5h^2
    parameters (counted by ModelShape.params(), the one formula), and hidden is the multiple of 128
    whose total is closest to model_params. Vocab defaults to Llama 3's 128256; models under 4e9
    parameters are taken as tied. 1.24e9 gives Llama-3.2-1B exactly: hidden 2048, 16 layers. The MLP
    width is then solved from model_params, so the parts always add up to the given size.
    """
    derived = []
    vocab = vocab_size if vocab_size is not None else LLAMA3_VOCAB
    if vocab_size is None:
        derived.append("vocab_size")
    tied = model_params < TIED_BELOW_PARAMS

    def off(hidden: int, layers: int) -> float:
        return abs(_llama_shape(hidden, layers, vocab, tied).params() - model_params)

    if hidden_size is None and num_layers is None:
        hidden = min(range(128, 32768 + 1, 128), key=lambda h: off(h, h // 128))
        layers = hidden // 128
        derived += ["hidden_size", "num_layers"]
    elif hidden_size is None:
        layers = int(num_layers)  # type: ignore[arg-type]
        hidden = min(range(64, 32768 + 1, 64), key=lambda h: off(h, layers))
        derived.append("hidden_size")
    elif num_layers is None:
        hidden = int(hidden_size)
        layers = min(range(1, 1025), key=lambda n: off(hidden, n))
        derived.append("num_layers")
    else:
        hidden, layers = int(hidden_size), int(num_layers)
    without_mlp = _llama_shape(hidden, layers, vocab, tied, intermediate=0).params()
    embeddings = _llama_shape(hidden, 0, vocab, tied).params()
    if model_params <= embeddings:
        raise problem(
            "model_params is smaller than the embeddings alone",
            got=f"{model_params:.3g} params but vocab {vocab} x hidden {hidden} = {embeddings:.3g}",
            fix="check model_params, or pass the model's hidden_size and vocab_size",
        )
    intermediate = max(hidden, round((model_params - without_mlp) / (3 * hidden * layers)))
    return replace(_llama_shape(hidden, layers, vocab, tied, intermediate), derived=tuple(derived))


@dataclass
class MemoryEstimate:
    """Estimated peak training memory in GiB by part; total_gib is the sum of the six parts."""

    weights_gib: float
    lora_gib: float
    optimizer_gib: float
    gradients_gib: float
    activations_gib: float
    overhead_gib: float
    total_gib: float
    logits_gib: float = 0.0  # the part of activations_gib that is loss logits
    assumptions: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Return a readable breakdown: one row per part, then the total and the assumptions."""
        notes = self.assumptions.get("notes", {})
        rows = [
            ("weights", self.weights_gib, notes.get("weights", "")),
            ("lora", self.lora_gib, notes.get("lora", "")),
            ("optimizer", self.optimizer_gib, notes.get("optimizer", "")),
            ("gradients", self.gradients_gib, notes.get("gradients", "")),
            ("activations", self.activations_gib, notes.get("activations", "")),
            ("overhead", self.overhead_gib, notes.get("overhead", "")),
        ]
        lines = [f"{'part':<12} {'GiB':>7}  what"]
        lines += [f"{name:<12} {gib:>7.2f}  {note}".rstrip() for name, gib, note in rows]
        lines.append(f"{'total':<12} {self.total_gib:>7.2f}")
        return "\n".join(lines)


def _optimizer_bytes(optim: str) -> int:
    """Return bytes of optimizer state per trainable parameter for a TrainingArguments optim name."""
    name = optim.lower()
    if "8bit" in name:
        return ADAM_8BIT_BYTES
    if name.startswith("sgd"):
        return 0
    return ADAM_FP32_BYTES  # adamw_torch, adamw_torch_fused, adafactor (bounded above by Adam), ...


def _check_positive(**values: float) -> None:
    """Raise a LabError naming the first value that is not a positive number."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise problem(f"{name} must be a positive number", got=repr(value), fix=f"pass e.g. {name}=1")


def _activation_bytes(
    shape: ModelShape, tokens: int, gradient_checkpointing: bool, loss_type: str, lora_dropout: float, dtype_bytes: int
) -> tuple[float, float]:
    """Return (activation bytes at the peak, the loss logits' share of them) for `tokens` tokens per micro-batch."""
    h, n_layers, vocab, inter, kv = (
        shape.hidden_size,
        shape.num_layers,
        shape.vocab_size,
        shape.intermediate_size,
        shape.kv_size,
    )
    per_layer = dtype_bytes * (8 * h + 2 * kv + 4 * inter) + 8 * h  # saved for backward, per token
    if lora_dropout > 0:  # each adapter keeps its own fp32 dropped copy of its input
        per_layer += 4 * (6 * h + inter)
    grad_buffers = dtype_bytes * (2 * inter + 2 * h)  # gradients in flight inside one layer, per token
    final_hidden = 2 * dtype_bytes * h  # last hidden state and its gradient, per token
    if loss_type == "chunked_nll":
        logits = min(tokens, CHUNKED_NLL_TOKENS) * vocab * LOGITS_BYTES_PER_VOCAB_TOKEN
    else:
        logits = tokens * vocab * LOGITS_BYTES_PER_VOCAB_TOKEN
    if gradient_checkpointing:
        kept = tokens * (dtype_bytes * h * n_layers + final_hidden)
        return kept + max(logits, tokens * (per_layer + grad_buffers)), logits
    kept = tokens * (per_layer * n_layers + final_hidden)
    return kept + logits + tokens * grad_buffers, logits


def estimate_memory(
    *,
    model_params: float,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    lora_r: int,
    max_length: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    load_in_4bit: bool = True,
    optim: str = "paged_adamw_8bit",
    tokens_per_batch: int | None = None,
    loss_type: str = "nll",
    lora_dropout: float = 0.0,
    dtype_bytes: int = 2,
    device_kind: str = "cuda",
    shape: dict | None = None,
) -> MemoryEstimate:
    """Return the estimated peak memory of one QLoRA training step.

    `shape` (a ModelShape as a dict, from the model's config.json) gives the real widths; without it
    model_shape() fills what hidden_size, num_layers and vocab_size leave open by the Llama rule.

    * weights: linear layers at 0.516 bytes/param in 4-bit nf4 (dtype_bytes otherwise); embeddings and
      lm_head stay 16-bit (bitsandbytes skips them), once if tied.
    * lora / gradients / optimizer: r * (in + out) parameters on each of the 7 projections of every
      layer, fp32 weights and gradients, 2 (8-bit) or 8 (fp32 Adam) bytes of optimizer state.
    * activations, per token of the micro-batch (T = tokens_per_batch, default micro_batch *
      max_length, i.e. padded rows): a layer keeps dtype*(8h + 2kv + 4i) + 8h bytes for backward
      (measured with saved_tensors_hooks on a Llama layer with LoRA under autocast: rotated q, k, v,
      attention output, the 16-bit input copies PEFT's fp32 adapters make, four MLP tensors, the two
      RMSNorm inputs in fp32; sdpa/flash keep no score matrix), plus 4*(6h + i) fp32 dropout copies
      when lora_dropout > 0. Without checkpointing all layers keep it; with
      checkpointing only each layer's input (dtype*h) is kept and one layer is recomputed at a time.
      Plus the loss logits: 12 bytes per token per vocab entry for loss_type "nll"/"dft" (transformers
      materializes them; with a 128k vocab this is the peak), or a 256-token chunk for TRL's
      "chunked_nll". Logits and the layer recompute are not live at the same time.
    * overhead: CUDA context and workspaces (0.75 GiB; 1 GiB of process memory on CPU), a 16-bit
      dequantized copy of the largest 4-bit matrix for backward, and 10% allocator slack.
    """
    inputs = dict(locals())  # the arguments, taken first: estimate_memory(**inputs) reproduces this estimate
    _check_positive(model_params=model_params, lora_r=lora_r, max_length=max_length, micro_batch=micro_batch)
    if loss_type not in ("nll", "dft", "chunked_nll"):
        raise problem("loss_type not understood", got=repr(loss_type), fix="one of 'nll', 'dft', 'chunked_nll'")
    if shape is not None:
        shape = ModelShape(**{**shape, "derived": tuple(shape.get("derived", ()))})
    else:
        shape = model_shape(model_params, hidden_size, num_layers, vocab_size)
    tokens = int(tokens_per_batch) if tokens_per_batch else micro_batch * max_length

    embed_params = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)
    linear_params = max(model_params - embed_params, 0.0)
    linear_bytes = NF4_BYTES_PER_PARAM if load_in_4bit else dtype_bytes
    weights = linear_params * linear_bytes + embed_params * dtype_bytes

    lora_params = shape.lora_params(lora_r)
    lora = lora_params * LORA_BYTES
    grads = lora_params * GRAD_BYTES
    opt = lora_params * _optimizer_bytes(optim)

    activations, logits = _activation_bytes(shape, tokens, gradient_checkpointing, loss_type, lora_dropout, dtype_bytes)
    base = CUDA_CONTEXT_GIB * GIB if device_kind == "cuda" else CPU_PROCESS_GIB * GIB
    dequant = 2 * shape.hidden_size * shape.intermediate_size * dtype_bytes if load_in_4bit else 0
    overhead = base + dequant + ALLOCATOR_SLACK * activations

    parts = [x / GIB for x in (weights, lora, opt, grads, activations, overhead)]
    tied = "tied" if shape.tied_embeddings else "untied"
    n_layers = shape.num_layers
    return MemoryEstimate(
        *parts,
        total_gib=sum(parts),
        logits_gib=logits / GIB,
        assumptions={
            "inputs": inputs,
            "shape": asdict(shape),
            "tokens_per_batch": tokens,
            "lora_params": int(lora_params),
            "notes": {
                "weights": f"{linear_params / 1e9:.2f}B linear at {linear_bytes:.3f} B/param"
                f" + {tied} embeddings {embed_params / 1e9:.2f}B at {dtype_bytes} B",
                "lora": f"{lora_params / 1e6:.1f}M params (r={lora_r}, 7 projections x {n_layers} layers), fp32",
                "optimizer": f"{optim}: {_optimizer_bytes(optim)} B/param",
                "gradients": "fp32, LoRA params only",
                "activations": f"{tokens} tokens/micro-batch, checkpointing {'on' if gradient_checkpointing else 'off'};"
                f" logits ({loss_type}) {logits / GIB:.2f}",
                "overhead": f"{'CUDA context' if device_kind == 'cuda' else 'process'} {base / GIB:.2f}"
                f" + dequant buffer + {ALLOCATOR_SLACK:.0%} of activations",
            },
        },
    )
