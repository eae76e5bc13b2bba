"""Export a trained LoRA adapter: merge into the 16-bit base, check the merge, convert to GGUF with
llama.cpp's own converter, check the GGUF with an independent reader, write a model card, push.

Layout of an export folder (``runs/<run>/export``)::

    export/README.md        model card (write_model_card)
    export/adapter/         the LoRA adapter as trained (copied there by the notebook)
    export/merged/          merge_adapter: base + adapter in 16 bits, safetensors + tokenizer
    export/gguf/*.gguf      to_gguf / quantize_gguf

Heavy libraries (torch, transformers, peft, huggingface_hub) are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# llama.cpp's converter comes from this llama-cpp-python source distribution (vendor/llama.cpp).
# Its gguf-py is gguf 0.19.0, the same version this package pins.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_ENV = "QLORA_LAB_LLAMA_CPP_SDIST"  # optional: path to an already-downloaded sdist (offline use)
from .embedded import cache_root  # noqa: E402  ($LAB_CACHE or ~/.cache/qlora-lab)
from .environment import get_secret, hub_reachable, pid_alive  # noqa: E402
from .errors import LabError  # noqa: E402

# Files of vendor/llama.cpp/ that convert_hf_to_gguf.py needs: the script, its `conversion`
# package (one module per architecture family), its own gguf-py, and the chat templates a few
# architectures read from models/templates. The requirements files are kept for reference.
_CONVERTER_PARTS = (
    "convert_hf_to_gguf.py",
    "conversion/",
    "gguf-py/gguf/",
    "gguf-py/pyproject.toml",
    "gguf-py/LICENSE",
    "models/templates/",
    "LICENSE",
    "requirements/requirements-convert_hf_to_gguf.txt",
    "requirements/requirements-convert_legacy_llama.txt",
)

CONVERTER_OUTTYPES = ("f16", "bf16", "f32", "q8_0")
QUANTIZE_METHODS = ("q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0", "q8_0")
# bytes per parameter on disk (q4_k_m is ~4.9 bits per weight in practice)
_BYTES_PER_PARAM = {
    "merged": 2.0, "f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32,
    "q6_k": 0.82, "q5_k_m": 0.71, "q5_0": 22 / 32, "q4_k_m": 0.61, "q4_0": 18 / 32,
}
EXPORT_PARTS = ("adapter", "merged", "gguf")


# ----------------------------------------------------------------------------------------------
# small helpers


def _human(n: float) -> str:
    """Return a byte count as a short human string (e.g. '1.4 GB')."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp sibling folder of `final`; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_LEFTOVER = re.compile(r"^\..+\.(?:partial|tmp|old)-(\d+)(?:\.[^/]*)?$")


def clean_leftovers(export_dir: Path) -> list[Path]:
    """Delete temp files and folders an interrupted export left (`.name.partial-<pid>.gguf`, `.adapter.tmp-<pid>`)
    whose process is gone; return what was removed."""
    removed: list[Path] = []
    if not export_dir.is_dir():
        return removed
    for p in sorted(export_dir.rglob(".*")):
        m = _LEFTOVER.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _finished(folder: Path, pattern: str) -> list[Path]:
    """Return the finished files matching pattern in folder (temp files start with '.')."""
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))


def _tmp_file(final: Path) -> Path:
    """Return a temp name next to `final` (same filesystem, so a rename is atomic)."""
    return final.parent / f".{final.stem.replace('{', '').replace('}', '')}.partial-{os.getpid()}{final.suffix}"


def _write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temp file and a rename; return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_file(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


_PER_TENSOR = re.compile(r"^INFO:hf-to-gguf:\S+\.weight,\s")  # one line per tensor: hundreds of them
_HARMLESS_CONVERTER = [  # llama.cpp converter warnings that change nothing in the file, said in words
    (re.compile(r"^WARNING:hf-to-gguf:Unknown RoPE type: default$"),
     "note: transformers 5 names plain RoPE 'default', a name llama.cpp's converter does not list; it writes "
     "rope scaling 'none', which is the same thing (the next line says so)"),
    (re.compile(r"^WARNING:gguf\.gguf_writer:Duplicated key name '([^']+)', overwriting it with new value (.+) of type"),
     "note: the converter set {0} twice (from the tokenizer's config and from its own defaults); the file keeps "
     "{1}, the tokenizer's own setting"),
]


def converter_line(line: str) -> str | None:
    """Return how a converter output line is shown: unchanged, a known-harmless warning explained, or None (hidden)."""
    if _PER_TENSOR.match(line):
        return None
    for rx, note in _HARMLESS_CONVERTER:
        if m := rx.match(line):
            return note.format(*m.groups())
    return line


def _stream(cmd: Sequence[str], env: dict[str, str] | None = None, what: str = "command",
            show: Callable[[str], str | None] = lambda line: line) -> None:
    """Run `cmd`, echoing its output live (progress bars included, each full line through `show`); raise a one-line
    error if it fails."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    tail = b""
    pending = ""
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(8192) if hasattr(proc.stdout, "read1") else proc.stdout.read(8192)
        if not chunk:
            break
        *lines, pending = (pending + chunk.decode("utf-8", errors="replace")).split("\n")
        for line in lines:
            shown = show(line)
            if shown is not None:
                sys.stdout.write(shown + "\n")
        if "\r" in pending:  # a progress bar redrawing its line
            sys.stdout.write(pending)
            pending = ""
        sys.stdout.flush()
        tail = (tail + chunk)[-4000:]
    if pending:
        sys.stdout.write(pending + "\n")
    rc = proc.wait()
    if rc != 0:
        lines = [ln.strip() for ln in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        raise LabError(f"{what} failed / got exit code {rc}: {last} / fix: read the output above")


def _device_and_dtype() -> tuple[str, Any]:
    """Return ('cuda', float16) when a GPU is there, else ('cpu', float32): the dtype used for checks."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def _release() -> None:
    """Give back the memory of models the caller has just deleted (GPU included)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _random_ids(vocab_size: int, n_tokens: int, seed: int) -> Any:
    """Return a (1, n_tokens) tensor of random token ids from a seeded generator."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, n_tokens), generator=gen)


def _logits(model: Any, ids: Any) -> Any:
    """Return the float32 CPU logits (n_tokens, vocab) of `model` on `ids`."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=ids.to(device)).logits[0]
    return out.float().cpu()


def _compare(a: Any, b: Any) -> dict[str, float]:
    """Return max_abs_diff, top1_agreement and mean cosine between two logit matrices."""
    import torch

    n = min(a.shape[-1], b.shape[-1])
    a, b = a[:, :n], b[:, :n]
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()),
    }


# ----------------------------------------------------------------------------------------------
# merge


def _has_tokenizer(path: Path) -> bool:
    """Return True if `path` is a folder holding a saved tokenizer."""
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))


def _sentencepiece_file(tokenizer: Any, *folders: Any) -> Path | None:
    """Return the SentencePiece tokenizer.model behind a tokenizer (its vocab_file, a local folder or the hub), if any."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(vocab_file, str) and vocab_file.endswith(".model") and os.path.isfile(vocab_file):
        return Path(vocab_file)
    for folder in folders:
        if Path(str(folder)).is_dir() and (Path(str(folder)) / "tokenizer.model").is_file():
            return Path(str(folder)) / "tokenizer.model"
    for repo in folders:
        if not Path(str(repo)).exists() and str(repo).count("/") == 1:  # a hub id: usually already cached
            try:
                from huggingface_hub import hf_hub_download

                return Path(hf_hub_download(str(repo), "tokenizer.model"))
            except Exception:  # no such file (byte-level BPE model) or offline: converter uses tokenizer.json
                pass
    return None


def merge_adapter(
    base_model_path: str,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "float16",
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> Path:
    """Merge the LoRA adapter into the 16-bit base and save it (safetensors + tokenizer); return out_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LabError(
            f"no LoRA adapter / got {adapter_dir} without adapter_config.json / fix: pass the folder the trainer saved"
        )
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise LabError(f"bad dtype / got {dtype!r} / fix: use 'float16', 'bfloat16' or 'float32'")

    config = AutoConfig.from_pretrained(base_model_path, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise LabError(
            f"base is a pre-quantized checkpoint / got {base_model_path} with a quantization_config / "
            "fix: merge into the 16-bit base (the same model id without '-bnb-4bit')"
        )
    adapter_base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if adapter_base and (
        Path(str(adapter_base)).name.lower().replace("-bnb-4bit", "") != Path(str(base_model_path)).name.lower()
    ):
        print(f"note: adapter was trained on {adapter_base}; merging into {base_model_path}")

    est = estimate_export_bytes(base_model_path, ["merged"])
    free_space_ok(out_dir.parent, est)

    print(f"[1/3] loading base {base_model_path} in {dtype} on {device} ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        base_model_path, dtype=torch_dtype, device_map={"": device}, trust_remote_code=trust_remote_code
    )
    print(f"[2/3] applying adapter {adapter_dir} and merging ...", flush=True)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model = model.merge_and_unload(progressbar=True, safe_merge=True)

    tok_src = adapter_dir if _has_tokenizer(adapter_dir) else base_model_path
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=trust_remote_code)
    print(f"[3/3] saving merged model to {out_dir} (tokenizer from {tok_src}) ...", flush=True)
    with _atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        # transformers 5 saves tokenizer.json only; llama.cpp's converter reads the SentencePiece model
        spm = _sentencepiece_file(tokenizer, adapter_dir, base_model_path)
        if spm is not None and not (tmp / "tokenizer.model").exists():
            shutil.copy2(spm, tmp / "tokenizer.model")
        if not (tmp / "generation_config.json").exists():
            try:
                GenerationConfig.from_pretrained(base_model_path).save_pretrained(tmp)
            except Exception:  # the base has none: transformers' defaults apply
                pass
    del model
    _release()
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    print(f"merged model saved: {out_dir} ({_human(size)})")
    return out_dir


def check_merged(
    base_model_path: str, adapter_dir: Path, merged_dir: Path, n_tokens: int = 64, seed: int = 0
) -> dict[str, float]:
    """Return {'max_abs_diff', 'top1_agreement', 'cosine'} between base+adapter (unmerged) and the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device, dtype = _device_and_dtype()
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype, device_map={"": device})
    ids = _random_ids(base.config.vocab_size, n_tokens, seed)
    unmerged = PeftModel.from_pretrained(base, str(adapter_dir))
    ref = _logits(unmerged, ids)
    del unmerged, base
    _release()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype, device_map={"": device})
    got = _logits(merged, ids)
    del merged
    _release()
    return _compare(ref, got)


# ----------------------------------------------------------------------------------------------
# llama.cpp converter


def _converter_ok(folder: Path) -> bool:
    """Return True if `folder` holds a complete converter extraction."""
    return all(
        (folder / f).is_file()
        for f in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py")
    )


def _find_or_download_sdist(root: Path, workdir: Path) -> Path:
    """Return a path to the pinned llama-cpp-python sdist: $QLORA_LAB_LLAMA_CPP_SDIST, the cache, or pip download."""
    env = os.environ.get(SDIST_ENV)
    if env:
        if not Path(env).is_file():
            raise LabError(f"${SDIST_ENV} is not a file / got {env} / fix: point it at {SDIST_NAME} or unset it")
        return Path(env)
    if (root / SDIST_NAME).is_file():
        return root / SDIST_NAME
    print(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source (~77 MB, once) for llama.cpp's converter ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(workdir), "--progress-bar", "off"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = list(workdir.glob("llama_cpp_python-*.tar.gz"))
    if res.returncode != 0 or not found:
        lines = [ln for ln in (res.stderr or res.stdout or "").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit code {res.returncode}"
        raise LabError(
            f"cannot get llama.cpp's converter / pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "
            f"failed: {last} / fix: connect to the internet, or put {SDIST_NAME} in {root} or set ${SDIST_ENV}"
        )
    return found[0]


def _extract_converter(sdist: Path, dest: Path) -> None:
    """Extract the converter's files (see _CONVERTER_PARTS) from the sdist into dest."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    n = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if ".." in Path(rel).parts or not any(
                rel == p or (p.endswith("/") and rel.startswith(p)) for p in _CONVERTER_PARTS
            ):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
    if n == 0:
        raise LabError(f"converter not in the sdist / got no files under {prefix} in {sdist} / fix: re-download it")


def converter_dir(cache_dir: Path | None = None) -> Path:
    """Return the cached folder holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py (fetched once)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if _converter_ok(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as work:
        sdist = _find_or_download_sdist(root, Path(work))
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        with _atomic_dir(folder) as tmp:
            _extract_converter(sdist, tmp)
            (tmp / "SOURCE.txt").write_text(f"{sdist.name}\nsha256 {digest}\n")
            if not _converter_ok(tmp):
                raise LabError(f"incomplete converter / got {sorted(p.name for p in tmp.iterdir())} / fix: report this")
    print(f"llama.cpp converter ready: {folder}")
    return folder


def to_gguf(merged_dir: Path, out_path: Path, outtype: str = "f16") -> Path:
    """Convert a merged HF model folder to GGUF with llama.cpp's converter; return the GGUF path."""
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    if outtype not in CONVERTER_OUTTYPES:
        raise LabError(
            f"bad outtype / got {outtype!r} / fix: use one of {CONVERTER_OUTTYPES}; for q4_k_m run quantize_gguf on the f16 file"
        )
    if not (merged_dir / "config.json").is_file():
        raise LabError(f"not a model folder / got {merged_dir} without config.json / fix: run merge_adapter first")
    conv = converter_dir()
    weights = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors"))
    need = int(weights * _BYTES_PER_PARAM[outtype] / 2) if weights else 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    free_space_ok(out_path.parent, need)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    tmp = _tmp_file(out_path)
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(merged_dir),
           "--outfile", str(tmp), "--outtype", outtype]
    print(f"converting {merged_dir} -> {out_path} ({outtype}) with llama.cpp {LLAMA_CPP_PYTHON_VERSION} converter ...")
    try:
        _stream(cmd, env=env, what=f"convert_hf_to_gguf ({outtype})", show=converter_line)
        if not tmp.is_file():
            raise LabError(f"converter wrote nothing / got no {tmp.name} / fix: read the converter output above")
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"GGUF written: {out_path} ({_human(out_path.stat().st_size)})")
    return out_path


def _find_quantize() -> Path | None:
    """Return a llama.cpp `llama-quantize` binary: $LLAMA_QUANTIZE, PATH, or unsloth's llama.cpp build."""
    env = os.environ.get("LLAMA_QUANTIZE")
    if env and os.access(env, os.X_OK):
        return Path(env)
    for name in ("llama-quantize", "quantize"):
        found = shutil.which(name)
        if found and (name == "llama-quantize" or "llama" in found):
            return Path(found)
    roots = [os.environ.get("UNSLOTH_LLAMA_CPP_PATH"), str(Path.home() / ".unsloth" / "llama.cpp"), "llama.cpp"]
    for root in filter(None, roots):
        for rel in ("llama-quantize", "build/bin/llama-quantize", "quantize"):
            p = Path(root) / rel
            if p.is_file() and os.access(p, os.X_OK):
                return p
    return None


def quantize_gguf(src: Path, dst: Path, method: str = "q4_k_m") -> Path | None:
    """Quantize a f16/bf16/f32 GGUF with llama.cpp's llama-quantize; return dst, or None (reason printed) without one."""
    src, dst = Path(src), Path(dst)
    if method.lower() not in QUANTIZE_METHODS:
        raise LabError(f"bad quantization method / got {method!r} / fix: use one of {QUANTIZE_METHODS}")
    if not src.is_file():
        raise LabError(f"no source GGUF / got {src} / fix: run to_gguf(..., outtype='f16') first")
    binary = _find_quantize()
    if binary is None:
        print(
            f"skipped {method}: no llama-quantize binary (not on PATH, not in ~/.unsloth/llama.cpp) - "
            "use the q8_0 GGUF, or build llama.cpp (cmake --build build --target llama-quantize) and put it on PATH"
        )
        return None
    free_space_ok(dst.parent, int(src.stat().st_size * _BYTES_PER_PARAM.get(method.lower(), 1.0) / 2))
    tmp = _tmp_file(dst)
    try:
        _stream([str(binary), str(src), str(tmp), method.upper()], what=f"llama-quantize ({method})")
        if not tmp.is_file():
            raise LabError(f"llama-quantize wrote nothing / got no {tmp.name} / fix: read its output above")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"GGUF written: {dst} ({_human(dst.stat().st_size)})")
    return dst


def check_gguf(merged_dir: Path, gguf_path: Path, n_tokens: int = 64, seed: int = 0) -> dict[str, float]:
    """Return {'top1_agreement', 'cosine', 'n_tensors', 'file_size'} of the GGUF (read by transformers) vs the merged model."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    gguf_path = Path(os.path.abspath(gguf_path))
    merged_dir = Path(os.path.abspath(merged_dir))
    n_tensors = len(GGUFReader(str(gguf_path)).tensors)
    device, dtype = _device_and_dtype()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype, device_map={"": device})
    ids = _random_ids(merged.config.vocab_size, n_tokens, seed)
    ref = _logits(merged, ids)
    del merged
    _release()
    # gguf_file is a name inside the (absolute) folder: transformers joins the two, and a relative
    # folder would be looked up on the Hub
    back = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype, device_map={"": device}
    )
    got = _logits(back, ids)
    del back
    _release()
    cmp = _compare(ref, got)
    return {
        "top1_agreement": cmp["top1_agreement"],
        "cosine": cmp["cosine"],
        "n_tensors": n_tensors,
        "file_size": gguf_path.stat().st_size,
    }


# ----------------------------------------------------------------------------------------------
# disk space


def free_space_ok(path: Path, need_bytes: int) -> None:
    """Return None if the filesystem holding `path` has need_bytes*1.1 free; raise a one-line OSError if not."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    need = int(need_bytes * 1.1)
    if free < need:
        raise LabError(
            f"not enough disk space at {path} / got {_human(free)} free, need {_human(need)} / "
            "fix: delete old checkpoints or exports, or export to another folder (e.g. Drive)"
        )


def _count_params(model_path: str) -> int:
    """Return the parameter count of a model: from local safetensors headers, else estimated from its config."""
    import math

    folder = Path(str(model_path)).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        total, float_only = 0, True
        for f in files:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if not str(info.get("dtype", "")).startswith(("F", "BF")):
                    float_only = False  # packed 4-bit weights: the header does not give the true count
                total += math.prod(info.get("shape", []))
        if float_only:
            return total
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_path))
    cfg = getattr(cfg, "text_config", None) or cfg
    h, inter = cfg.hidden_size, cfg.intermediate_size
    n_layers, vocab = cfg.num_hidden_layers, cfg.vocab_size
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or h // n_heads
    attn = h * n_heads * head_dim * 2 + h * n_kv * head_dim * 2
    per_layer = attn + 3 * h * inter + 2 * h
    embed = vocab * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return int(n_layers * per_layer + embed + h)


def estimate_export_bytes(model_path: str, outtypes: Sequence[str]) -> int:
    """Return the disk bytes the exports in `outtypes` ('merged', 'f16', 'q8_0', 'q4_k_m', ...) will take."""
    if isinstance(outtypes, str):
        outtypes = [outtypes]
    unknown = [o for o in outtypes if o.lower() not in _BYTES_PER_PARAM]
    if unknown:
        raise LabError(f"unknown export type / got {unknown} / fix: use {sorted(_BYTES_PER_PARAM)}")
    n = _count_params(model_path)
    overhead = 20_000_000  # tokenizer, configs, GGUF metadata
    return int(sum(n * _BYTES_PER_PARAM[o.lower()] + overhead for o in outtypes))


# ----------------------------------------------------------------------------------------------
# model card


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return a nested dict flattened to dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


LOCAL = "a local model"  # what the card says instead of a path, a file or an embedded: name


def _public(v: Any) -> Any:
    """Return v, or "(a local path)" for a string that names a file or folder on this machine: never published."""
    if isinstance(v, str) and ("/" in v or "\\" in v) and (v.startswith(("/", "~", ".")) or Path(v).expanduser().exists()):
        return "(a local path)"
    return v


def _is_secret(key: str, value: Any = None) -> bool:
    """Return True for entries that may hold credentials (never written to the card): config.is_secret decides."""
    from .config import is_secret

    return is_secret(key, value) or (isinstance(value, (list, tuple)) and any(is_secret(key, v) for v in value))


def _fmt(v: Any) -> str:
    """Return a value formatted for a markdown table cell."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if len(v) <= 12 else f"{len(v)} items"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, Any], head: tuple[str, str] = ("setting", "value")) -> str:
    """Return a two-column markdown table."""
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


_LORA_KEYS = {"r", "rank", "lora_r", "lora_alpha", "alpha", "lora_dropout", "target_modules", "bias",
              "use_rslora", "use_dora", "modules_to_save", "init_lora_weights"}


def write_model_card(
    out_dir: Path,
    *,
    run_name: str,
    base_model: str,
    config: dict[str, Any],
    metrics: dict[str, Any] | None,
    data_report: dict[str, Any] | None,
) -> Path:
    """Write out_dir/README.md (YAML front matter + base, data, LoRA, training, metrics, use and limits); return its path."""
    import yaml

    out_dir = Path(out_dir)
    if metrics is None:
        mfile = out_dir.parent / "eval" / "metrics.json"
        if mfile.is_file():
            metrics = json.loads(mfile.read_text())
    from .model import hub_model_id

    hub = hub_model_id(base_model)
    flat = {k: _public(v) for k, v in _flatten(config or {}).items() if not _is_secret(k, v)}
    for key in ("model.name", "model.tokenizer"):
        if flat.get(key) and not hub_model_id(flat[key]):
            flat[key] = LOCAL
    lora, data_cfg, train = {}, {}, {}
    for k, v in flat.items():
        parts = k.lower().split(".")
        if "lora" in parts[0] or parts[-1] in _LORA_KEYS:
            lora[k] = v
        elif parts[0] in ("data", "dataset") or parts[-1] in ("dataset", "dataset_name", "data_path"):
            data_cfg[k] = v
        else:
            train[k] = v

    tags = ["qlora", "lora", "peft", "sft", "text-generation", "qlora-lab"]
    exported = {p for p in EXPORT_PARTS if (out_dir / p).exists()}
    if "gguf" in exported:
        tags.append("gguf")
    # base_model only as a hub id: the Hub links it; a path, a .gguf file or embedded: is nothing to link
    front = {**({"base_model": hub} if hub else {}), "library_name": "peft", "pipeline_tag": "text-generation",
             "tags": tags}
    base_ref = f"for [`{hub}`](https://huggingface.co/{hub})" if hub else "trained from a local model (not on the Hub)"
    s: list[str] = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    s += [f"# {run_name}", "",
          f"A LoRA adapter {base_ref}, trained with QLoRA (4-bit base, 16-bit adapter) in the qlora-lab notebooks.", ""]
    file_lines = {
        "adapter": "- `adapter/` - the LoRA adapter: `PeftModel.from_pretrained("
                   "AutoModelForCausalLM.from_pretrained(base), repo, subfolder='adapter')`",
        "merged": "- `merged/` - the adapter merged into the 16-bit base: "
                  "`AutoModelForCausalLM.from_pretrained(repo, subfolder='merged')`",
        "gguf": "- `gguf/` - the merged model for llama.cpp / Ollama / LM Studio: "
                + (", ".join(f"`{g.name}`" for g in _finished(out_dir / "gguf", "*.gguf")) or "f16, q8_0"),
    }
    s += ["## Files", "", *(file_lines[p] for p in EXPORT_PARTS if p in exported or not exported), ""]
    what = f"`{hub}`" if hub else "Trained from a local model (a file or folder on the training machine, not a Hub id)"
    s += ["## Base model", "", f"{what}, loaded in 4 bits (NF4) for training; merged into its 16-bit weights.", ""]
    s += ["## Data", ""]
    if data_cfg:
        s += [_table(data_cfg), ""]
    if data_report:
        rows = {k: _public(v) for k, v in _flatten(data_report).items()
                if not _is_secret(k, v) and not (isinstance(v, (list, tuple)) and len(v) > 12)}
        s += ["Data report summary:", "", _table(dict(list(rows.items())[:40]), ("item", "value")), ""]
    if not data_cfg and not data_report:
        s += ["Not recorded.", ""]
    s += ["## LoRA", "", _table(lora) if lora else "Not recorded.", ""]
    s += ["## Training hyperparameters", "", _table(train) if train else "Not recorded.", ""]
    s += ["## Evaluation", ""]
    if metrics:
        # the constant guess's answer is a training row's answer: numbers only from the baseline, no data in the card
        mrows = {k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float, str)) and not _is_secret(k, v)
                 and not (k.startswith("baseline.") and isinstance(v, str))}
        s += [_table(mrows, ("metric", "value")), ""]
    else:
        s += ["No eval/metrics.json was found for this run.", ""]
    s += ["## Intended use and limits", "",
          "- A teaching artifact from a fine-tuning lab: for learning and experiments, not production.",
          "- Small model, short training: it can be confidently wrong, repeat itself or drift off-topic; "
          "check anything that matters.",
          "- Not evaluated for safety, bias or toxicity; it inherits the base model's limitations and license "
          f"(see {f'`{hub}`' if hub else 'its own card'}).",
          "- Use the chat template saved with the tokenizer; other prompt formats will work worse.",
          "- GGUF q8_0/q4_k_m files are quantized: expect small differences from the 16-bit model.", ""]
    return _write_text_atomic(out_dir / "README.md", "\n".join(s))


# ----------------------------------------------------------------------------------------------
# push


def _truthy(v: str | None) -> bool:
    """Return True for '1', 'true', 'yes', 'on' (any case)."""
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def _get_token(token: str | None) -> str | None:
    """Return the HF token: the argument, else $HF_TOKEN, else Colab's secret 'HF_TOKEN' (never printed)."""
    if token:
        return token
    return get_secret("HF_TOKEN") or None


def _upload_list(export_dir: Path, what: Sequence[str]) -> list[tuple[str, int]]:
    """Return [(path in repo, size)] for README.md and the files of the chosen export parts."""
    files: list[tuple[str, int]] = []
    if (export_dir / "README.md").is_file():
        files.append(("README.md", (export_dir / "README.md").stat().st_size))
    for part in what:
        root = export_dir / part
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(export_dir)
            if f.is_file() and not any(p.startswith(".") for p in rel.parts):
                files.append((rel.as_posix(), f.stat().st_size))
    return files


def push_to_hub(
    export_dir: Path,
    repo_id: str,
    *,
    what: Sequence[str] = ("adapter", "merged", "gguf"),
    private: bool = True,
    dry_run: bool | None = None,
    token: str | None = None,
) -> list[str]:
    """Upload README.md + the chosen parts of export_dir to repo_id (or, in a dry run, list them); return the paths in the repo."""
    export_dir = Path(export_dir)
    bad = [w for w in what if w not in EXPORT_PARTS]
    if bad:
        raise LabError(f"unknown export part / got {bad} / fix: choose from {EXPORT_PARTS}")
    if "/" not in repo_id:
        raise LabError(f"repo id needs an owner / got {repo_id!r} / fix: use 'your-username/{repo_id}'")
    files = _upload_list(export_dir, what)
    if not files:
        raise LabError(f"nothing to upload / got no files for {list(what)} in {export_dir} / fix: run the export first")
    tok = _get_token(token)
    reason = ""
    if dry_run is None:
        if not tok:
            dry_run, reason = True, "no HF token (set HF_TOKEN in Colab secrets)"
        elif _truthy(os.environ.get("HF_HUB_OFFLINE")):
            dry_run, reason = True, "HF_HUB_OFFLINE is set"
        elif not hub_reachable():
            dry_run, reason = True, "the Hub is unreachable"
        else:
            dry_run = False
    total = sum(size for _, size in files)
    if dry_run:
        print(f"dry run{f' ({reason})' if reason else ''}: would upload {len(files)} files ({_human(total)}) "
              f"to https://huggingface.co/{repo_id} ({'private' if private else 'public'}):")
        for path, size in files:
            print(f"  {repo_id}: {path}  ({_human(size)})")
        return [p for p, _ in files]
    if not tok:
        raise LabError("no Hugging Face token / got none in the argument, $HF_TOKEN or Colab secrets / "
                           "fix: add HF_TOKEN (write access) in Colab's key icon, or push with dry_run=True")
    from huggingface_hub import HfApi

    api = HfApi(token=tok)
    print(f"pushing {len(files)} files ({_human(total)}) to https://huggingface.co/{repo_id} ...")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(export_dir),
        repo_type="model",
        allow_patterns=[p for p, _ in files],
        commit_message=f"Upload {', '.join(what)} from qlora-lab",
    )
    print(f"done: https://huggingface.co/{repo_id}")
    return [p for p, _ in files]


# ---------------------------------------------------------------- run-level steps used by 04_export


def export_adapter(run: Any, adapter_dir: Path | None = None) -> Path:
    """Copy an adapter (with its tokenizer) to export/adapter atomically; return that folder.

    Without adapter_dir: the best checkpoint by validation loss (eval/metrics.json), unless
    `export.adapter: last` (or no evaluation) picks the final adapter. Training state is left out.
    """
    from .evaluation import TRAINING_STATE_FILES, export_adapter_source

    if adapter_dir is None:
        adapter_dir, why = export_adapter_source(run)
        print(f"Exporting {why}")
    src = Path(adapter_dir)
    if not (src / "adapter_config.json").is_file():
        raise LabError(f"no adapter in {run.display(src)} — run 02_train first")
    for p in clean_leftovers(run.export_dir):
        print(f"Removed {run.display(p)}: left by an export that was interrupted")
    need = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and p.name not in TRAINING_STATE_FILES)
    free_space_ok(run.dir, need)
    dest = run.export_dir / "adapter"
    with _atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*TRAINING_STATE_FILES))
    print(f"Saved adapter → {run.display(dest)}")
    return dest


def export_merged(run: Any) -> Path:
    """Merge the adapter into the 16-bit base, check its logits against base+adapter; return the merged folder."""
    from .display import show_table
    from .model import model_source

    base = model_source(run.cfg)
    adapter = run.export_dir / "adapter"
    if not adapter.is_dir():
        adapter = export_adapter(run)
    out = merge_adapter(
        base, adapter, run.export_dir / "merged", trust_remote_code=bool(run.cfg["model"].get("trust_remote_code"))
    )
    check = check_merged(base, adapter, out)
    show_table([{"check": k, "value": v} for k, v in check.items()], title="Merged vs base + adapter")
    if check.get("top1_agreement", 0) < 0.99:
        print("⚠ The merged model disagrees with base + adapter more than expected; inspect before sharing.")
    print(f"Saved merged model → {run.display(out)}")
    return out


def export_gguf(run: Any, merged: Path) -> list[dict[str, Any]]:
    """Convert the merged model to each configured GGUF type, read each back; return one row per file."""
    rows: list[dict[str, Any]] = []
    folder = run.export_dir / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    types = list(run.cfg["export"]["gguf"])
    free_space_ok(folder, estimate_export_bytes(str(merged), types))
    f16: Path | None = None
    for outtype in types:
        dst = folder / f"{run.name}-{outtype}.gguf"
        if outtype == "q4_k_m":
            if f16 is None:
                f16 = to_gguf(merged, folder / f"{run.name}-f16.gguf", "f16")
            made = quantize_gguf(f16, dst, "q4_k_m")
            if made is None:
                rows.append({"file": dst.name, "status": "skipped: llama-quantize not found"})
                continue
        else:
            made = to_gguf(merged, dst, outtype)
            if outtype == "f16":
                f16 = made
        check = check_gguf(merged, made)
        rows.append({"file": made.name, "status": "ok", **check})
        print(f"Saved GGUF → {run.display(made)}")
    return rows


def _report_without_rows(report: dict[str, Any]) -> dict[str, Any]:
    """Return the data report without row excerpts: a model card must not publish training rows."""
    out = {k: v for k, v in report.items() if k != "examples"}
    if isinstance(out.get("truncated"), dict):
        out["truncated"] = {k: v for k, v in out["truncated"].items() if k != "examples"}
    return out


def export_card(run: Any) -> Path:
    """Write export/README.md from the run's config, data report and eval metrics; return its path."""
    report = run.data_dir / "data_report.json"
    metrics = run.eval_dir / "metrics.json"
    swept = (run.dir / "sweep").is_dir() and any((run.dir / "sweep").glob("trial-*"))
    card = write_model_card(
        run.export_dir,
        run_name=run.name,
        base_model=run.cfg["model"]["name"],
        config={k: v for k, v in run.cfg.items() if swept or k != "sweep"},  # settings of a sweep that never ran: out
        metrics=json.loads(metrics.read_text()) if metrics.is_file() else None,
        data_report=_report_without_rows(json.loads(report.read_text())) if report.is_file() else None,
    )
    print(f"Saved model card → {run.display(card)}")
    return card


def push_export(run: Any, dry_run: bool | None = None) -> list[str]:
    """Upload the configured export parts to export.push_repo (private by default), or list them in a dry run."""
    cfg = run.cfg["export"]
    return push_to_hub(
        run.export_dir, cfg["push_repo"], what=tuple(cfg.get("push") or ("adapter",)), private=bool(cfg.get("private", True)), dry_run=dry_run
    )
