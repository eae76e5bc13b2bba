"""The embedded default: a tiny Llama model and the "Pricer" chat dataset, built here, offline.

Nothing on this machine can reach a model hub, so the lab ships its own default that takes
exactly the path a hub model takes: `model.name: embedded:tiny-llama` resolves to a folder
written once with `save_pretrained` (random init, fixed seed) and is then loaded like any hub
checkpoint (4-bit nf4 → LoRA → SFTTrainer). `data.path: embedded:pricer` resolves to a JSONL
file in ShareGPT form. The SentencePiece tokenizer in `assets/tokenizer/` was trained on that
data by `python -m lab_utils.embedded tokenizer` (kept so llama.cpp's converter accepts it).

The task: a product description in, its price out ("Price is $859"). The price is a
deterministic function of the category, the tier and the pack size (one digit each); brand, colour
and wording are noise. A tiny model learns it in the demo's 200 steps and the answer is measurable
(mean absolute error, against always answering the median price).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from .chat import chatml_template
from .choices import EMBEDDED_DATA, EMBEDDED_DATASETS, EMBEDDED_MODEL, EMBEDDED_TOOLS  # noqa: F401 — names config checks
from .errors import LabError
from .files import write_text
from .metrics import parse_price  # noqa: F401 — re-exported: the scorer moved to metrics.py

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_DATA",
    "is_embedded",
    "resolve_model",
    "resolve_data",
    "tokenizer_dir",
    "pricer_rows",
    "tool_rows",
    "EMBEDDED_TOOLS",
    "parse_price",
]

# The tiny model's shape: small enough to train on 2 CPU cores in minutes, Llama in every detail
# that matters to the tooling (GQA, RoPE, SwiGLU MLP, untied head, SentencePiece vocab).
TINY_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
MODEL_SEED = 0
# A random LM head at the usual std 0.02 caps the logits near ±2.5 (final RMSNorm output has norm
# ≈ √hidden), so a frozen head could not express a confident answer however well LoRA trains.
# A wider head keeps the base random but lets the adapters learn the task.
LM_HEAD_STD = 0.1
DATA_SEED = 1234
DATA_ROWS = 2000

# The price is written digit by digit by three words of the description: the category sets the
# hundreds, the tier the tens, the pack the units ("Pro monitor, 2-pack" → 800 + 50 + 9 = $859).
# 48 distinct prices, no carries, so each digit of the answer depends on one word: a tiny model with
# a random base learns the whole table in the demo's 200 steps (the old product of category × tier ×
# pack made every digit depend on all three and 200 steps learned no more than the median price).
CATEGORIES = {  # hundreds of dollars
    "wireless mouse": 100,
    "desk lamp": 200,
    "webcam": 300,
    "mechanical keyboard": 400,
    "backpack": 500,
    "headphones": 600,
    "speaker": 700,
    "monitor": 800,
}
TIERS = {"Basic": 20, "Pro": 50, "Ultra": 80}  # tens
PACKS = {"single": 5, "2-pack": 9}  # units
PRICER_VERSION = 2  # bump when the rows change: the cached JSONL's name carries it
BRANDS = ["Nordex", "Alvio", "Kestrel", "Umbra", "Ferro", "Lumen", "Tarsus", "Oakly"]
COLORS = ["black", "white", "blue", "red", "green", "grey"]
QUESTIONS = [
    "How much does this cost?",
    "What is the price of this item?",
    "Estimate the price:",
    "What should this sell for?",
]
SYSTEM = "You are a pricing assistant. Answer with the price only."


def _package_assets() -> Path:
    from importlib.resources import files

    return Path(str(files("lab_utils.assets")))


def tokenizer_dir() -> Path:
    """Return the folder of the shipped SentencePiece tokenizer (tokenizer.model + config)."""
    return _package_assets() / "tokenizer"


def cache_root() -> Path:
    """Return the folder where built embedded artifacts live ($LAB_CACHE or ~/.cache/qlora-lab)."""
    return Path(os.path.abspath(Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "qlora-lab").expanduser()))


def absolute_if_local(spec: str) -> str:
    """Return spec as an absolute path when it names an existing local file or folder, else unchanged.

    Libraries take a relative path that happens not to resolve from their own point of view (or one with
    a single slash) for a Hub id; every local path is therefore handed on absolute.
    """
    p = Path(spec).expanduser()
    return os.path.abspath(p) if p.exists() else spec


def is_embedded(name: str | None) -> bool:
    """Return True when `name` is one of the reserved embedded names."""
    return isinstance(name, str) and name.startswith("embedded:")


def pricer_rows(n: int = DATA_ROWS, seed: int = DATA_SEED) -> list[dict]:
    """Return `n` ShareGPT rows of the Pricer task, the same for the same seed."""
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        cat = rng.choice(list(CATEGORIES))
        tier = rng.choice(list(TIERS))
        pack = rng.choice(list(PACKS))
        price = CATEGORIES[cat] + TIERS[tier] + PACKS[pack]
        desc = f"{tier} {cat} by {rng.choice(BRANDS)}, {rng.choice(COLORS)}, {pack}."
        question = f"{rng.choice(QUESTIONS)}\n{desc}"
        if question in seen:  # every row distinct, so the demo's data report shows no duplicates
            continue
        seen.add(question)
        rows.append(
            {
                "conversations": [
                    {"from": "system", "value": SYSTEM},
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": f"Price is ${price}"},
                ]
            }
        )
    return rows


# The embedded tool-calling task: three tools; every row ends on the call the model should make.
TOOLS_ROWS = 400
TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {p: {"type": t} for p, t in params}, "required": [p for p, _ in params]}}}
    for name, desc, params in (
        ("get_weather", "Sky in a city", [("city", "string")]),
        ("convert_price", "Dollars to a currency", [("amount", "number"), ("to", "string")]),
        ("get_time", "Time in a city", [("city", "string")]),
    )
]  # fmt: skip
CITIES = ["Paris", "Oslo", "Lima", "Tokyo", "Cairo", "Quito", "Perth", "Dakar", "Riga", "Hanoi"]
CURRENCIES = ["EUR", "USD", "GBP", "JPY"]


def _tool_question(rng: random.Random) -> tuple[str, dict]:
    """Return (a user question, the call that answers it) for one of the three tools."""
    kind = rng.choice(["weather", "price", "time"])
    if kind == "weather":
        city = rng.choice(CITIES)
        return rng.choice(["Weather in {}?", "Is it raining in {}?"]).format(city), {
            "name": "get_weather", "arguments": {"city": city}}  # fmt: skip
    if kind == "time":
        city = rng.choice(CITIES)
        return rng.choice(["Time in {}?", "What time is it in {}?"]).format(city), {
            "name": "get_time", "arguments": {"city": city}}  # fmt: skip
    amount, to = rng.choice([5, 12, 20, 75, 120, 300]), rng.choice(CURRENCIES)
    return f"{amount} dollars in {to}?", {"name": "convert_price", "arguments": {"amount": amount, "to": to}}


def _tool_result(call: dict) -> tuple[str, str]:
    """Return (the deterministic JSON a tool answers a call with, the assistant's answer from it)."""
    args = call["arguments"]
    if call["name"] == "get_weather":
        sky = ["sunny", "rainy", "cloudy"][len(args["city"]) % 3]
        return json.dumps({"sky": sky}), f"It is {sky}."
    if call["name"] == "get_time":
        time = f"{(len(args['city']) * 5) % 24:02d}:00"
        return json.dumps({"time": time}), f"It is {time}."
    amount = round(args["amount"] * (1 + len(args["to"]) / 10), 2)
    return json.dumps({"amount": amount}), f"That is {amount} {args['to']}."


def tool_rows(n: int = TOOLS_ROWS, seed: int = DATA_SEED) -> list[dict]:
    """Return `n` OpenAI-style rows (messages with tool_calls, role tool results, a tools list), the same for a seed.

    Every row ends on the assistant's tool call (what 03 scores); about half first answer an earlier
    question from its tool result, so rows hold results (no loss) and plain answers (loss) too.
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        messages: list[dict] = []
        if rng.random() < 0.5:  # an earlier question, answered from its tool's result
            question, call = _tool_question(rng)
            result, answer = _tool_result(call)
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": result},
                {"role": "assistant", "content": answer},
            ]
        question, call = _tool_question(rng)
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        ]
        key = json.dumps(messages)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": messages, "tools": TOOLS})
    return rows


def resolve_data(path: str) -> str:
    """Return a real file path for a data source: the embedded JSONL for `embedded:pricer` / `embedded:tools`, an
    existing local file or folder as an absolute path, else `path` (a hub id)."""
    if not is_embedded(path):
        return absolute_if_local(path)
    if path not in EMBEDDED_DATASETS:
        raise LabError(
            f"data.path {path!r} is not a built-in dataset — the embedded ones are {', '.join(map(repr, EMBEDDED_DATASETS))}"
        )
    if path == EMBEDDED_TOOLS:
        out, make = cache_root() / f"tools-{DATA_SEED}-{TOOLS_ROWS}.jsonl", tool_rows
    else:
        out, make = cache_root() / f"pricer-v{PRICER_VERSION}-{DATA_SEED}-{DATA_ROWS}.jsonl", pricer_rows
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, "".join(json.dumps(r) + "\n" for r in make()))  # two notebooks may build it at once
    return str(out)


def _model_fingerprint() -> str:
    tok = tokenizer_dir() / "tokenizer.model"
    h = hashlib.sha256(json.dumps(TINY_LLAMA, sort_keys=True).encode())
    h.update(f"{MODEL_SEED}-{LM_HEAD_STD}".encode())
    h.update(tok.read_bytes())
    return h.hexdigest()[:12]


def resolve_model(name: str) -> str:
    """Return a loadable model path: the built tiny Llama folder for `embedded:tiny-llama`, the folder converted
    from a local `.gguf` file, an existing local folder as an absolute path, else `name` (a hub id)."""
    from .gguf_source import gguf_folder, is_gguf_file

    if is_gguf_file(name):
        return gguf_folder(name)
    if not is_embedded(name):
        return absolute_if_local(name)
    if name != EMBEDDED_MODEL:
        raise LabError(f"model.name {name!r} is not a built-in model — the embedded one is {EMBEDDED_MODEL!r}")
    out = cache_root() / f"tiny-llama-{_model_fingerprint()}"
    if not (out / "config.json").exists():
        _build_tiny_llama(out)
    return str(out)


def _build_tiny_llama(out: Path) -> None:
    """Write the tiny Llama (random init, fixed seed) and its tokenizer to `out`, atomically."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copy(tokenizer_dir() / "tokenizer.model", tmp / "tokenizer.model")
    tmp.replace(out) if not out.exists() else shutil.rmtree(tmp)


# ---------------------------------------------------------------- building the shipped tokenizer

# ChatML ending turns with <|im_end|>, with tools= and thinking traces (see lab_utils.chat.chatml_template).
CHAT_TEMPLATE = chatml_template("'<|im_end|>'", bos=True)


def build_tokenizer(out: Path, vocab_size: int = 512) -> None:
    """Train the SentencePiece tokenizer on the Pricer text and save it as a HF tokenizer in `out`."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lines = []
    for row in pricer_rows():
        lines += [t["value"] for t in row["conversations"]]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,  # any text encodes, even characters never seen in training
        split_digits=True,  # prices are learned digit by digit
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        num_threads=1,
        minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    for stale in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / stale).unlink(missing_ok=True)
    tok = LlamaTokenizer.from_pretrained(str(out), legacy=False)  # converts tokenizer.model
    tok.pad_token = "<pad>"
    tok.eos_token = "<|im_end|>"  # generation stops at the end of the assistant turn
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["tokenizer"]:
        target = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
        build_tokenizer(target)
        print(f"Saved tokenizer → {target}")
    else:
        print("usage: python -m lab_utils.embedded tokenizer")
