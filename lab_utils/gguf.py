"""GGUF: llama.cpp's own converter (from the pinned llama-cpp-python sdist), quantization, and a check.

`to_gguf` converts a merged 16-bit model, `quantize_gguf` makes q4_k_m and friends with
llama-quantize when one is installed, `check_gguf` reads the file back with an independent reader
and compares its logits with the merged model's. Files are written under a `.partial-<pid>` name
and renamed when whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .choices import CONVERTER_OUTTYPES
from .embedded import cache_root  # $LAB_CACHE or ~/.cache/qlora-lab
from .errors import LabError, problem

# llama.cpp's converter comes from this llama-cpp-python source distribution (vendor/llama.cpp).
# Its gguf-py is gguf 0.19.0, the same version this package pins.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_ENV = "QLORA_LAB_LLAMA_CPP_SDIST"  # optional: path to an already-downloaded sdist (offline use)

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

QUANTIZE_METHODS = ("q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0", "q8_0")


def _tmp_file(final: Path) -> Path:
    """Return a temp name next to `final` (same filesystem, so a rename is atomic)."""
    return final.parent / f".{final.stem.replace('{', '').replace('}', '')}.partial-{os.getpid()}{final.suffix}"


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
        raise problem(f"{what} failed", got=f"exit code {rc}: {last}", fix="read the output above")


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
            raise problem(f"${SDIST_ENV} is not a file", got=f"{env}", fix=f"point it at {SDIST_NAME} or unset it")
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
            f"cannot get llama.cpp's converter, got 'pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}' "
            f"failed: {last} — connect to the internet, or put {SDIST_NAME} in {root} or set ${SDIST_ENV}"
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
        raise problem("converter not in the sdist", got=f"no files under {prefix} in {sdist}", fix="re-download it")


def converter_dir(cache_dir: Path | None = None) -> Path:
    """Return the cached folder holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py (fetched once)."""
    from .export import _atomic_dir  # export imports this module: its helpers come late

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
                raise problem("incomplete converter", got=f"{sorted(p.name for p in tmp.iterdir())}", fix="report this")
    print(f"llama.cpp converter ready: {folder}")
    return folder


def to_gguf(merged_dir: Path, out_path: Path, outtype: str = "f16") -> Path:
    """Convert a merged HF model folder to GGUF with llama.cpp's converter; return the GGUF path."""
    from .export import _BYTES_PER_PARAM, free_space_ok

    merged_dir, out_path = Path(merged_dir), Path(out_path)
    if outtype not in CONVERTER_OUTTYPES:
        raise problem("bad outtype", got=repr(outtype),
                      fix=f"use one of {CONVERTER_OUTTYPES}; for q4_k_m run quantize_gguf on the f16 file")
    if not (merged_dir / "config.json").is_file():
        raise problem("not a model folder", got=f"{merged_dir} without config.json", fix="run merge_adapter first")
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
    print(f"converting {merged_dir} -> {out_path} ({outtype}) with llama.cpp {LLAMA_CPP_PYTHON_VERSION} converter ...")
    return _written_by(
        lambda tmp: [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(merged_dir),
                     "--outfile", str(tmp), "--outtype", outtype],
        out_path, f"convert_hf_to_gguf ({outtype})", env=env, show=converter_line,
    )


def _written_by(command, dst: Path, what: str, env: dict[str, str] | None = None,
                show: Callable[[str], str | None] = lambda line: line) -> Path:
    """Run command(tmp) (a llama.cpp tool writing tmp), then rename tmp to dst when it is there; return dst."""
    from .export import _human

    tmp = _tmp_file(dst)
    try:
        _stream(command(tmp), env=env, what=what, show=show)
        if not tmp.is_file():
            raise problem(f"{what} wrote nothing", got=f"no {tmp.name}", fix="read its output above")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"GGUF written: {dst} ({_human(dst.stat().st_size)})")
    return dst


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
    from .export import _BYTES_PER_PARAM, free_space_ok

    src, dst = Path(src), Path(dst)
    if method.lower() not in QUANTIZE_METHODS:
        raise problem("bad quantization method", got=f"{method!r}", fix=f"use one of {QUANTIZE_METHODS}")
    if not src.is_file():
        raise problem("no source GGUF", got=f"{src}", fix="run to_gguf(..., outtype='f16') first")
    binary = _find_quantize()
    if binary is None:
        print(
            f"skipped {method}: no llama-quantize binary (not on PATH, not in ~/.unsloth/llama.cpp) - "
            "use the q8_0 GGUF, or build llama.cpp (cmake --build build --target llama-quantize) and put it on PATH"
        )
        return None
    free_space_ok(dst.parent, int(src.stat().st_size * _BYTES_PER_PARAM.get(method.lower(), 1.0) / 2))
    return _written_by(lambda tmp: [str(binary), str(src), str(tmp), method.upper()], dst, f"llama-quantize ({method})")


def check_gguf(merged_dir: Path, gguf_path: Path, n_tokens: int = 64, seed: int = 0) -> dict[str, float]:
    """Return {'top1_agreement', 'cosine', 'n_tensors', 'file_size'} of the GGUF (read by transformers) vs the merged model."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from .export import _compare, _device_and_dtype, _logits, _random_ids, _release

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
