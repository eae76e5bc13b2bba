"""Data preparation: any common source in, every row validated, tokenized with masks, reported, cached.

The processed dataset (columns `input_ids`, `assistant_masks`, `messages`) is what TRL's
SFTTrainer consumes as is: it turns `assistant_masks` into labels, so only assistant tokens
(and the end-of-turn token after them) carry loss.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from . import __version__
from .chat import RowError, detect_format, ensure_chat_template, standardize, tokenize_chat
from .embedded import is_embedded, resolve_data
from .errors import LabError

__all__ = ["load_source", "prepare", "load_prepared", "data_fingerprint", "length_stats", "report_table"]

LOCAL_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}
PROCESSING_VERSION = "1"  # bump when the processed rows change for the same inputs
EXAMPLES_PER_REASON = 3


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_TYPES and p.is_file())
        if not files:
            raise LabError(f"data.path {str(path)!r} holds no .json/.jsonl/.csv/.parquet file — point it at one")
    kinds = {LOCAL_TYPES.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise LabError(
            f"data.path {str(files[0])!r}: unsupported file type {files[0].suffix!r} — use JSON, JSONL, CSV or Parquet"
        )
    if len(kinds) > 1:
        raise LabError(f"data.path {str(path)!r} mixes file types {sorted(kinds)} — keep one type per folder")
    for p in files:
        if p.stat().st_size == 0:
            raise LabError(f"data file {str(p)!r} is empty — check the file or point data.path elsewhere")
    return kinds.pop(), [str(p) for p in files]


def _check_json_lines(path: str) -> None:
    """Raise LabError naming the first malformed line of a JSONL file (datasets' own error hides it)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.read(1)
        if first == "[":
            return  # a JSON array, not JSON lines
        f.seek(0)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError as e:
                raise LabError(
                    f"data file {path!r} line {n} is not valid JSON ({e.msg}) — fix or delete that line"
                ) from None


def load_source(cfg: dict):
    """Return the raw source as a datasets.DatasetDict (a 'train' split, plus 'validation' if the source has one)."""
    import datasets

    d = cfg["data"]
    spec = resolve_data(d["path"])
    path = Path(spec).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        if builder == "json":
            for f in files:
                _check_json_lines(f)
        kwargs = {"delimiter": "\t"} if files[0].endswith(".tsv") else {}
        try:
            ds = datasets.load_dataset(builder, data_files={"train": files}, **kwargs)
        except Exception as e:
            msg = str(e).splitlines()[0][:200]
            raise LabError(f"data.path {spec!r} could not be read as {builder} ({msg}) — check the file's format") from None
    elif "/" in spec and not spec.startswith((".", "/", "~")) and not is_embedded(spec):
        try:
            ds = datasets.load_dataset(spec, d.get("name"), split=None)
        except Exception as e:
            msg = str(e).splitlines()[0][:200]
            raise LabError(
                f"data.path {spec!r} is not a local file and could not be loaded from the hub ({msg}) — "
                "check the id, data.name/data.split, and your connection"
            ) from None
        if d.get("split"):
            if d["split"] not in ds:
                raise LabError(f"data.split {d['split']!r} not in {spec!r}; it has {sorted(ds)}")
            ds = datasets.DatasetDict({"train": ds[d["split"]]})
    else:
        raise LabError(f"data.path {spec!r} does not exist — give a local file/folder or a hub id like 'org/name'")
    out = datasets.DatasetDict({"train": ds["train"] if "train" in ds else ds[next(iter(ds))]})
    for name in ("validation", "valid", "val", "test"):
        if name in ds and not d.get("split"):
            out["validation"] = ds[name]
            break
    if d.get("limit"):
        out = datasets.DatasetDict({k: v.select(range(min(int(d["limit"]), len(v)))) for k, v in out.items()})
    return out


def _source_identity(cfg: dict) -> dict:
    spec = resolve_data(cfg["data"]["path"])
    p = Path(spec).expanduser()
    if p.exists():
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        return {"files": [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in files]}
    return {"hub": spec, "name": cfg["data"].get("name"), "split": cfg["data"].get("split")}


def data_fingerprint(cfg: dict, tokenizer) -> str:
    """Return a short hash of everything that decides the processed rows (source, settings, tokenizer)."""
    h = hashlib.sha256()
    settings = {k: v for k, v in cfg["data"].items()}
    tok_id = {
        "vocab": len(tokenizer),
        "template": tokenizer.chat_template or "",
        "eos": tokenizer.eos_token,
        "name": getattr(tokenizer, "name_or_path", ""),
    }
    for part in (_source_identity(cfg), settings, cfg["model"]["max_length"], tok_id, PROCESSING_VERSION):
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _excerpt(row: dict, n: int = 80) -> str:
    text = json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= n else text[: n - 1] + "…"


def _process_batch(batch: dict, indices: list[int], *, fmt, role_map, system_prompt, tokenizer, max_length, on_too_long):
    keys = list(batch)
    out: dict[str, list] = {"input_ids": [], "assistant_masks": [], "messages": [], "_drop": [], "_row": [], "_hash": []}
    for i, idx in enumerate(indices):
        row = {k: batch[k][i] for k in keys}
        try:
            messages = standardize(row, fmt, role_map, system_prompt)
            toks = tokenize_chat(tokenizer, messages, max_length=max_length, on_too_long=on_too_long)
            out["input_ids"].append(toks["input_ids"])
            out["assistant_masks"].append(toks["assistant_masks"])
            out["messages"].append(messages)
            out["_drop"].append("")
            out["_hash"].append(hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest())
        except RowError as e:
            out["input_ids"].append([])
            out["assistant_masks"].append([])
            out["messages"].append([])
            out["_drop"].append(f"{e.reason}\t{e.detail}\t{_excerpt(row)}")
            out["_hash"].append("")
        out["_row"].append(idx)
    return out


def length_stats(lengths: list[int], max_length: int) -> dict:
    """Return tokens-per-row percentiles (p50/p95/p99/max/mean) and the share that fits max_length."""
    import numpy as np

    if not lengths:
        return {"rows": 0}
    a = np.asarray(lengths)
    return {
        "rows": int(a.size),
        "p50": int(np.percentile(a, 50)),
        "p95": int(np.percentile(a, 95)),
        "p99": int(np.percentile(a, 99)),
        "max": int(a.max()),
        "mean": float(a.mean()),
        "fits_max_length": float((a <= max_length).mean()),
    }


def _plot_lengths(lengths: list[int], max_length: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(lengths, bins=40, color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title("Row lengths after the chat template")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def prepare(run, tokenizer, *, num_proc: int | None = None):
    """Return the processed DatasetDict (train/validation), from the cache in run/data when inputs are unchanged."""
    import datasets

    cfg = run.cfg
    d = cfg["data"]
    max_length = int(cfg["model"]["max_length"])
    out_dir = run.data_dir
    if ensure_chat_template(tokenizer):
        print("The tokenizer has no chat template: using the lab's default ChatML template (see lab_utils.chat).")
    fp = data_fingerprint(cfg, tokenizer)
    report_path = out_dir / "data_report.json"
    if report_path.exists() and (out_dir / "dataset").exists():
        try:
            old = json.loads(report_path.read_text())
        except ValueError:
            old = {}
        if old.get("fingerprint") == fp:
            print(f"Processed data is up to date (fingerprint {fp}): reusing {run.display(out_dir)}")
            return datasets.load_from_disk(str(out_dir / "dataset"))
        print("Data inputs changed since the last preparation: processing again.")

    raw = load_source(cfg)
    columns = raw["train"].column_names
    if d.get("format", "auto") == "auto":
        sample = [raw["train"][i] for i in range(min(20, len(raw["train"])))]
        try:
            fmt, why = detect_format(columns, sample)
        except ValueError as e:
            raise LabError(str(e)) from None
        print(f"Detected format: {fmt} ({why})")
    else:
        fmt = d["format"]
        print(f"Format: {fmt} (from data.format)")

    reasons: Counter = Counter()
    examples: dict[str, list] = {}
    kept_splits = {}
    total_in = 0
    seen: set[str] = set()
    for split, ds in raw.items():
        total_in += len(ds)
        processed = ds.map(
            _process_batch,
            with_indices=True,
            batched=True,
            batch_size=256,
            remove_columns=ds.column_names,
            num_proc=num_proc if num_proc and len(ds) > 20000 else None,
            fn_kwargs=dict(
                fmt=fmt,
                role_map=d.get("role_map") or {},
                system_prompt=d.get("system_prompt"),
                tokenizer=tokenizer,
                max_length=max_length,
                on_too_long=d.get("on_too_long", "drop"),
            ),
            desc=f"Validating and tokenizing {split}",
        )
        drops = processed["_drop"]
        hashes = processed["_hash"]
        rows = processed["_row"]
        keep = []
        for i, (drop, hsh) in enumerate(zip(drops, hashes)):
            if not drop and hsh in seen:
                drop = f"duplicate\texact duplicate of an earlier row\t{json.dumps(processed[i]['messages'])[:79]}"
            if drop:
                reason, detail, excerpt = drop.split("\t", 2)
                reasons[reason] += 1
                ex = examples.setdefault(reason, [])
                if len(ex) < EXAMPLES_PER_REASON:
                    ex.append({"split": split, "row": int(rows[i]), "detail": detail, "excerpt": excerpt})
            else:
                seen.add(hsh)
                keep.append(i)
        kept_splits[split] = processed.select(keep).remove_columns(["_drop", "_row", "_hash"])

    kept = sum(len(v) for v in kept_splits.values())
    dropped = total_in - kept
    share = dropped / total_in if total_in else 1.0
    if kept == 0:
        top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
        raise LabError(f"no usable rows left in {d['path']!r}: all {total_in} dropped ({top}) — check data.format and the rows")
    if share > float(d.get("max_drop_fraction", 0.5)):
        top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
        raise LabError(
            f"{dropped} of {total_in} rows ({share:.0%}) were dropped ({top}), more than "
            f"data.max_drop_fraction={d.get('max_drop_fraction')} — fix the data or raise that limit"
        )

    if "validation" not in kept_splits:
        split = kept_splits["train"].train_test_split(test_size=float(d["val_fraction"]), seed=int(d.get("seed", 42)))
        final = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    else:
        final = datasets.DatasetDict(kept_splits)

    lengths = [len(x) for x in final["train"]["input_ids"]]
    stats = length_stats(lengths, max_length)
    suggestion = None
    if stats.get("p99", 0) * 2 < max_length:
        suggestion = (
            f"99% of rows are ≤ {stats['p99']} tokens, far below max_length={max_length}: "
            f"model.max_length={max(64, 1 << (stats['max'] - 1).bit_length())} would fit them all"
        )
    report = {
        "fingerprint": fp,
        "qlora_lab": __version__,
        "source": d["path"],
        "format": fmt,
        "rows_in": total_in,
        "rows_kept": kept,
        "rows_dropped": dropped,
        "dropped_by_reason": dict(reasons),
        "examples": examples,
        "on_too_long": d.get("on_too_long", "drop"),
        "splits": {k: len(v) for k, v in final.items()},
        "length_stats": stats,
        "suggestion": suggestion,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "dataset.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    final.save_to_disk(str(tmp))
    shutil.rmtree(out_dir / "dataset", ignore_errors=True)
    os.replace(tmp, out_dir / "dataset")
    _plot_lengths(lengths, max_length, out_dir / "lengths.png")
    tmp_report = report_path.with_suffix(".tmp")
    tmp_report.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(tmp_report, report_path)
    return final


def load_prepared(run, tokenizer=None):
    """Return the processed DatasetDict saved by 01_data; LabError naming the fix when missing or stale."""
    import datasets

    path = run.data_dir / "dataset"
    report = run.data_dir / "data_report.json"
    if not path.exists() or not report.exists():
        raise LabError(f"no processed data in {run.display(run.data_dir)} — run 01_data first")
    if tokenizer is not None:
        saved = json.loads(report.read_text()).get("fingerprint")
        if saved != data_fingerprint(run.cfg, tokenizer):
            raise LabError(
                f"the processed data in {run.display(run.data_dir)} was made from other data settings, "
                "source file or tokenizer — run 01_data again"
            )
    return datasets.load_from_disk(str(path))


def report_table(report: dict) -> list[dict[str, Any]]:
    """Return the data report as table rows: one per drop reason with count and an example."""
    rows = [{"reason": "kept", "rows": report["rows_kept"], "example": ""}]
    for reason, n in sorted(report["dropped_by_reason"].items(), key=lambda x: -x[1]):
        ex = report["examples"].get(reason, [{}])[0]
        rows.append({"reason": reason, "rows": n, "example": f"row {ex.get('row')}: {ex.get('detail', '')}"})
    return rows
