"""The run's configuration: defaults, YAML, notebook form fields and environment, merged and checked.

Precedence, lowest first: built-in defaults → profile defaults → YAML file → notebook form fields
→ environment (`LAB_RUN_NAME`, `LAB_PROFILE`). `LAB_CONFIG` names a YAML file used *instead of*
the notebook's form fields. The `lora:` and `train:` sections pass through to `peft.LoraConfig`
and `trl.SFTConfig` by their own field names; an unknown key is an error naming the nearest one.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

from .embedded import EMBEDDED_DATA, EMBEDDED_MODEL
from .errors import LabError

__all__ = ["DEFAULTS", "resolve_config", "load_yaml", "validate", "diff_configs", "dump_yaml", "get"]

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
    },
    "checkpoint": {"save_every_minutes": 20.0, "min_free_gib": 0.5},
    "eval": {"num_generations": 8, "max_new_tokens": 16, "metric": "auto", "metric_pattern": None},
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
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Mappings that a layer replaces whole instead of merging key by key.
_REPLACED = {"role_map", "space"}


def _library_fields(section: str) -> set[str]:
    import dataclasses

    if section == "lora":
        from peft import LoraConfig

        return {f.name for f in dataclasses.fields(LoraConfig)}
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)}


def _nearest(key: str, options: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" → did you mean {close[0]!r}?" if close else ""


def load_yaml(path: str | os.PathLike) -> dict:
    """Return the mapping in a YAML file; LabError with line and column on a syntax error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LabError(f"config file {str(p)!r} does not exist — check LAB_CONFIG / the path you gave")
    text = p.read_text()
    if not text.strip():
        raise LabError(f"config file {str(p)!r} is empty — write at least `run_name: my-run`")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LabError(f"config file {str(p)!r}: YAML syntax error{where}: {problem} — fix that line") from None
    if not isinstance(data, dict):
        raise LabError(f"config file {str(p)!r} must be a mapping of sections, got {type(data).__name__}")
    return data


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


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    """Return cfg's value at a dotted key such as 'train.learning_rate' (default when absent)."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


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


def validate(cfg: dict) -> dict:
    """Return cfg after checking every key and value; LabError naming the key and the fix otherwise."""
    for key in cfg:
        if key in _TOP_LEVEL:
            continue
        if key not in DEFAULTS:
            raise LabError(f"unknown config section {key!r}{_nearest(key, list(DEFAULTS))}")
        if not isinstance(cfg[key], dict):
            raise LabError(f"config section {key!r} must be a mapping, got {cfg[key]!r}")
    for section in ("model", "data", "checkpoint", "eval", "export", "sweep"):
        for key in cfg.get(section, {}):
            if key not in DEFAULTS[section]:
                raise LabError(f"unknown key {section}.{key}{_nearest(key, DEFAULTS[section])}")
    for section in ("lora", "train"):
        fields = _library_fields(section)
        lib = "peft.LoraConfig" if section == "lora" else "trl.SFTConfig"
        for key in cfg.get(section, {}):
            if key not in fields:
                raise LabError(f"unknown key {section}.{key} (not a {lib} field){_nearest(key, fields)}")
        for key, value in cfg.get(section, {}).items():
            default = DEFAULTS[section].get(key)
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, str):
                    try:
                        value = float(value) if any(c in value for c in ".eE") else int(value)
                        cfg[section][key] = value
                    except ValueError:
                        pass
                _check_number(f"{section}.{key}", value, repr(default))

    name = cfg.get("run_name")
    if not isinstance(name, str) or not _RUN_NAME_RE.match(name):
        raise LabError(
            f"run_name must be a safe folder name (letters, digits, '.', '_', '-'; ≤ 64), got {name!r}"
            " — e.g. pricer-llama1b"
        )
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    if not isinstance(m.get("name"), str) or not m["name"].strip():
        raise LabError(f"model.name must be a hub id or a folder, got {m.get('name')!r} — e.g. {EMBEDDED_MODEL}")
    if not isinstance(d.get("path"), str) or not d["path"].strip():
        raise LabError(f"data.path must be a hub dataset id or a file/folder, got {d.get('path')!r}")
    _check_number("model.max_length", m.get("max_length"), "512", lo=16)
    if int(m["max_length"]) != m["max_length"]:
        raise LabError(f"model.max_length must be a whole number of tokens, got {m['max_length']!r} — e.g. 512")
    _check_number("data.val_fraction", d.get("val_fraction"), "0.05", lo=0, hi=1, lo_open=True, hi_open=True)
    _check_number("data.max_drop_fraction", d.get("max_drop_fraction"), "0.5", lo=0, hi=1)
    if d.get("limit") is not None:
        _check_number("data.limit", d["limit"], "1000", lo=1)
    if d.get("on_too_long") not in ("drop", "truncate"):
        raise LabError(f"data.on_too_long must be 'drop' or 'truncate', got {d.get('on_too_long')!r}")
    if not isinstance(d.get("role_map"), dict):
        raise LabError(f"data.role_map must be a mapping like {{bot: assistant}}, got {d.get('role_map')!r}")
    formats = ("auto", "sharegpt", "messages", "alpaca", "prompt_completion", "text")
    if d.get("format") not in formats:
        raise LabError(f"data.format must be one of {', '.join(formats)}, got {d.get('format')!r}")
    if not isinstance(m.get("trust_remote_code"), bool):
        raise LabError(f"model.trust_remote_code must be true or false, got {m.get('trust_remote_code')!r}")
    _check_number("train.learning_rate", t.get("learning_rate"), "2e-4", lo=0, hi=1, lo_open=True)
    _check_number("lora.r", cfg["lora"].get("r"), "32", lo=1)
    _check_number("lora.lora_dropout", cfg["lora"].get("lora_dropout", 0.0), "0.1", lo=0, hi=1, hi_open=True)
    _check_number(
        "checkpoint.save_every_minutes", cfg["checkpoint"].get("save_every_minutes"), "20", lo=0, lo_open=True
    )
    if "sweep" in cfg:
        _validate_sweep({**DEFAULTS["sweep"], **cfg["sweep"]})
    return cfg


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
    layers: list[dict] = []
    if env_yaml:
        layers.append(load_yaml(env_yaml))
        form = None
    elif yaml_path:
        layers.append(load_yaml(yaml_path))
    if form:
        nested: dict = {}
        for key, value in form.items():
            _set_dotted(nested, key, value)
        layers.append(nested)
    for layer in layers:
        for key, value in layer.items():
            if key not in _TOP_LEVEL and key not in DEFAULTS:
                raise LabError(f"unknown config section {key!r}{_nearest(key, list(DEFAULTS))}")
            if key in DEFAULTS and key not in _TOP_LEVEL and not isinstance(value, dict):
                raise LabError(f"config section {key!r} must be a mapping, got {value!r}")
        cfg = _merge(cfg, layer)
    if os.environ.get("LAB_RUN_NAME"):
        cfg["run_name"] = os.environ["LAB_RUN_NAME"]
    if os.environ.get("LAB_PROFILE"):
        cfg["profile"] = os.environ["LAB_PROFILE"]
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

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(path)
