"""Data preparation: any common source in, every row validated, tokenized with masks, reported, cached.

Sources (`data.path`): a hub dataset id (`org/name`, with `data.name` for its config and `data.split`
for its split, slices like `train[:5000]` included), or a local JSON / JSONL / CSV / TSV / Parquet file,
or a folder of them (one type per folder). Files are read by `datasets` into its Arrow cache, which is
memory-mapped: a file is never held whole in Python (a JSON *array* file is the exception — `datasets`
parses those whole, so large data belongs in JSONL or Parquet).

Decisions a person should know about:
- A malformed JSONL line is a dropped row (reason `malformed_json`, with its line number), not a stop:
  one bad line in 100k should not cost the other 99,999. Too many of them still stop the run through
  `data.max_drop_fraction`, like any other reason. A line that is not UTF-8 text, or nests deeper than
  100 levels, is such a line too: every line is checked before a parser sees it (pyarrow's reader
  crashed the process on a row nested thousands deep).
- A CSV line with more cells than the header stops the step naming that line (a BOM is fine).
- CSV cells are text: every column is read as a string (no "007" → 7), and a conversation column
  (`messages` / `conversations`) may hold the conversation as JSON text, as CSV exports write it.
- Row numbers in the report count records from 1 in the source split (for JSONL without blank lines
  that is the line number; in a folder, files are read in sorted order).
- Rows longer than `model.max_length` are dropped or truncated (`data.on_too_long`); either way the
  report counts them. Length statistics are shown before that rule (what your rows need) and as trained.
- Exact duplicates (same standardized messages) are dropped, also across train and validation.
- Validation: the source's own split (`validation`/`valid`/`val`/`dev`, else `test`; in a folder, the
  split named in each file's path, e.g. `data/validation-0.jsonl`), otherwise `data.val_fraction` of the
  rows split off with `data.seed`. With `data.split` set, only that split is read and validation is split off.
- The result is reused while the source files (size, mtime), `data.*`, `model.max_length` and the
  tokenizer (vocabulary, chat template) are unchanged; any change processes again.
- `datasets.map` runs in `min(cores, 4)` processes from 20k rows on. On the shared 2-core build machine
  (CPU pressure ~99%) 2 workers measured 0.98x of 1 (no gain, no loss); they pay where cores are free.

The processed dataset (columns `input_ids`, `assistant_masks`, `messages`) is what TRL's
SFTTrainer consumes as is: it turns `assistant_masks` into labels, so only assistant tokens
(and the end-of-turn token after them) carry loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .chat import (
    CONVERSATION_COLUMNS,
    FORMATS,
    RECORD_FIELDS,
    RowError,
    _role_map,
    describe_tools,
    detect_format,
    ensure_chat_template,
    standardize,
    standardize_tools,
    to_record,
    tokenize_chat,
    tool_support,
)
from .embedded import is_embedded, resolve_data
from .errors import LabError
from .files import write_json

__all__ = [
    "load_source",
    "prepare",
    "load_prepared",
    "data_fingerprint",
    "length_stats",
    "read_data_report",
    "report_table",
    "report_examples",
    "lengths_table",
]

LOCAL_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
PROCESSING_VERSION = "3"  # bump when the processed rows change for the same inputs
EXAMPLES_PER_REASON = 3
MALFORMED = "__lab_malformed_json__"  # column that marks a JSONL line that was not a JSON object
AUTO_NUM_PROC_ROWS = 20_000  # below this, worker start-up costs more than it saves
# Words in a file's name that put it in a split (datasets' own convention): the rest is training data.
SMALL_VALIDATION = 10  # fewer validation rows than this: a warning (one row's answer is the whole score)
_SPLIT_WORDS = {"validation": ("validation", "valid", "val", "dev", "eval"), "test": ("test",)}
# What to do when a reason dominates the dropped rows (the stop message names the top reason's fix).
_FIXES = {
    "malformed_json": "check that the file holds one JSON object per line (JSONL)",
    "empty": "check data.format and that the conversation column is filled",
    "missing_field": "check data.format and the column/turn key names",
    "non_string_content": "make every turn's content plain text",
    "unknown_role": "map the role names with data.role_map",
    "no_assistant_turn": "check data.format and data.role_map (which role is the assistant?)",
    "ends_on_user": "end each conversation on an assistant turn",
    "empty_content": "fill or remove the empty turns",
    "template_rejected": "check the tokenizer's chat template",
    "too_long": "raise model.max_length or set data.on_too_long: truncate",
    "duplicate": "remove the repeated rows",
    "bad_tool_call": "write each function call as JSON with a name and an arguments object",
    "bad_tools": "write the tools column as a JSON list of functions with a name each",
    "tools_not_rendered": "use a model whose chat template takes tools (e.g. Qwen2.5 or Llama 3.1 Instruct)",
}
# Columns each forced format needs (any one of a tuple).
_NEEDS = {
    "sharegpt": [CONVERSATION_COLUMNS],
    "messages": [CONVERSATION_COLUMNS],
    "alpaca": [("instruction",), ("output",)],
    "prompt_completion": [("prompt",), ("completion",)],
    "text": [("text",)],
}


# ------------------------------------------------------------------------------------------- sources


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in LOCAL_TYPES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _local_files(path: Path) -> tuple[str, list[str]]:
    """Return (datasets builder, files) for a local file or folder; LabError when unusable."""
    files = _data_files(path)
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


def _split_of(relative: str) -> str:
    """Return 'validation', 'test' or 'train' from the words in a file's relative path."""
    words = set(re.split(r"[^a-z0-9]+", relative.lower()))
    for split, names in _SPLIT_WORDS.items():
        if words & set(names):
            return split
    return "train"


def _is_hub_id(spec: str) -> bool:
    """Return True when a missing local path reads like a hub dataset id ('name' or 'org/name')."""
    if spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in LOCAL_TYPES:
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec) is not None


def _first_line(e: BaseException, n: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_hub(spec: str) -> None:
    """Raise a one-line LabError when the hub cannot be reached or has no such dataset (seconds, no retries)."""
    from .environment import check_hub_repo

    check_hub_repo(spec, key="data.path", repo_type="dataset")  # the one Hub probe; offline mode skips it


def _load_hub(spec: str, d: dict):
    import datasets

    _check_hub(spec)
    try:
        if d.get("split"):
            ds = datasets.load_dataset(spec, d.get("name"), split=d["split"])
            return datasets.DatasetDict({"train": ds}), f"hub dataset {spec!r}, split {d['split']!r}"
        dd = datasets.load_dataset(spec, d.get("name"))
    except Exception as e:
        raise LabError(
            f"hub dataset {spec!r} could not be loaded ({_first_line(e)}) — check data.name (its config) "
            "and data.split"
        ) from None
    return dd, f"hub dataset {spec!r}" + (f" (config {d['name']!r})" if d.get("name") else "")


MAX_JSON_DEPTH = 100  # a chat row nests 3-4 levels; deeper rows are dropped before any parser recurses into them
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _json_depth(raw: bytes) -> int:
    """Return how deep brackets nest in a JSON text (strings skipped), stopping once past MAX_JSON_DEPTH."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the bound: no need to look closer
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", raw)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
    return deepest


def _line_problem(raw: bytes) -> tuple[str | None, str]:
    """Return (what is wrong with one JSONL line or None, its text) — UTF-8, nesting depth, JSON, object."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})", raw.decode(
            "utf-8", errors="replace").strip()
    if not text:
        return None, text
    if _json_depth(raw) > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels", text
    try:
        obj = json.loads(text)
    except ValueError as e:
        return getattr(e, "msg", str(e)), text
    except RecursionError:  # not reached below MAX_JSON_DEPTH; kept so no line can stop the step
        return f"nested deeper than {MAX_JSON_DEPTH} levels", text
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object", text
    return None, text


def _scan_json_lines(path: str) -> list[tuple[int, str, str]]:
    """Return (line number, problem, excerpt) for each non-blank line that is not a JSON object; LabError if none is."""
    bad, lines = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            lines += 1
            problem, text = _line_problem(raw)
            if problem:
                bad.append((n, problem, text))
    if lines and len(bad) == lines:
        raise LabError(
            f"data file {path!r} is not JSON lines: no line is a JSON object (line {bad[0][0]}: {bad[0][1]}) — "
            "is it another format with a .json/.jsonl name? Rename or convert it"
        )
    return bad


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip().lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _check_json_array(path: str) -> None:
    """LabError naming the line when a JSON array file is not UTF-8, nests too deep or is not valid JSON."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LabError(
            f"data file {path!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}) — save it as UTF-8, "
            "or write it as JSONL so a bad line costs only that row"
        ) from None
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise LabError(
            f"data file {path!r} nests deeper than {MAX_JSON_DEPTH} levels — a chat row needs 3 or 4: check how it "
            "was written, or write it as JSONL so a bad line costs only that row"
        )
    try:
        json.loads(text)
    except ValueError as e:
        where = f" line {e.lineno}" if hasattr(e, "lineno") else ""
        raise LabError(
            f"data file {path!r} is not valid JSON ({getattr(e, 'msg', e)} at{where}) — fix the file, or "
            "write one JSON object per line (JSONL) so a bad line costs only that row"
        ) from None


def _load_json(files: list[str]):
    """Return the JSON/JSONL files as one Dataset; bad JSONL lines (not JSON, not UTF-8, nested too deep) become
    rows marked for `malformed_json`, so they are dropped with their line number."""
    import datasets

    arrays = [f for f in files if _starts_with_bracket(f)]
    for f in arrays:  # a JSON array file cannot be partly read: name where it breaks
        _check_json_array(f)
    # Every JSONL line is checked before a parser sees it: pyarrow's reader crashes the process on a row
    # nested thousands deep, and stops the whole step on one byte that is not UTF-8.
    bad = {f: [] if f in arrays else _scan_json_lines(f) for f in files}
    if not any(bad.values()):
        try:
            return datasets.load_dataset("json", data_files={"train": files}, split="train")
        except Exception as e:
            raise LabError(
                f"data files {files[0]!r}… could not be read as JSON ({_first_line(e)}) — check the format"
            ) from None
    n_bad = sum(len(v) for v in bad.values())
    first = next((f, b[0]) for f, b in bad.items() if b)
    print(
        f"⚠ {n_bad} line(s) are not valid JSON objects (first: {Path(first[0]).name} line {first[1][0]}: "
        f"{first[1][1]}); they are dropped as 'malformed_json' and listed in the report"
    )
    tmp = Path(tempfile.mkdtemp(prefix="lab-jsonl-"))
    try:
        cleaned = []
        for i, f in enumerate(files):
            lines = {n: (msg, text) for n, msg, text in bad[f]}
            out = tmp / f"{i:05d}.jsonl"
            with open(f, "rb") as src, open(out, "wb") as dst:
                for n, line in enumerate(src, 1):
                    if n in lines:
                        msg, text = lines[n]
                        excerpt = text if len(text) <= 100 else text[:99] + "…"
                        line = (json.dumps({MALFORMED: f"{Path(f).name} line {n}: {msg}\t{excerpt}"}) + "\n").encode()
                    elif not line.strip():
                        continue
                    dst.write(line if line.endswith(b"\n") else line + b"\n")
            cleaned.append(str(out))
        return datasets.load_dataset("json", data_files={"train": cleaned}, split="train")
    except LabError:
        raise
    except Exception as e:
        raise LabError(
            f"data files {files[0]!r}… could not be read as JSON ({_first_line(e)}) — check the format"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _csv_header(path: str, sep: str) -> list[str]:
    """Return a CSV file's header (a UTF-8 BOM stripped); LabError naming the line of a ragged row or a bad byte."""
    import csv

    header: list[str] = []
    ragged: list[tuple[int, int]] = []
    line = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, [])
            for row in reader:
                line = reader.line_num
                if len(row) > len(header):  # fewer cells are read as empty ones; more cannot be placed
                    ragged.append((line, len(row)))
    except UnicodeDecodeError:
        raise LabError(
            f"data file {path!r} is not UTF-8 text (after line {line + 1}) — save it as CSV UTF-8 "
            "(in Excel: File → Save as → CSV UTF-8)"
        ) from None
    except csv.Error as e:
        raise LabError(f"data file {path!r} line {line + 1}: {e} — fix that line") from None
    if ragged:
        n, got = ragged[0]
        more = f" ({len(ragged)} such lines)" if len(ragged) > 1 else ""
        raise LabError(
            f"data file {path!r} line {n} has {got} cells, its header has {len(header)}{more} — put quotes around "
            f"cells that contain '{sep}' or a line break (\"a{sep} b\"), or fix that line"
        )
    return header


def _load_files(builder: str, files: list[str]):
    import datasets

    if builder == "json":
        return _load_json(files)
    try:
        if builder == "csv":  # a CSV has no types: read every cell as text, exactly as written
            sep = "\t" if files[0].lower().endswith(".tsv") else ","
            header = [_csv_header(f, sep) for f in files][0]
            return datasets.load_dataset(
                "csv",
                data_files={"train": files},
                split="train",
                sep=sep,
                converters={c: str for c in header},
            )
        return datasets.load_dataset(builder, data_files={"train": files}, split="train")
    except LabError:
        raise
    except Exception as e:
        raise LabError(
            f"data file {files[0]!r} could not be read as {builder} ({_first_line(e)}) — check the file's format"
        ) from None


def _load_local(path: Path, d: dict):
    import datasets

    builder, files = _local_files(path)
    if path.is_file():
        return datasets.DatasetDict({"train": _load_files(builder, files)}), f"file {path.name} ({builder})"
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_split_of(str(Path(f).relative_to(path))), []).append(f)
    if d.get("split"):
        if d["split"] not in groups:
            raise LabError(
                f"data.split {d['split']!r} names no files in {str(path)!r}; it has {sorted(groups)} "
                "(from the file names) — set data.split to one of them or to null"
            )
        groups = {"train": groups[d["split"]]}
    if "train" not in groups:
        raise LabError(
            f"data.path {str(path)!r} has no training files (all names say {sorted(groups)}) — "
            "rename one, or set data.split to the split to train on"
        )
    dd = datasets.DatasetDict({name: _load_files(builder, fs) for name, fs in groups.items()})
    return dd, f"folder {path.name} ({len(files)} {builder} file(s))"


def _load(cfg: dict):
    """Return (DatasetDict with 'train' [+ 'validation'], a line saying where the data and its splits come from)."""
    import datasets

    d = cfg["data"]
    spec = resolve_data(d["path"])
    path = Path(spec).expanduser()
    if path.exists():
        raw, where = _load_local(path, d)
    elif _is_hub_id(spec) and not is_embedded(spec):
        raw, where = _load_hub(spec, d)
    else:
        raise LabError(
            f"data.path {spec!r} does not exist — give a local file/folder or a hub id like 'org/name'"
        )
    train_name = "train" if "train" in raw else next(iter(raw))
    out = datasets.DatasetDict({"train": raw[train_name]})
    if not d.get("split"):
        for name in ("validation", "valid", "val", "dev", "test"):
            if name in raw and name != train_name:
                out["validation"] = raw[name]
                where += f"; validation: its own {name!r} split"
                break
    if d.get("limit"):
        out = datasets.DatasetDict({k: v.select(range(min(int(d["limit"]), len(v)))) for k, v in out.items()})
    return out, where


def load_source(cfg: dict):
    """Return the raw source as a datasets.DatasetDict (a 'train' split, plus 'validation' if the source has one)."""
    return _load(cfg)[0]


# --------------------------------------------------------------------------------------- fingerprint


def _source_identity(cfg: dict) -> dict:
    if is_embedded(cfg["data"]["path"]):  # rebuilt on every fresh VM (new mtime): its name and size say it all
        built = Path(resolve_data(cfg["data"]["path"]))
        return {"embedded": cfg["data"]["path"], "file": built.name, "size": built.stat().st_size}
    spec = resolve_data(cfg["data"]["path"])
    p = Path(spec).expanduser()
    if p.exists():
        return {"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in _data_files(p)]}
    return {"hub": spec, "name": cfg["data"].get("name"), "split": cfg["data"].get("split")}


def _tokenizer_identity(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
        "template": tokenizer.chat_template or "",
        "eos": tokenizer.eos_token,
        "bos": tokenizer.bos_token,
    }


def data_fingerprint(cfg: dict, tokenizer) -> str:
    """Return a short hash of everything that decides the processed rows (source, settings, tokenizer)."""
    h = hashlib.sha256()
    settings = dict(cfg["data"])
    for part in (
        _source_identity(cfg),
        settings,
        cfg["model"]["max_length"],
        _tokenizer_identity(tokenizer),
        PROCESSING_VERSION,
    ):
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- processing


def _excerpt(row: dict, n: int = 100) -> str:
    shown = {k: v for k, v in row.items() if v is not None and k != MALFORMED}
    text = json.dumps(shown, ensure_ascii=False, default=str)
    return text if len(text) <= n else text[: n - 1] + "…"


def _decode_json_cell(row: dict) -> dict:
    """Return the row with a conversation column written as JSON text (CSV exports) decoded to a list."""
    for col in CONVERSATION_COLUMNS:
        value = row.get(col)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                return {**row, col: json.loads(value)}
            except ValueError as e:
                raise RowError(
                    "malformed_json", f"column '{col}' holds text that is not valid JSON ({e.msg})"
                ) from None
    return row


def _tool_counts(messages: list[dict], tools: list[dict] | None, stats: dict) -> dict[str, Any]:
    """Return the bookkeeping columns of one row: tools offered, tool calls made, tool results, thinking traces."""
    return {
        "_tools": len(tools or []),
        "_calls": sum(len(m.get("tool_calls") or []) for m in messages),
        "_results": sum(m["role"] == "tool" for m in messages),
        "_reasoning": bool(stats.get("reasoning")),
    }


def _process_batch(
    batch: dict,
    indices: list[int],
    *,
    fmt,
    role_map,
    system_prompt,
    tokenizer,
    max_length,
    on_too_long,
    reasoning="keep",
):
    keys = list(batch)
    out: dict[str, list] = {
        "input_ids": [], "assistant_masks": [], "messages": [], "tools": [],
        "_drop": [], "_row": [], "_hash": [], "_len": [], "_cut": [],
        "_tools": [], "_calls": [], "_results": [], "_reasoning": [],
    }  # fmt: skip
    for i, idx in enumerate(indices):
        row = {k: batch[k][i] for k in keys}
        n_tokens, cut = 0, False
        try:
            if row.get(MALFORMED) is not None:  # "detail\texcerpt", written by _load_json
                raise RowError("malformed_json", row[MALFORMED])
            stats: dict = {}
            messages = standardize(_decode_json_cell(row), fmt, role_map, system_prompt, reasoning, stats)
            tools = standardize_tools(row.get("tools")) if fmt != "text" else None
            toks = tokenize_chat(tokenizer, messages, tools=tools)
            ids, mask = toks["input_ids"], toks["assistant_masks"]
            n_tokens = len(ids)
            if n_tokens > max_length:
                if on_too_long == "drop":
                    raise RowError(
                        "too_long",
                        f"{n_tokens} tokens > model.max_length {max_length} (data.on_too_long: drop)",
                    )
                ids, mask, cut = ids[:max_length], mask[:max_length], True
                if not any(mask):
                    raise RowError(
                        "too_long",
                        f"{n_tokens} tokens; no assistant token is left after cutting to {max_length}",
                    )
            key = json.dumps([messages, tools], sort_keys=True, ensure_ascii=False).encode()
            out["input_ids"].append(ids)
            out["assistant_masks"].append(mask)
            out["messages"].append(to_record(messages))
            out["tools"].append(json.dumps(tools, ensure_ascii=False) if tools else None)
            for k, v in _tool_counts(messages, tools, stats).items():
                out[k].append(v)
            out["_drop"].append("")
            out["_hash"].append(hashlib.blake2b(key, digest_size=12).hexdigest())
        except RowError as e:
            out["input_ids"].append([])
            out["assistant_masks"].append([])
            out["messages"].append([])
            out["tools"].append(None)
            for k, v in _tool_counts([], None, {}).items():
                out[k].append(v)
            detail, excerpt = (
                (e.detail.split("\t", 1) + [""])[:2] if row.get(MALFORMED) else (e.detail, _excerpt(row))
            )
            out["_drop"].append(f"{e.reason}\t{detail}\t{excerpt}")
            out["_hash"].append("")
        out["_row"].append(idx + 1)
        out["_len"].append(n_tokens)
        out["_cut"].append(cut)
    return out


def _features():
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),  # int32: any vocabulary fits, half of int64 on Drive
            "assistant_masks": List(Value("int8")),
            "messages": List({k: Value("string") for k in RECORD_FIELDS}),  # tool_calls as JSON text
            "tools": Value("string"),  # the row's tool list as JSON text, or None
            "_drop": Value("string"),
            "_row": Value("int64"),
            "_hash": Value("string"),
            "_len": Value("int32"),
            "_cut": Value("bool"),
            "_tools": Value("int32"),
            "_calls": Value("int32"),
            "_results": Value("int32"),
            "_reasoning": Value("bool"),
        }
    )


def _check_columns(fmt: str, columns: list[str]) -> None:
    for options in _NEEDS[fmt]:
        if not any(c in columns for c in options):
            need = " or ".join(repr(c) for c in options)
            raise LabError(
                f"data.format is {fmt!r} but the data has no column {need} (columns: {columns}) — "
                "set data.format: auto, or rename the columns"
            )


def _choose_format(d: dict, ds) -> tuple[str, str]:
    """Return (format, why): detected from columns and 20 sample rows, or forced by data.format."""
    columns = [c for c in ds.column_names if c != MALFORMED]
    sample = []
    for row in ds.select(range(min(20, len(ds)))):
        if row.get(MALFORMED) is None:
            try:
                sample.append(_decode_json_cell(row))
            except RowError:
                sample.append(row)
    tools = describe_tools(columns, sample)
    if d.get("format", "auto") != "auto":
        fmt = d["format"]
        if fmt not in FORMATS:
            raise LabError(f"data.format must be auto or one of {list(FORMATS)}, got {fmt!r}")
        _check_columns(fmt, columns)
        return fmt, "set by data.format" + (f"; {tools}" if tools and fmt != "text" else "")
    try:
        fmt, why = detect_format(columns, sample)
    except ValueError as e:
        raise LabError(str(e)) from None
    encoded = [
        c for c in CONVERSATION_COLUMNS if c in columns and any(isinstance(r.get(c), str) for r in sample)
    ]
    if encoded and fmt in ("sharegpt", "messages"):
        why += " (conversations written as JSON text, decoded per row)"
    if fmt != "text" and tools:
        why += f"; {tools}"
    return fmt, why


_TOOL_COLUMNS = ("_tools", "_calls", "_results", "_reasoning")


def _check_tool_template(cfg: dict, tokenizer) -> None:
    """Raise a one-line LabError when the tokenizer's chat template cannot render tools, calls or tool results."""
    problem = tool_support(tokenizer)
    if problem:
        name = cfg["model"].get("tokenizer") or cfg["model"]["name"]
        raise LabError(
            f"the data holds tool calls, but the chat template of {name!r} cannot train on them: {problem} — "
            "use a model whose template takes tools (e.g. Qwen/Qwen2.5-1.5B-Instruct, meta-llama/Llama-3.2-1B-Instruct), "
            "or set model.tokenizer to one; no row is trained without its tools"
        )


def _count_tools(stats: Counter, calls_per_row: list[int], tools: int, calls: int, results: int, reasoning: bool) -> None:
    """Add one kept row's tool and reasoning counts to the running totals."""
    stats["rows_with_tools"] += tools > 0
    stats["rows_with_tool_calls"] += calls > 0
    stats["tool_calls"] += calls
    stats["tool_results"] += results
    stats["reasoning_rows"] += reasoning
    if calls:
        calls_per_row.append(calls)


def _tool_report(stats: Counter, calls_per_row: list[int], reasoning: str) -> dict[str, Any]:
    """Return the report's tool-calling and reasoning counts over the kept rows."""
    keys = ("rows_with_tools", "rows_with_tool_calls", "tool_calls", "tool_results", "reasoning_rows")
    out: dict[str, Any] = {k: int(stats[k]) for k in keys}
    out["tool_calls_per_row"] = (
        {"mean": round(sum(calls_per_row) / len(calls_per_row), 2), "max": max(calls_per_row)}
        if calls_per_row
        else {"mean": 0, "max": 0}
    )  # over the rows that call a tool
    out["reasoning"] = reasoning
    return out


def _tool_line(tools: dict | None) -> str | None:
    """Return one line on tool calls and thinking traces in the kept rows, or None when there are neither."""
    if not tools or not (tools["rows_with_tools"] or tools["tool_calls"] or tools["reasoning_rows"]):
        return None
    per = tools["tool_calls_per_row"]
    return (
        f"Tool calling: {tools['rows_with_tools']} rows with tools, {tools['tool_calls']} tool calls "
        f"(mean {per['mean']}, max {per['max']} per calling row), {tools['tool_results']} tool results; "
        f"thinking traces in {tools['reasoning_rows']} rows (data.reasoning: {tools['reasoning']})"
    )


def _auto_num_proc(rows: int) -> int | None:
    """Return the worker count for datasets.map: the free cores (≤ 4) for large data, None (one process) otherwise.

    Free = cores minus the 1-minute load average other processes put on them (this process counts as 1):
    on a 2-core machine busy with other work, 2 workers ran 1.54x slower than one.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)
    except (AttributeError, OSError):  # no load average (Windows): assume the cores are free
        others = 0.0
    free = min(cores, int(cores - others + 0.5))
    return min(free, 4) if rows >= AUTO_NUM_PROC_ROWS and free > 1 else None


def _map_fingerprint(data_fp: str, split: str, ds) -> str:
    """Return the datasets.map cache key from the data fingerprint (which already covers the tokenizer).

    Passing it spares datasets from hashing the tokenizer inside fn_kwargs (seconds for a 151k vocabulary).
    """
    key = f"{data_fp}:{split}:{getattr(ds, '_fingerprint', '')}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def length_stats(lengths: list[int], max_length: int | None = None) -> dict:
    """Return tokens-per-row statistics {rows, p50, p95, p99, max, mean} (all positive numbers, or {'rows': 0})."""
    import numpy as np

    if not len(lengths):
        return {"rows": 0}
    a = np.asarray(lengths)
    return {
        "rows": int(a.size),
        "p50": int(np.percentile(a, 50)),
        "p95": int(np.percentile(a, 95)),
        "p99": int(np.percentile(a, 99)),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 1),
    }


def _suggestion(before: dict, fits: float, max_length: int, on_too_long: str) -> str | None:
    if not before.get("rows"):
        return None

    def pow2(n: int) -> int:
        return max(16, 1 << (max(n, 1) - 1).bit_length())

    if fits < 0.95:
        verb = "dropped" if on_too_long == "drop" else "cut short"
        return (
            f"{1 - fits:.0%} of rows are longer than model.max_length={max_length} and were {verb}: "
            f"model.max_length={pow2(before['p99'])} would keep 99% whole (longer rows need more GPU memory)"
        )
    if before["p99"] * 2 <= max_length and pow2(before["max"]) < max_length:
        return (
            f"99% of rows are ≤ {before['p99']} tokens, far below model.max_length={max_length}: "
            f"model.max_length={pow2(before['max'])} fits every row and leaves room for bigger batches"
        )
    return None


def _plot_lengths(lengths: list[int], max_length: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(lengths, bins=50, color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"model.max_length={max_length}")
    ax.set_xlabel("tokens per row (chat template applied, before the max_length rule)")
    ax.set_ylabel("rows")
    ax.set_title("Row lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _write_json(path: Path, obj: dict) -> None:
    write_json(path, obj, indent=2, ensure_ascii=False)


def _summary_line(report: dict) -> str:
    drops = ", ".join(f"{r} {n}" for r, n in sorted(report["dropped_by_reason"].items(), key=lambda x: -x[1]))
    line = f"Kept {report['rows_kept']} of {report['rows_in']} rows"
    if report["rows_dropped"]:
        line += f"; dropped {report['rows_dropped']} ({drops})"
    if report.get("truncated", {}).get("rows"):
        line += f"; cut {report['truncated']['rows']} to model.max_length"
    return line


@dataclass
class _Tally:
    """What tokenizing the splits found: drops by reason, cut rows, lengths and tool use (for the report)."""

    max_length: int
    reasons: Counter = field(default_factory=Counter)
    unknown_roles: Counter = field(default_factory=Counter)  # the role names to map, for the stop line
    examples: dict[str, list] = field(default_factory=dict)
    truncated: dict[str, Any] = field(default_factory=lambda: {"rows": 0, "examples": []})
    lengths_before: list[int] = field(default_factory=list)  # every tokenized row, not a duplicate, full length
    lengths_kept: list[int] = field(default_factory=list)
    tool_stats: Counter = field(default_factory=Counter)
    calls_per_row: list[int] = field(default_factory=list)
    total_in: int = 0
    seen: set[str] = field(default_factory=set)

    def keep_rows(self, split: str, processed) -> list[int]:
        """Return the indices of processed's rows to keep, counting every drop, duplicate, cut and tool call."""
        # only the small bookkeeping columns come into Python; the token lists stay in the Arrow file
        info = processed.select_columns(["_drop", "_hash", "_row", "_len", "_cut", *_TOOL_COLUMNS]).to_dict()
        keep = []
        for i, (drop, hsh, row, n, cut, *tool) in enumerate(
            zip(*(info[c] for c in ("_drop", "_hash", "_row", "_len", "_cut", *_TOOL_COLUMNS)), strict=True)
        ):
            if not drop and hsh in self.seen:
                first = json.dumps(processed[i]["messages"], ensure_ascii=False)
                drop = f"duplicate\tsame messages as an earlier row\t{first[:99]}"
                n = 0  # counted once, with the first copy
            if n:
                self.lengths_before.append(n)
            if drop:
                reason, detail, excerpt = drop.split("\t", 2)
                self.reasons[reason] += 1
                if reason == "unknown_role" and (m := re.search(r"unknown role ('.*?'|\".*?\")", detail)):
                    self.unknown_roles[m.group(1)] += 1
                ex = self.examples.setdefault(reason, [])
                if len(ex) < EXAMPLES_PER_REASON:
                    ex.append({"split": split, "row": int(row), "detail": detail, "excerpt": excerpt})
                continue
            self.seen.add(hsh)
            keep.append(i)
            _count_tools(self.tool_stats, self.calls_per_row, *tool)
            self.lengths_kept.append(min(n, self.max_length))
            if cut:
                self.truncated["rows"] += 1
                if len(self.truncated["examples"]) < EXAMPLES_PER_REASON:
                    self.truncated["examples"].append(
                        {"split": split, "row": int(row), "detail": f"{n} tokens cut to {self.max_length}"}
                    )
        return keep


def _reuse_prepared(run, fp: str):
    """Return the saved processed data when its report carries fingerprint fp (saying so), else None."""
    import datasets

    out_dir = run.data_dir
    if not (run.data_report_path.exists() and (out_dir / "dataset").exists()):
        return None
    try:
        old = run.data_report() or {}
    except LabError:  # a damaged report: make the data again
        old = {}
    if old.get("fingerprint") != fp:
        print(
            "Data inputs changed since the last preparation (data, data.*, max_length or tokenizer): processing again."
        )
        return None
    try:
        cached = datasets.load_from_disk(str(out_dir / "dataset"))
    except Exception:  # damaged or half-copied: make it again
        print("The saved processed data cannot be read: processing again.")
        return None
    print(f"Processed data is up to date (fingerprint {fp}): reusing {run.display(out_dir / 'dataset')}")
    print(f"Format: {old.get('format')} ({old.get('format_reason')})")
    print(_summary_line(old))
    if line := _tool_line(old.get("tools")):
        print(line)
    return cached


def _tokenize_splits(raw, fmt: str, role_map: dict, cfg: dict, tokenizer, fp: str, num_proc: int | None):
    """Return ({split: kept rows}, tally): every split validated, tokenized, deduplicated and counted."""
    d = cfg["data"]
    tally = _Tally(int(cfg["model"]["max_length"]))
    kept_splits = {}
    for split, ds in raw.items():
        tally.total_in += len(ds)
        workers = num_proc if num_proc is not None else _auto_num_proc(len(ds))
        processed = ds.map(
            _process_batch,
            with_indices=True,
            batched=True,
            batch_size=64,
            remove_columns=ds.column_names,
            features=_features(),
            num_proc=workers if workers and workers > 1 and len(ds) >= 2 * workers else None,
            fn_kwargs=dict(
                fmt=fmt,
                role_map=role_map,
                system_prompt=d.get("system_prompt") or None,
                tokenizer=tokenizer,
                max_length=tally.max_length,
                on_too_long=d.get("on_too_long", "drop"),
                reasoning=d.get("reasoning", "keep"),
            ),
            desc=f"Validating and tokenizing {split}",
            new_fingerprint=_map_fingerprint(fp, split, ds),
        )
        kept_splits[split] = processed.select(tally.keep_rows(split, processed))
    columns = ["input_ids", "assistant_masks", "messages"] + ["tools"] * bool(tally.tool_stats["rows_with_tools"])
    return {k: v.select_columns(columns) for k, v in kept_splits.items()}, tally  # a 'tools' column for tool data


def _build_report(cfg: dict, fp: str, where: str, fmt: str, why: str, tally: _Tally, kept: int) -> dict[str, Any]:
    """Return data_report.json's content (before the validation split is known)."""
    d = cfg["data"]
    max_length, on_too_long = tally.max_length, d.get("on_too_long", "drop")
    before = length_stats(tally.lengths_before)
    lengths = tally.lengths_before
    fits = sum(n <= max_length for n in lengths) / len(lengths) if lengths else 0.0
    return {
        "fingerprint": fp,
        "stopped": None,
        "source": d["path"],
        "source_detail": where,
        "format": fmt,
        "format_reason": why,
        "rows_in": tally.total_in,
        "rows_kept": kept,
        "rows_dropped": tally.total_in - kept,
        "dropped_by_reason": dict(tally.reasons.most_common()),
        "max_length": max_length,
        "on_too_long": on_too_long,
        "truncated": tally.truncated,
        "fits_max_length": round(fits, 4),
        "length_stats": length_stats(tally.lengths_kept),  # as trained: kept rows, after truncation
        "length_stats_before_limit": before,  # what the rows need: before drop/truncate, duplicates once
        "suggestion": _suggestion(before, fits, max_length, on_too_long),
        "qlora_lab": __version__,
        "examples": tally.examples,
        "tools": _tool_report(tally.tool_stats, tally.calls_per_row, d.get("reasoning", "keep")),
    }


def _stop_if_too_few_kept(run, report: dict, tally: _Tally) -> None:
    """LabError (report kept, stale data removed) when no row, or more than data.max_drop_fraction, was dropped."""
    d = run.cfg["data"]
    total_in, kept, dropped, reasons = tally.total_in, report["rows_kept"], report["rows_dropped"], tally.reasons
    share = dropped / total_in if total_in else 1.0
    stop = None
    top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
    fix = _FIXES.get(reasons.most_common(1)[0][0] if reasons else "", "fix the data")
    if reasons and reasons.most_common(1)[0][0] == "unknown_role" and tally.unknown_roles:
        names = [r for r, _ in tally.unknown_roles.most_common()]
        fix = (f"map the role names {', '.join(names[:8])}{' …' if len(names) > 8 else ''} with data.role_map, "
               f"e.g. data.role_map: {{{names[0]}: assistant}} (each to system, user or assistant)")
    if kept == 0:
        stop = f"no usable rows left in {d['path']!r}: all {total_in} dropped ({top}) — {fix}"
    elif share > float(d.get("max_drop_fraction", 0.5)):
        stop = (
            f"{dropped} of {total_in} rows ({share:.0%}) were dropped ({top}), more than "
            f"data.max_drop_fraction={d.get('max_drop_fraction', 0.5)} — {fix}, or raise that limit"
        )
    if stop:  # keep the report for the person to read; remove data that no longer matches it
        report.update(fingerprint=None, stopped=stop)
        _write_json(run.data_report_path, report)
        shutil.rmtree(run.data_dir / "dataset", ignore_errors=True)
        raise LabError(f"{stop} (examples in {run.display(run.data_report_path)})")


def _with_validation(kept_splits: dict, d: dict, report: dict):
    """Return the DatasetDict with a validation split (the source's own, else split off by data.val_fraction)."""
    import datasets

    seed = int(d.get("seed", 42))
    val_fraction = float(d["val_fraction"])
    if "validation" in kept_splits and len(kept_splits["validation"]) == 0:
        print(
            "⚠ no row of the source's validation split survived: splitting one off the training rows instead"
        )
        del kept_splits["validation"]
    if "validation" in kept_splits:
        report["validation_from"] = "the source's own split"
        return datasets.DatasetDict(kept_splits)
    if len(kept_splits["train"]) < 2:
        raise LabError(
            f"only {len(kept_splits['train'])} usable row: a validation row cannot be split off — add rows"
        )
    n_val = min(max(1, round(val_fraction * len(kept_splits["train"]))), len(kept_splits["train"]) - 1)
    split = kept_splits["train"].train_test_split(test_size=n_val, seed=seed)
    report["validation_from"] = f"{n_val} rows split off (data.val_fraction={val_fraction}, data.seed={seed})"
    return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})


def _show_splits(report: dict) -> None:
    """Print the split sizes, the cut-rows warning and the length suggestion."""
    print(
        f"Splits: {report['splits']['train']} train, {report['splits']['validation']} validation "
        f"({report['validation_from']})"
    )
    if report["splits"]["validation"] < SMALL_VALIDATION:
        print(f"⚠ only {report['splits']['validation']} validation row(s): validation loss and 03's scores will swing "
              "with every row — raise data.val_fraction or add a validation split (≥ 50 rows gives steadier numbers)")
    if report["truncated"]["rows"]:
        print(
            f"⚠ {report['truncated']['rows']} rows were cut to model.max_length={report['max_length']} "
            "(data.on_too_long: truncate): the model never sees their ends"
        )
    if report["suggestion"]:
        print(f"Suggestion: {report['suggestion']}")


def _save_prepared(run, final, report: dict, raw) -> None:
    """Save the processed splits (whole folder swapped in) and then their report; free the map cache."""
    out_dir = run.data_dir
    tmp = out_dir / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_to_disk(str(tmp))
    shutil.rmtree(out_dir / "dataset", ignore_errors=True)
    os.replace(tmp, out_dir / "dataset")
    _write_json(run.data_report_path, report)
    for ds in raw.values():  # the intermediate map output in datasets' cache is a full copy: free the disk
        ds.cleanup_cache_files()
    print(f"Saved processed data → {run.display(out_dir / 'dataset')} (report: data_report.json)")


def prepare(run, tokenizer, *, num_proc: int | None = None):
    """Return the processed DatasetDict (train/validation), from the cache in run/data when inputs are unchanged.

    num_proc: worker processes for tokenizing; None picks the free cores (≤ 4) from 20k rows on, 1 below.
    """
    import datasets

    cfg, d = run.cfg, run.cfg["data"]
    if ensure_chat_template(tokenizer):
        print(
            "The tokenizer has no chat template: using the lab's default ChatML template (see lab_utils.chat)."
        )
    try:
        role_map = _role_map(d.get("role_map") or {})
    except ValueError as e:
        raise LabError(str(e)) from None  # chat.py writes it in the lab's one style already
    fp = data_fingerprint(cfg, tokenizer)
    if (cached := _reuse_prepared(run, fp)) is not None:
        return cached

    raw, where = _load(cfg)
    print(f"Source: {where}")
    fmt, why = _choose_format(d, raw["train"])
    print(f"Format: {fmt} ({why})")
    if "tool calling:" in why:
        _check_tool_template(cfg, tokenizer)
    kept_splits, tally = _tokenize_splits(raw, fmt, role_map, cfg, tokenizer, fp, num_proc)
    report = _build_report(cfg, fp, where, fmt, why, tally, sum(len(v) for v in kept_splits.values()))
    run.data_dir.mkdir(parents=True, exist_ok=True)
    if tally.lengths_before:
        _plot_lengths(tally.lengths_before, tally.max_length, run.data_dir / "lengths.png")
    print(_summary_line(report))
    if line := _tool_line(report["tools"]):
        print(line)
    _stop_if_too_few_kept(run, report, tally)
    final = _with_validation(kept_splits, d, report)
    report["splits"] = {k: len(v) for k, v in final.items()}
    _show_splits(report)
    _save_prepared(run, final, report, raw)
    return datasets.load_from_disk(str(run.data_dir / "dataset"))


def load_prepared(run, tokenizer=None):
    """Return the processed DatasetDict saved by 01_data; LabError naming the fix when missing or stale."""
    import datasets

    path = run.data_dir / "dataset"
    if not path.exists() or not run.data_report_path.exists():
        raise LabError(f"no processed data in {run.display(run.data_dir)} — run 01_data first")
    if tokenizer is not None:
        saved = run.data_report().get("fingerprint")
        if saved != data_fingerprint(run.cfg, tokenizer):
            raise LabError(
                f"the processed data in {run.display(run.data_dir)} was made from other data settings, "
                "source file or tokenizer — run 01_data again"
            )
    try:
        data = datasets.load_from_disk(str(path))
        for split in data.values():  # arrow files are memory-mapped: touch the last row so a cut-off file shows now
            if len(split):
                split[len(split) - 1]
    except Exception as e:
        raise LabError(
            f"the processed data in {run.display(path)} is damaged ({_first_line(e)}) — run 01_data again to make it anew"
        ) from None
    if dropped := _drop_damaged_map_caches(path):
        print(f"Removed {len(dropped)} damaged cache file(s) beside the processed data ({', '.join(dropped)}): "
              "derived from it, they are made again now")
    return data


_ARROW_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end-of-stream marker every finished arrow stream file ends with


def _drop_damaged_map_caches(path: Path) -> list[str]:
    """Delete the cache-*.arrow files (TRL's map output, saved beside the data) that are cut off or unreadable.

    datasets reopens them by fingerprint without a check, so one cut short by a disconnect or a Drive sync
    ended the next training session with an ArrowInvalid. Only the end and the schema are read: cheap on Drive.
    """
    import pyarrow as pa

    dropped = []
    for cache in sorted(path.glob("*/cache-*.arrow")):
        try:
            with open(cache, "rb") as f:
                f.seek(-len(_ARROW_END), os.SEEK_END)
                intact = f.read() == _ARROW_END
            if intact:
                with pa.memory_map(str(cache)) as src:
                    pa.ipc.open_stream(src).schema  # noqa: B018 (reading the schema is the check)
        except (OSError, pa.ArrowException):
            intact = False
        if not intact:
            cache.unlink(missing_ok=True)
            dropped.append(f"{cache.parent.name}/{cache.name}")
    return dropped


# ------------------------------------------------------------------------------------------- display


def read_data_report(run) -> dict[str, Any]:
    """Return the run's data/data_report.json as a dict; LabError when 01_data has not written it."""
    return run.data_report(required=True)


def report_table(report: dict) -> list[dict[str, Any]]:
    """Return the data report as table rows: kept, then one per drop reason (and truncation) with count and share."""
    n = max(report["rows_in"], 1)
    rows = [
        {
            "what": "kept",
            "rows": report["rows_kept"],
            "share": f"{report['rows_kept'] / n:.1%}",
            "first example": "",
        }
    ]
    for reason, count in report["dropped_by_reason"].items():
        ex = (report.get("examples", {}).get(reason) or [{}])[0]
        rows.append(
            {
                "what": f"dropped: {reason}",
                "rows": count,
                "share": f"{count / n:.1%}",
                "first example": f"row {ex.get('row')}: {ex.get('detail', '')}",
            }
        )
    tools = report.get("tools") or {}
    for key, what in (
        ("rows_with_tools", "kept rows with tools"),
        ("tool_calls", "tool calls in kept rows"),
        ("tool_results", "tool results in kept rows (no loss)"),
        ("reasoning_rows", f"kept rows with thinking traces ({tools.get('reasoning', 'keep')})"),
    ):
        if tools.get(key):
            rows.append({"what": what, "rows": tools[key], "share": "", "first example": ""})
    cut = report.get("truncated") or {}
    if cut.get("rows"):
        ex = (cut.get("examples") or [{}])[0]
        rows.append(
            {
                "what": "kept but cut to max_length",
                "rows": cut["rows"],
                "share": f"{cut['rows'] / n:.1%}",
                "first example": f"row {ex.get('row')}: {ex.get('detail', '')}",
            }
        )
    return rows


def report_examples(report: dict) -> list[dict[str, Any]]:
    """Return every saved example of a dropped row: reason, split, row number, why, and a short excerpt."""
    return [
        {
            "reason": reason,
            "split": ex["split"],
            "row": ex["row"],
            "why": ex["detail"],
            "excerpt": ex.get("excerpt", ""),
        }
        for reason, items in report.get("examples", {}).items()
        for ex in items
    ]


def lengths_table(report: dict) -> list[dict[str, Any]]:
    """Return tokens-per-row statistics as rows: before the max_length rule and as trained."""
    before, after = report.get("length_stats_before_limit", {}), report.get("length_stats", {})
    rows = [
        {"statistic": key, "before max_length": before.get(key, ""), "as trained": after.get(key, "")}
        for key in ("rows", "p50", "p95", "p99", "max", "mean")
    ]
    rows.append(
        {
            "statistic": f"share ≤ max_length ({report.get('max_length')})",
            "before max_length": f"{report.get('fits_max_length', 0):.1%}",
            "as trained": "100%",
        }
    )
    return rows
