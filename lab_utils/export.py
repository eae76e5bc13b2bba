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

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .card import _finished, _flatten, _fmt, _is_secret, _table, write_model_card  # noqa: F401 — re-exported
from .choices import CONVERTER_OUTTYPES, EXPORT_PARTS  # noqa: F401 — the allowed values live below config
from .environment import pid_alive
from .errors import LabError, problem
from .gguf import (  # noqa: F401 — re-exported: the GGUF steps moved to gguf.py
    _CONVERTER_PARTS,
    LLAMA_CPP_PYTHON_VERSION,
    QUANTIZE_METHODS,
    SDIST_ENV,
    SDIST_NAME,
    _find_quantize,
    _stream,
    _tmp_file,
    check_gguf,
    converter_dir,
    quantize_gguf,
    to_gguf,
)
from .hub import _get_token, _upload_list, push_to_hub  # noqa: F401 — re-exported: the upload moved to hub.py

# bytes per parameter on disk (q4_k_m is ~4.9 bits per weight in practice)
_BYTES_PER_PARAM = {
    "merged": 2.0, "f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32,
    "q6_k": 0.82, "q5_k_m": 0.71, "q5_0": 22 / 32, "q4_k_m": 0.61, "q4_0": 18 / 32,
}


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


def _device_and_dtype() -> tuple[str, Any]:
    """Return ('cuda', float16) when a GPU is there, else ('cpu', float32): the dtype used for checks."""
    import torch

    from .hardware import cuda_available

    if cuda_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def _release() -> None:
    """Give back the memory of models the caller has just deleted (GPU included)."""
    from .hardware import free_memory

    free_memory()


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
        raise problem("no LoRA adapter", got=f"{adapter_dir} without adapter_config.json",
                      fix="pass the folder the trainer saved")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise problem("bad dtype", got=f"{dtype!r}", fix="use 'float16', 'bfloat16' or 'float32'")

    config = AutoConfig.from_pretrained(base_model_path, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise problem("base is a pre-quantized checkpoint", got=f"{base_model_path} with a quantization_config",
                      fix="merge into the 16-bit base (the same model id without '-bnb-4bit')")
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
# disk space


def free_space_ok(path: Path, need_bytes: int) -> None:
    """Return None if the filesystem holding `path` has need_bytes*1.1 free; raise a one-line OSError if not."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    need = int(need_bytes * 1.1)
    if free < need:
        raise problem(f"not enough disk space at {path}", got=f"{_human(free)} free, need {_human(need)}",
                      fix="delete old checkpoints or exports, or export to another folder (e.g. Drive)")


def _count_params(model_path: str) -> int:
    """Return the parameter count of a model: from local safetensors headers, else estimated from its config."""
    import math

    from safetensors import safe_open

    folder = Path(str(model_path)).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        total, float_only = 0, True
        for f in files:
            with safe_open(str(f), framework="numpy") as st:  # reads the header only, no tensor data
                for name in st.keys():
                    tensor = st.get_slice(name)
                    if not str(tensor.get_dtype()).startswith(("F", "BF")):
                        float_only = False  # packed 4-bit weights: the header does not give the true count
                    total += math.prod(tensor.get_shape())
        if float_only:
            return total
    from transformers import AutoConfig

    from .memory import shape_from_config

    return shape_from_config(AutoConfig.from_pretrained(str(model_path))).params()


def estimate_export_bytes(model_path: str, outtypes: Sequence[str]) -> int:
    """Return the disk bytes the exports in `outtypes` ('merged', 'f16', 'q8_0', 'q4_k_m', ...) will take."""
    if isinstance(outtypes, str):
        outtypes = [outtypes]
    unknown = [o for o in outtypes if o.lower() not in _BYTES_PER_PARAM]
    if unknown:
        raise problem("unknown export type", got=f"{unknown}", fix=f"use {sorted(_BYTES_PER_PARAM)}")
    n = _count_params(model_path)
    overhead = 20_000_000  # tokenizer, configs, GGUF metadata
    return int(sum(n * _BYTES_PER_PARAM[o.lower()] + overhead for o in outtypes))


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
    report = run.data_report()
    metrics = run.eval_dir / "metrics.json"
    swept = (run.dir / "sweep").is_dir() and any((run.dir / "sweep").glob("trial-*"))
    card = write_model_card(
        run.export_dir,
        run_name=run.name,
        base_model=run.cfg["model"]["name"],
        config={k: v for k, v in run.cfg.items() if swept or k != "sweep"},  # settings of a sweep that never ran: out
        metrics=json.loads(metrics.read_text()) if metrics.is_file() else None,
        data_report=_report_without_rows(report) if report is not None else None,
    )
    print(f"Saved model card → {run.display(card)}")
    return card


def push_export(run: Any, dry_run: bool | None = None) -> list[str]:
    """Upload the configured export parts to export.push_repo (private by default), or list them in a dry run."""
    cfg = run.cfg["export"]
    return push_to_hub(
        run.export_dir, cfg["push_repo"], what=tuple(cfg.get("push") or ("adapter",)), private=bool(cfg.get("private", True)), dry_run=dry_run
    )
