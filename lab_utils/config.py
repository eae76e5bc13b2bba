"""The run's configuration: defaults, YAML, notebook form fields and environment, merged and checked.

Precedence, lowest first: built-in defaults → YAML file → notebook form fields → environment
(`LAB_RUN_NAME`). `LAB_CONFIG` names a YAML file used *instead of* the notebook's form fields.
The `train:` keys that depend on the GPU (batch geometry, precision, optimizer, padding) and that
the config leaves unset are chosen for the hardware found when training starts (defaults.choose).
`profile` / `LAB_PROFILE` adds no settings: it names the hardware a run expects (`colab-t4`, ...),
checked before anything is written; `auto` takes whatever machine is there. The `lora:` and `train:` sections pass through to `peft.LoraConfig`
and `trl.SFTConfig` by their own field names; an unknown key is an error naming the nearest one.

Every value is checked before anything is loaded or written: its type against the library's own
dataclass field type (`bool`, `int`, `float`, enums such as `lr_scheduler_type`, lists), its range
(no negative step counts, `val_fraction` inside (0, 1), ...), and it must not be a secret. Numbers
written as text (`2e-4`, which YAML reads as a string) are converted; booleans written as text
(`"true"`) are refused, because a non-empty string would silently mean true.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

from .choices import (
    CHAT_FORMATS,
    CONVERTER_OUTTYPES,
    EMBEDDED_DATA,
    EMBEDDED_DATASETS,
    EMBEDDED_MODEL,
    EXPORT_PARTS,
    PROFILE_NAMES,
    REASONING,
    ROLES,
)
from .errors import LabError
from .files import (
    tmp_path,  # noqa: F401 — re-exported: older imports say config.tmp_path
    write_json,
    write_text,
)
from .metrics import METRICS as _METRIC_KINDS  # pure Python: the scorers, no stage

__all__ = [
    "DEFAULTS",
    "PROFILE_NAMES",
    "resolve_config",
    "load_yaml",
    "validate",
    "diff_configs",
    "dump_yaml",
    "get",
    "merge_defaults",
    "check_with_libraries",
    "check_run_name",
    "check_profile",
]

DEFAULTS: dict[str, Any] = {
    "run_name": "pricer-demo",
    "profile": "auto",
    "model": {
        "name": EMBEDDED_MODEL,
        "tokenizer": None,
        "load_in_4bit": True,
        "max_length": 512,
        "trust_remote_code": False,
        "revision": None,
    },
    "data": {
        "path": EMBEDDED_DATA,
        "format": "auto",
        "name": None,  # a hub dataset's config name
        "split": None,  # a hub dataset's split; None = "train"
        "val_fraction": 0.05,
        "limit": None,
        "role_map": {},
        "system_prompt": None,
        "on_too_long": "drop",
        "max_drop_fraction": 0.5,
        "seed": 42,
        "reasoning": "keep",  # thinking traces (reasoning_content / thinking / <think>): keep (trained) or drop
    },
    "lora": {"r": 32, "lora_alpha": 64, "lora_dropout": 0.1, "target_modules": "all-linear"},
    "train": {
        "learning_rate": 2e-4,
        "num_train_epochs": 1,
        "max_steps": -1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "weight_decay": 0.0,
        "logging_steps": 10,
        "save_steps": 50,
        "save_total_limit": 2,
        "seed": 42,
        "report_to": "trackio",  # trackio | tensorboard | wandb | none: experiment tracking (lab_utils.tracking)
    },
    "checkpoint": {"save_every_minutes": 20.0, "min_free_gib": 0.5},
    # rows: validation rows scored by 03 and by the validation loss during training (a seeded sample; null = all);
    # checkpoints: all = each kept checkpoint's loss in 03 too, none = base and final only
    "eval": {"num_generations": 8, "max_new_tokens": 16, "metric": "auto", "metric_pattern": None, "rows": 200,
             "checkpoints": "all"},
    "export": {"gguf": ["f16", "q8_0"], "merged": True, "push_repo": None, "push": ["adapter"], "private": True, "adapter": "best"},
    # 05_sweep: short trials over `space` (dotted train.*/lora.* keys → values), each on a data subset.
    "sweep": {
        "method": "grid",  # grid: every combination; random: `trials` draws
        "space": {"train.learning_rate": [2e-4, 1e-3], "lora.r": [8, 32]},
        "trials": 4,  # random search: number of draws
        "rows": 1000,  # training rows per trial (None: all)
        "max_steps": 40,  # optimizer steps per trial
        "val_rows": 64,  # validation rows for each trial's loss and task metric
        "select_by": "eval_loss",  # or a task metric such as price_mae
        "seed": 42,
    },
}

# Keys a user sets outside the section table.
_TOP_LEVEL = {"run_name", "profile"}
_SECTIONS = [k for k in DEFAULTS if k not in _TOP_LEVEL]
_RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: "$" would let "name\n" through
# Mappings that a layer replaces whole instead of merging key by key.
_REPLACED = {"role_map", "space"}
FORMATS = ("auto", *CHAT_FORMATS)
GGUF_TYPES = (*CONVERTER_OUTTYPES, "q4_k_m")  # what export_gguf writes (q4_k_m through llama-quantize)
METRICS = ("auto", *[m for m in _METRIC_KINDS if m != "auto"])

# `train:` keys the lab sets itself from other settings; setting them here would clash.
_RESERVED = {
    "train.output_dir": "the run folder decides it ($LAB_ROOT/<run_name>/checkpoints) — remove it",
    "train.max_length": "it is model.max_length — set that instead",
    "train.save_strategy": "the lab saves every train.save_steps steps and checkpoint.save_every_minutes — remove it",
    "train.eval_strategy": "the lab evaluates at train.eval_steps when there is validation data — remove it",
    "train.per_device_eval_batch_size": "it follows per_device_train_batch_size — remove it",
    "train.dataset_num_proc": "data is tokenized once in 01_data — remove it",
    "train.resume_from_checkpoint": "02_train resumes on its own; to pick one, set RESUME_FROM in 02_train — remove it",
    "lora.task_type": "the lab trains causal language models (CAUSAL_LM) — remove it",
}

# Ranges and examples; a number not listed here only has to be ≥ 0 (unless its default is negative).
# (lo, hi, lo_open, hi_open, example); None = unbounded.
_RANGES: dict[str, tuple] = {
    "train.learning_rate": (0, 1, True, False, "2e-4"),
    "train.num_train_epochs": (0, None, True, False, "1"),
    "train.per_device_train_batch_size": (1, None, False, False, "4"),
    "train.gradient_accumulation_steps": (1, None, False, False, "4"),
    "train.logging_steps": (0, None, True, False, "10"),
    "train.save_steps": (0, None, True, False, "50"),
    "train.eval_steps": (0, None, True, False, "50"),
    "train.save_total_limit": (1, None, False, False, "2"),
    "train.warmup_ratio": (0, 1, False, False, "0.05"),
    "train.adam_beta1": (0, 1, False, True, "0.9"),
    "train.adam_beta2": (0, 1, False, True, "0.999"),
    "train.adam_epsilon": (0, None, True, False, "1e-8"),
    "train.label_smoothing_factor": (0, 1, False, True, "0.0"),
    "lora.r": (1, None, False, False, "32"),
    "lora.lora_alpha": (0, None, True, False, "64"),
    "lora.lora_dropout": (0, 1, False, True, "0.1"),
    "model.max_length": (16, None, False, False, "512"),
    "data.val_fraction": (0, 1, True, True, "0.05"),
    "data.max_drop_fraction": (0, 1, False, False, "0.5"),
    "data.limit": (1, None, False, False, "1000"),
    "checkpoint.save_every_minutes": (0, None, True, False, "20"),
    "eval.max_new_tokens": (1, None, False, False, "16"),
    "eval.rows": (1, None, False, False, "200"),
}
# Numbers where a negative sentinel means "off": the allowed sentinel and the range otherwise.
_SENTINELS = {"train.max_steps": (-1, 1, "-1 (run all epochs) or a step count ≥ 1, e.g. 200", "200")}

# Our own sections' types: key → (kinds, choices). kinds ⊆ bool int float str list dict null.
_OWN_TYPES: dict[str, tuple[set[str], tuple | None]] = {
    "run_name": ({"str"}, None),
    "profile": ({"str"}, PROFILE_NAMES),
    "model.name": ({"str"}, None),
    "model.tokenizer": ({"str", "null"}, None),
    "model.load_in_4bit": ({"bool"}, None),
    "model.max_length": ({"int"}, None),
    "model.trust_remote_code": ({"bool"}, None),
    "model.revision": ({"str", "null"}, None),
    "data.path": ({"str"}, None),
    "data.format": ({"str"}, FORMATS),
    "data.name": ({"str", "null"}, None),
    "data.split": ({"str", "null"}, None),
    "data.val_fraction": ({"float"}, None),
    "data.limit": ({"int", "null"}, None),
    "data.role_map": ({"dict"}, None),
    "data.system_prompt": ({"str", "null"}, None),
    "data.on_too_long": ({"str"}, ("drop", "truncate")),
    "data.max_drop_fraction": ({"float"}, None),
    "data.seed": ({"int"}, None),
    "data.reasoning": ({"str"}, REASONING),
    "checkpoint.save_every_minutes": ({"float"}, None),
    "checkpoint.min_free_gib": ({"float"}, None),
    "eval.num_generations": ({"int"}, None),
    "eval.max_new_tokens": ({"int"}, None),
    "eval.metric": ({"str"}, METRICS),
    "eval.metric_pattern": ({"str", "null"}, None),
    "eval.rows": ({"int", "null"}, None),
    "eval.checkpoints": ({"str"}, ("all", "none")),
    "export.gguf": ({"list"}, GGUF_TYPES),
    "export.merged": ({"bool"}, None),
    "export.push_repo": ({"str", "null"}, None),
    "export.push": ({"list"}, EXPORT_PARTS),
    "export.private": ({"bool"}, None),
    "export.adapter": ({"str"}, ("best", "last")),
    "sweep.method": ({"str"}, None),  # its choices and ranges: _validate_sweep
    "sweep.space": ({"dict"}, None),
    "sweep.trials": ({"int"}, None),
    "sweep.rows": ({"int", "null"}, None),
    "sweep.max_steps": ({"int"}, None),
    "sweep.val_rows": ({"int"}, None),
    "sweep.select_by": ({"str"}, None),
    "sweep.seed": ({"int"}, None),
}

# Key names that hold credentials (not `eos_token` or `max_new_tokens`, which name tokenizer tokens).
_SECRET_KEY = re.compile(
    r"^(token|(hub|hf|access|auth|api|push_to_hub|wandb)_token|.*api_?key|wandb_key|.*secret.*|.*passw(or)?d.*|"
    r".*credential.*)$",
    re.I,
)
# The shapes of access tokens: Hugging Face hf_…, W&B (40 hex), OpenAI sk-…, GitHub ghp_…/github_pat_…, api_….
# A 40-hex run inside a path (a Hugging Face cache's snapshots/<commit>/) is a commit id, not a W&B key.
_SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{20,}|api_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{20,})(?![A-Za-z0-9])"
    r"|(?<![A-Za-z0-9/._-])[0-9a-f]{40}(?![A-Za-z0-9/._-])"
)
# Keys whose value is a 40-hex git commit id by design, not a W&B key.
_COMMIT_KEYS = {"model.revision", "data.revision"}


def looks_like_secret(value: Any) -> bool:
    """Return True if value is text holding an access-token shape (hf_, W&B 40-hex, OpenAI sk-, GitHub ghp_/github_pat_)."""
    return isinstance(value, str) and _SECRET_VALUE.search(value) is not None


def is_secret(key: str, value: Any = None) -> bool:
    """Return True if a (dotted) config key names a credential, or its value looks like one — never to be written."""
    leaf = str(key).rsplit(".", 1)[-1]
    if _SECRET_KEY.search(leaf) and value not in (None, "", False):
        return True
    if str(key) in _COMMIT_KEYS and isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40}", value):
        return False
    return looks_like_secret(value)
_SCHEMA_VERSION = 1  # bump when _describe changes


# ---------------------------------------------------------------------------------- library schemas


def _describe(tp) -> dict:
    """Return {kinds, choices, items} for a dataclass field's type annotation (JSON-able)."""
    import enum
    import types
    import typing

    kinds: set[str] = set()
    strict: list = []  # enum values: a string must be one of them
    literal: list = []  # Literal string values
    items: set[str] = set()

    def walk(t, into: set[str]) -> None:
        origin = typing.get_origin(t)
        if t is type(None):
            into.add("null")
        elif t is bool:
            into.add("bool")
        elif t is int:
            into.add("int")
        elif t is float:
            into.add("float")
        elif t is str:
            into.add("str")
        elif isinstance(t, type) and issubclass(t, enum.Enum):
            into.add("str")
            if into is kinds:
                strict.extend(str(m.value) for m in t)
        elif origin is typing.Literal:
            for a in typing.get_args(t):
                if isinstance(a, bool):
                    into.add("bool")
                elif isinstance(a, str):
                    into.add("literal")
                    if into is kinds:
                        literal.append(a)
                else:
                    into.add("any")
        elif origin in (typing.Union, types.UnionType):
            for a in typing.get_args(t):
                walk(a, into)
        elif origin in (list, tuple, set) or t in (list, tuple):
            into.add("list")
            for a in typing.get_args(t):
                if a is not Ellipsis:
                    walk(a, items)
        elif origin is dict or t is dict:
            into.add("dict")
        else:
            into.add("any")

    walk(tp, kinds)
    choices = None
    if strict:
        choices = strict
    elif literal and "str" not in kinds and not any("[" in v for v in literal):
        choices = literal
    if "literal" in kinds:
        kinds.discard("literal")
        kinds.add("str")
    return {"kinds": sorted(kinds), "choices": choices, "items": sorted(items) or None}


def _build_schema(section: str) -> dict[str, dict]:
    import dataclasses
    import typing

    if section == "lora":
        from peft import LoraConfig as cls
    else:
        from trl import SFTConfig as cls
    hints = typing.get_type_hints(cls)
    schema = {}
    for f in dataclasses.fields(cls):
        desc = _describe(hints.get(f.name, f.type))
        default = f.default if f.default is not dataclasses.MISSING else None
        desc["default"] = default if isinstance(default, (bool, int, float, str, type(None))) else None
        schema[f.name] = desc
    return schema


def _library_schema(section: str) -> dict[str, dict]:
    """Return {field: {kinds, choices, items, default}} of peft.LoraConfig ('lora') or trl.SFTConfig ('train').

    Cached on disk per installed version, so checking a config does not import torch.
    """
    from importlib.metadata import PackageNotFoundError, version

    from .embedded import cache_root

    try:
        tag = "-".join(version(p) for p in ("trl", "peft", "transformers"))
    except PackageNotFoundError:
        tag = "unknown"
    path = cache_root() / "schema" / f"{section}-{tag}-v{_SCHEMA_VERSION}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    schema = _build_schema(section)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, schema, sort_keys=True)
    except OSError:
        pass
    return schema


def _library_fields(section: str) -> set[str]:
    """Return the field names of peft.LoraConfig ('lora') or trl.SFTConfig ('train')."""
    return set(_library_schema(section))


# --------------------------------------------------------------------------------------- reading YAML


def _nearest(key: Any, options) -> str:
    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1, cutoff=0.6)
    return f" → did you mean {close[0]!r}?" if close else ""


_YAML_HINTS = (
    ("'\\t'", "YAML indents with spaces, never tabs — replace the tab"),
    ("flow mapping", "a { … } mapping is not closed or lacks a comma — check the braces on that line"),
    ("flow sequence", "a [ … ] list is not closed or lacks a comma — check the brackets on that line"),
    ("mapping values are not allowed", "a value contains ': ' — put quotes around it, or add a space after the key's colon"),
    ("block end", "the indentation does not match the lines above — align keys of one section"),
    ("could not find expected ':'", "a line lacks the ':' between key and value"),
    ("found unexpected end of stream", "a quote is not closed"),
)


def _yaml_hint(problem: str) -> str:
    return next((hint for needle, hint in _YAML_HINTS if needle in problem), "fix that line")


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        seen: dict = {}
        for key_node, _ in node.value:
            try:
                key = loader.construct_object(key_node, deep=True)
                hash(key)
            except Exception:
                continue
            if key in seen:
                mark = key_node.start_mark
                raise LabError(
                    f"{{file}}: key {key!r} appears twice (lines {seen[key] + 1} and {mark.line + 1}) — "
                    "keep one; YAML would silently use the last"
                )
            seen[key] = key_node.start_mark.line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    def construct_document(loader, node):
        _check_expansion(node)  # before anything walks the values: an alias bomb expands exponentially
        return yaml.SafeLoader.construct_document(loader, node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    Loader.construct_document = construct_document
    return Loader


MAX_YAML_VALUES = 100_000  # a config has dozens; aliases (*name) may not expand beyond this
MAX_YAML_DEPTH = 50


def _check_expansion(root) -> None:
    """LabError when a YAML document nests deeper than MAX_YAML_DEPTH or its aliases expand past MAX_YAML_VALUES."""
    import yaml

    memo: dict[int, int] = {}

    def size(node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise LabError(
                f"{{file}} nests deeper than {MAX_YAML_DEPTH} levels (or an alias refers to itself) — a config needs "
                "two or three: flatten it"
            )
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        else:
            n = 1
        if n > MAX_YAML_VALUES:
            raise LabError(
                f"{{file}}: its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values (an alias bomb?) — "
                "write the values out, or use fewer aliases"
            )
        memo[id(node)] = n
        return n

    size(root, 0)


def load_yaml(path: str | os.PathLike) -> dict:
    """Return the mapping in a YAML file; LabError with line and column on a syntax error."""
    import yaml

    p = Path(path).expanduser()
    shown = str(path)
    if p.is_dir():
        raise LabError(f"config file {shown!r} is a folder — point LAB_CONFIG at a .yaml file inside it")
    if not p.is_file():
        raise LabError(f"config file {shown!r} does not exist — check LAB_CONFIG / the path you gave")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LabError(f"config file {shown!r} is not UTF-8 text — save it as plain text (UTF-8)") from None
    except OSError as e:
        raise LabError(f"config file {shown!r} cannot be read ({e.strerror or e}) — check its permissions") from None
    if not text.strip():
        raise LabError(f"config file {shown!r} is empty — write at least `run_name: my-run`")
    try:
        data = yaml.load(text, Loader=_loader())  # noqa: S506 — a SafeLoader subclass
    except LabError as e:
        raise LabError(str(e).replace("{file}", f"config file {shown!r}")) from None
    except RecursionError:
        raise LabError(
            f"config file {shown!r} nests deeper than {MAX_YAML_DEPTH} levels — a config needs two or three: flatten it"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        opened = getattr(e, "context_mark", None)
        if opened is not None and mark is not None and opened.line != mark.line and getattr(e, "context", None):
            problem += f" ({e.context} that starts at line {opened.line + 1}, column {opened.column + 1})"
        excerpt = ""
        if mark is not None:
            lines = text.splitlines()
            if mark.line < len(lines) and lines[mark.line].strip():
                excerpt = f" ({lines[mark.line].strip()[:60]!r})"
        raise LabError(
            f"config file {shown!r}: YAML syntax error{where}{excerpt}: {problem} — "
            f"{_yaml_hint(problem + ' ' + str(getattr(e, 'context', None) or ''))}"
        ) from None
    if not isinstance(data, dict):
        raise LabError(
            f"config file {shown!r} must be a mapping of sections (run_name:, model:, train: …), "
            f"got a {type(data).__name__} — see the example in the README"
        )
    return data


# ------------------------------------------------------------------------------------------- merging


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in _REPLACED:
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_layer(layer: dict, origin: str) -> dict:
    """Return the layer with empty sections as {}; LabError for an unknown section or a non-mapping one."""
    out = {}
    for key, value in layer.items():
        if key not in _TOP_LEVEL and key not in DEFAULTS:
            raise LabError(
                f"unknown config section {key!r} in {origin}{_nearest(key, list(DEFAULTS))} "
                f"(sections: {', '.join(_SECTIONS)})"
            )
        if key in _SECTIONS:
            if value is None:  # `lora:` with every line under it commented out
                value = {}
            if not isinstance(value, dict):
                raise LabError(
                    f"config section {key!r} in {origin} must be a mapping of keys (write `{key}:` with its keys "
                    f"indented below it), got {value!r}"
                )
        out[key] = value
    return out


def merge_defaults(cfg: dict) -> dict:
    """Return DEFAULTS with cfg merged over it (keys a config file leaves out take their defaults)."""
    return _merge(DEFAULTS, _check_layer(cfg, "the config"))


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    """Return cfg's value at a dotted key such as 'train.learning_rate' (default when absent)."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------- checking


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def _number_from_text(value: str) -> int | float | None:
    text = value.strip().replace("_", "")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def _example(key: str, default: Any) -> str:
    if key in _RANGES:
        return _RANGES[key][4]
    if key in _SENTINELS:
        return _SENTINELS[key][3]
    if isinstance(default, bool):
        return "true" if default else "false"
    if default is None or default == "" or isinstance(default, (dict, list)) and not default:
        return ""
    return json.dumps(default) if isinstance(default, (list, dict)) else str(default)


def _describe_kinds(kinds: set[str]) -> str:
    names = {
        "bool": "true or false",
        "int": "a whole number",
        "float": "a number",
        "str": "text",
        "list": "a list",
        "dict": "a mapping",
        "null": "null",
    }
    order = ["bool", "int", "float", "str", "list", "dict", "null"]
    shown = [names[k] for k in order if k in kinds and not (k == "int" and "float" in kinds)]
    return " or ".join(shown)


def _check_value(key: str, value: Any, kinds: set[str], choices, items, default: Any) -> Any:
    """Return value (numbers given as text converted), or raise LabError naming key, value and fix."""
    if "any" in kinds:
        return value
    eg = _example(key, default)
    eg_s = f" — e.g. {key.rsplit('.', 1)[-1]}: {eg}" if eg else ""
    kind = _kind_of(value)
    if kind == "null":
        if "null" in kinds:
            return None
        raise LabError(f"{key} needs a value, got nothing (null){eg_s or ' — remove the key to use the default'}")
    if kind == "bool":
        if "bool" in kinds:
            return value
        raise LabError(f"{key} must be {_describe_kinds(kinds)}, got {str(value).lower()}{eg_s}")
    if kind == "str" and "bool" in kinds and "str" not in kinds:
        if value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            raise LabError(
                f"{key} must be true or false, got the text {value!r} — write {value.strip().lower() in ('true', 'yes', 'on', '1') and 'true' or 'false'} without quotes"
            )
        raise LabError(f"{key} must be true or false, got {value!r}{eg_s}")
    if kind == "str" and kinds & {"int", "float"} and "str" not in kinds:
        number = _number_from_text(value)
        if number is None:
            raise LabError(f"{key} must be {_describe_kinds(kinds)}, got {value!r}{eg_s}")
        value, kind = number, _kind_of(number)
    if kind in ("int", "float"):
        if "float" in kinds:
            return float(value) if kind == "float" else value
        if "int" in kinds:
            if kind == "float":
                if value != int(value):
                    raise LabError(f"{key} must be a whole number, got {value!r}{eg_s}")
                return int(value)
            return value
        if "bool" in kinds and "str" not in kinds:
            raise LabError(f"{key} must be true or false, got {value!r} — write true or false")
    if kind == "list":
        if "list" not in kinds:
            raise LabError(f"{key} takes one value, got a list {list(value)!r}{eg_s}")
        bad = [v for v in value if items and _kind_of(v) not in items and not ("float" in items and _kind_of(v) == "int")]
        if bad:
            raise LabError(f"{key} must be a list of {_describe_kinds(set(items))}, got {bad[0]!r} in it{eg_s}")
        if choices:
            wrong = [v for v in value if v not in choices]
            if wrong:
                raise LabError(
                    f"{key} must list values from {', '.join(map(str, choices))}, got {wrong[0]!r}{_nearest(wrong[0], choices)}"
                )
        return list(value)
    if kind == "dict":
        if "dict" not in kinds:
            raise LabError(f"{key} takes one value, got a mapping {value!r}{eg_s}")
        return value
    if kind == "str":
        if "str" not in kinds:
            raise LabError(f"{key} must be {_describe_kinds(kinds)}, got {value!r}{eg_s}")
        if choices and value not in choices:
            listed = ", ".join(map(str, choices[:12])) + (", …" if len(choices) > 12 else "")
            raise LabError(f"{key} must be one of {listed}, got {value!r}{_nearest(value, choices)}")
        return value
    raise LabError(f"{key} must be {_describe_kinds(kinds)}, got {value!r}{eg_s}")


def _check_range(key: str, value: Any, default: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if key in _SENTINELS:
        sentinel, lo, text, _ = _SENTINELS[key]
        if value != sentinel and value < lo:
            raise LabError(f"{key} must be {text}, got {value!r}")
        return
    if key in _RANGES:
        lo, hi, lo_open, hi_open, eg = _RANGES[key]
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi)
        )
        if bad:
            if hi is None:
                rule = f"{'>' if lo_open else '≥'} {lo}"
            else:
                rule = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise LabError(f"{key} must be {rule}, got {value!r} — e.g. {key.rsplit('.', 1)[-1]}: {eg}")
        return
    if value < 0 and not (isinstance(default, (int, float)) and default < 0):
        eg = f" — e.g. {key.rsplit('.', 1)[-1]}: {default}" if isinstance(default, (int, float)) else ""
        raise LabError(f"{key} must not be negative, got {value!r}{eg}")


def _check_secrets(node: Any, where: str = "") -> None:
    """LabError (without echoing the value) when a key or value of the config looks like a credential."""
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{where}{key}"
            if dotted in _COMMIT_KEYS and isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40}", value):
                continue  # a git commit id
            if _SECRET_KEY.search(str(key)) and value not in (None, "", False):
                raise LabError(
                    f"{dotted} would store a secret in the run's config.yaml on Drive — remove it and put the token "
                    "in Colab's secrets (key icon) or an environment variable: HF_TOKEN, WANDB_API_KEY"
                )
            _check_secrets(value, dotted + ".")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_secrets(value, f"{where[:-1]}[{i}].")
    elif looks_like_secret(node):
        raise LabError(
            f"{where[:-1] or 'a config value'} holds what looks like an access token — remove it from the config; "
            "tokens belong in Colab's secrets (key icon) or the HF_TOKEN / WANDB_API_KEY environment variables"
        )


def _inferred_type(default: Any) -> tuple[set[str], None]:
    """Return the kinds a key not listed in _OWN_TYPES accepts, read from its default (null allowed)."""
    kind = _kind_of(default)
    if kind == "null":
        return {"any"}, None
    if kind == "int":
        return {"int", "null"}, None
    return {kind, "null"} if kind != "bool" and kind != "dict" else {kind}, None


def _check_section(cfg: dict, section: str) -> None:
    values = cfg.get(section, {})
    if section in ("lora", "train"):
        schema = _library_schema(section)
        lib = "peft.LoraConfig" if section == "lora" else "trl.SFTConfig"
        for key in values:
            if key not in schema:
                raise LabError(f"unknown key {section}.{key} (not a {lib} field){_nearest(key, schema)}")
        for key in list(values):
            dotted = f"{section}.{key}"
            if dotted in _RESERVED:
                raise LabError(f"{dotted} is set by the lab: {_RESERVED[dotted]}")
            spec = schema[key]
            default = DEFAULTS[section].get(key, spec.get("default"))
            value = _check_value(dotted, values[key], set(spec["kinds"]), spec.get("choices"), spec.get("items"), default)
            _check_range(dotted, value, spec.get("default"))
            values[key] = value
        if section == "train" and "report_to" in values:
            from .tracking import check_report_to

            check_report_to(values["report_to"])
        return
    for key in values:
        if key not in DEFAULTS[section]:
            raise LabError(f"unknown key {section}.{key}{_nearest(key, DEFAULTS[section])} "
                           f"(keys of {section}: {', '.join(DEFAULTS[section])})")
    for key in list(values):
        dotted = f"{section}.{key}"
        kinds, choices = _OWN_TYPES.get(dotted) or _inferred_type(DEFAULTS[section][key])
        value = _check_value(dotted, values[key], kinds, choices, {"str"} if "list" in kinds else None,
                             DEFAULTS[section][key])
        _check_range(dotted, value, DEFAULTS[section][key])
        values[key] = value


def check_run_name(name: Any, origin: str = "run_name") -> None:
    """LabError unless name is a safe folder name (letters, digits, '.', '_', '-'; ≤ 64 characters)."""
    if isinstance(name, str) and _RUN_NAME_RE.fullmatch(name):
        return
    if not isinstance(name, str) or not name:
        got = "nothing" if name in (None, "") else repr(name)
    else:
        bad = sorted({c for c in name if not re.match(r"[A-Za-z0-9._-]", c)})
        got = repr(name)
        if bad:
            got += f" (has {' '.join(repr(c) for c in bad)})"
        elif len(name) > 64:
            got += f" ({len(name)} characters)"
        else:
            got += " (must start with a letter or digit)"
    suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:64] if isinstance(name, str) else ""
    eg = suggestion if suggestion and _RUN_NAME_RE.fullmatch(suggestion) else "pricer-llama1b"
    raise LabError(
        f"{origin} must be a safe folder name (letters, digits, '.', '_', '-'; at most 64; no spaces or '/'), "
        f"got {got} — e.g. {eg}"
    )


def check_profile(name: Any, origin: str = "profile") -> None:
    """LabError unless name is 'auto' or a known profile."""
    if name in PROFILE_NAMES:
        return
    raise LabError(
        f"{origin} must be one of {', '.join(PROFILE_NAMES)}, got {name!r}{_nearest(name, PROFILE_NAMES)}"
    )


def _check_embedded(key: str, name: str, known: str | tuple[str, ...]) -> None:
    names = known if isinstance(known, tuple) else (known,)
    if name.startswith("embedded:") and name not in names:
        raise LabError(f"{key} {name!r} is not a built-in name — the embedded one{'s are' if len(names) > 1 else ' is'} "
                       f"{', '.join(map(repr, names))}")


def validate(cfg: dict) -> dict:
    """Return cfg after checking every key and value; LabError naming the key and the fix otherwise."""
    _check_secrets(cfg)
    for key in list(cfg):
        if key in _TOP_LEVEL:
            continue
        if key not in DEFAULTS:
            raise LabError(f"unknown config section {key!r}{_nearest(key, list(DEFAULTS))} "
                           f"(sections: {', '.join(_SECTIONS)})")
        if cfg[key] is None:
            cfg[key] = {}
        if not isinstance(cfg[key], dict):
            raise LabError(f"config section {key!r} must be a mapping, got {cfg[key]!r}")
    for section in _SECTIONS:
        if section in cfg:  # a section left out is not added (a sweep trial's config has no sweep:)
            _check_section(cfg, section)

    check_run_name(cfg.get("run_name"))
    check_profile(cfg.get("profile", "auto"))
    m, d, e, x = (cfg.get(k, {}) for k in ("model", "data", "eval", "export"))
    for key, section, known in (("model.name", m, EMBEDDED_MODEL), ("data.path", d, EMBEDDED_DATASETS)):
        value = section.get("name" if key == "model.name" else "path")
        if not isinstance(value, str) or not value.strip():
            raise LabError(f"{key} must be a hub id or a local path, got {value!r} — e.g. {known if isinstance(known, str) else known[0]}")
        _check_embedded(key, value, known)
    if m.get("tokenizer"):
        _check_embedded("model.tokenizer", m["tokenizer"], EMBEDDED_MODEL)
    for source, target in (d.get("role_map") or {}).items():
        if target not in ROLES:
            raise LabError(
                f"data.role_map maps {source!r} to {target!r} — map it to one of {', '.join(ROLES)}"
                f"{_nearest(target, ROLES)}"
            )
    if e.get("metric") == "regex" and not e.get("metric_pattern"):
        raise LabError("eval.metric is 'regex' but eval.metric_pattern is empty — e.g. metric_pattern: 'Answer: (\\w+)'")
    if e.get("metric_pattern"):
        try:
            rx = re.compile(e["metric_pattern"])
        except re.error as err:
            raise LabError(f"eval.metric_pattern {e['metric_pattern']!r} is not a valid regular expression ({err})") from None
        if rx.groups < 1:
            raise LabError(
                f"eval.metric_pattern {e['metric_pattern']!r} needs one (group) around the answer — e.g. 'Answer: (\\w+)'"
            )
    if x.get("push_repo") and not re.fullmatch(r"[\w.-]+/[\w.-]+", x["push_repo"]):
        raise LabError(f"export.push_repo must be 'owner/name', got {x['push_repo']!r} — e.g. your-name/pricer-lora")
    targets = cfg.get("lora", {}).get("target_modules", "all-linear")
    if targets is None or targets == [] or targets == "":
        raise LabError("lora.target_modules is empty — use all-linear, or names such as [q_proj, v_proj]")
    if "sweep" in cfg:
        _validate_sweep({**DEFAULTS["sweep"], **cfg["sweep"]})
    return cfg


def check_with_libraries(cfg: dict) -> None:
    """LabError when peft.LoraConfig or trl.SFTConfig refuse the lora:/train: keys (only keys beyond the defaults).

    The libraries know combinations no table here lists (e.g. load_best_model_at_end with save
    steps that are not a multiple of eval steps); asking them costs an import, so it runs only
    when the config sets keys the lab does not set itself.
    """
    import contextlib
    import io
    import tempfile

    for section, lib in (("lora", "peft.LoraConfig"), ("train", "trl.SFTConfig")):
        if not set(cfg.get(section, {})) - set(DEFAULTS[section]):
            continue
        kwargs = dict(cfg[section])
        try:
            with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as tmp:
                if section == "lora":
                    from peft import LoraConfig

                    LoraConfig(**{**kwargs, "task_type": "CAUSAL_LM"})
                else:
                    from trl import SFTConfig

                    # as lab_utils.training.build_trainer calls it: steps-based saving and evaluation
                    kwargs.pop("save_total_limit", None)
                    kwargs.pop("report_to", None)
                    kwargs.setdefault("eval_steps", kwargs.get("save_steps"))
                    kwargs.setdefault("bf16", False)  # precision is the hardware's choice, checked in run.start()
                    kwargs.setdefault("fp16", False)
                    SFTConfig(
                        output_dir=tmp,
                        max_length=int(cfg["model"]["max_length"]),
                        save_strategy="steps",
                        eval_strategy="steps",
                        report_to="none",
                        **kwargs,
                    )
        except (ValueError, TypeError, NotImplementedError) as e:
            text = " ".join(str(e).split()) or type(e).__name__
            text = text if len(text) <= 240 else text[:239] + "…"
            raise LabError(f"{lib} refuses the {section}: section ({text}) — change the {section}: keys it names") from None


def _check_number(key: str, value: Any, example: str, *, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LabError(f"{key} must be a number, got {value!r} — e.g. {example}")
    bad = (
        (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
    )
    if bad:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + str(lo)
        hi_s = "" if hi is None else str(hi) + (")" if hi_open else "]")
        raise LabError(f"{key} must be in {lo_s}, {hi_s}, got {value!r} — e.g. {example}")


def _validate_sweep(s: dict) -> None:
    """Check the sweep: section (05_sweep); LabError naming the key and the fix otherwise."""
    if s["method"] not in ("grid", "random"):
        raise LabError(f"sweep.method must be 'grid' or 'random', got {s['method']!r}")
    for key, lo in (("trials", 1), ("max_steps", 1), ("val_rows", 1), ("rows", 1)):
        if key != "rows" or s[key] is not None:
            _check_number(f"sweep.{key}", s[key], str(DEFAULTS["sweep"][key]), lo=lo)
    space = s["space"]
    if not isinstance(space, dict) or not space:
        raise LabError(f"sweep.space must map keys to values to try, got {space!r} — e.g. {{train.learning_rate: [2e-4, 1e-3]}}")
    for key, values in space.items():
        section, _, field = str(key).partition(".")
        if section not in ("train", "lora") or not field:
            raise LabError(f"sweep.space key {key!r} is not a train.* or lora.* key — e.g. train.learning_rate or lora.r")
        if field not in _library_fields(section):
            raise LabError(f"sweep.space key {key!r} is not a {section} field{_nearest(field, _library_fields(section))}")
        if key in ("train.max_steps", "train.num_train_epochs", "train.save_steps"):
            raise LabError(f"sweep.space cannot vary {key}: the sweep sets it — use sweep.max_steps for the budget")
        ranged = isinstance(values, dict) and s["method"] == "random"
        if ranged and (set(values) - {"min", "max", "log"} or not {"min", "max"} <= set(values)):
            raise LabError(f"sweep.space.{key} range must be {{min: …, max: …, log: true|false}}, got {values!r}")
        if ranged:
            _check_number(f"sweep.space.{key}.min", values["min"], "1e-4")
            _check_number(f"sweep.space.{key}.max", values["max"], "1e-3", lo=values["min"])
        elif not isinstance(values, list) or not values:
            raise LabError(f"sweep.space.{key} must be a non-empty list of values to try, got {values!r} — e.g. [8, 32]")


def resolve_config(form: dict | None = None, yaml_path: str | None = None, base: dict | None = None) -> dict:
    """Return the run's config: defaults (or `base`) → YAML → form fields → environment, validated.

    `form` maps dotted keys ('train.max_steps') or sections to values; it is ignored when
    LAB_CONFIG is set, which names the YAML file to use instead (and then `base` is ignored too).
    """
    env_yaml = os.environ.get("LAB_CONFIG")
    cfg = copy.deepcopy(base if base is not None and not env_yaml else DEFAULTS)
    layers: list[tuple[dict, str]] = []
    if env_yaml:
        layers.append((load_yaml(env_yaml), f"LAB_CONFIG ({env_yaml})"))
        form = None
    elif yaml_path:
        layers.append((load_yaml(yaml_path), str(yaml_path)))
    if form:
        nested: dict = {}
        for key, value in form.items():
            _set_dotted(nested, key, value)
        layers.append((nested, "the notebook's settings"))
    for layer, origin in layers:
        cfg = _merge(cfg, _check_layer(layer, origin))
    if os.environ.get("LAB_RUN_NAME"):
        check_run_name(os.environ["LAB_RUN_NAME"], "LAB_RUN_NAME")
        cfg["run_name"] = os.environ["LAB_RUN_NAME"]
    if os.environ.get("LAB_PROFILE"):  # for this session only: checked here, never written into the run's config
        check_profile(os.environ["LAB_PROFILE"], "LAB_PROFILE")
    return validate(cfg)


def _flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and key != "role_map" and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def diff_configs(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Return {dotted_key: (old, new)} for every value that differs between two configs."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def dump_yaml(cfg: dict, path: Path) -> None:
    """Write cfg as YAML to path atomically (temp file, then rename)."""
    import yaml

    write_text(path, yaml.safe_dump(cfg, sort_keys=False))
