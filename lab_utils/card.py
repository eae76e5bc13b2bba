"""The model card: export/README.md with Hub front matter, the base, data, LoRA, training, metrics, use and limits.

Secrets (config.is_secret) and training rows (the data report's excerpts, the baseline's answer) never reach it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .choices import EXPORT_PARTS
from .files import write_text


def _finished(folder: Path, pattern: str) -> list[Path]:
    """Return the finished files matching pattern in folder (temp files start with '.')."""
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))


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


def _split_config(config: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Return the config's non-secret settings as (LoRA, data, training) dicts of dotted keys."""
    from .model import hub_model_id

    lora, data_cfg, train = {}, {}, {}
    for k, v in _flatten(config or {}).items():
        if _is_secret(k, v):
            continue
        v = _public(v)
        if k in ("model.name", "model.tokenizer") and v and not hub_model_id(v):
            v = LOCAL
        parts = k.lower().split(".")
        if "lora" in parts[0] or parts[-1] in _LORA_KEYS:
            lora[k] = v
        elif parts[0] in ("data", "dataset") or parts[-1] in ("dataset", "dataset_name", "data_path"):
            data_cfg[k] = v
        else:
            train[k] = v
    return lora, data_cfg, train


def _files_section(out_dir: Path, exported: set[str]) -> list[str]:
    """Return the card's "Files" lines: the exported parts (all of them when none is there yet)."""
    file_lines = {
        "adapter": "- `adapter/` - the LoRA adapter: `PeftModel.from_pretrained("
                   "AutoModelForCausalLM.from_pretrained(base), repo, subfolder='adapter')`",
        "merged": "- `merged/` - the adapter merged into the 16-bit base: "
                  "`AutoModelForCausalLM.from_pretrained(repo, subfolder='merged')`",
        "gguf": "- `gguf/` - the merged model for llama.cpp / Ollama / LM Studio: "
                + (", ".join(f"`{g.name}`" for g in _finished(out_dir / "gguf", "*.gguf")) or "f16, q8_0"),
    }
    return ["## Files", "", *(file_lines[p] for p in EXPORT_PARTS if p in exported or not exported), ""]


def _data_section(data_cfg: dict, data_report: dict[str, Any] | None) -> list[str]:
    """Return the card's "Data" lines: the data settings and the report's numbers (never its rows)."""
    s = ["## Data", ""]
    if data_cfg:
        s += [_table(data_cfg), ""]
    if data_report:
        rows = {k: _public(v) for k, v in _flatten(data_report).items()
                if not _is_secret(k, v) and not (isinstance(v, (list, tuple)) and len(v) > 12)}
        s += ["Data report summary:", "", _table(dict(list(rows.items())[:40]), ("item", "value")), ""]
    if not data_cfg and not data_report:
        s += ["Not recorded.", ""]
    return s


def _evaluation_section(metrics: dict[str, Any] | None) -> list[str]:
    """Return the card's "Evaluation" lines: every number of eval/metrics.json."""
    if not metrics:
        return ["## Evaluation", "", "No eval/metrics.json was found for this run.", ""]
    # the constant guess's answer is a training row's answer: numbers only from the baseline, no data in the card
    mrows = {k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float, str)) and not _is_secret(k, v)
             and not (k.startswith("baseline.") and isinstance(v, str))}
    return ["## Evaluation", "", _table(mrows, ("metric", "value")), ""]


_LIMITS = [
    "## Intended use and limits", "",
    "- A teaching artifact from a fine-tuning lab: for learning and experiments, not production.",
    "- Small model, short training: it can be confidently wrong, repeat itself or drift off-topic; "
    "check anything that matters.",
    "- Not evaluated for safety, bias or toxicity; it inherits the base model's limitations and license "
    "(see {base_model}).",
    "- Use the chat template saved with the tokenizer; other prompt formats will work worse.",
    "- GGUF q8_0/q4_k_m files are quantized: expect small differences from the 16-bit model.", "",
]


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
    from huggingface_hub import ModelCard, ModelCardData

    out_dir = Path(out_dir)
    if metrics is None:
        mfile = out_dir.parent / "eval" / "metrics.json"
        if mfile.is_file():
            metrics = json.loads(mfile.read_text())
    lora, data_cfg, train = _split_config(config)
    exported = {p for p in EXPORT_PARTS if (out_dir / p).exists()}
    tags = ["qlora", "lora", "peft", "sft", "text-generation", "qlora-lab"] + ["gguf"] * ("gguf" in exported)
    from .model import hub_model_id

    hub = hub_model_id(base_model)  # base_model only as a hub id: a path, a .gguf file or embedded: is nothing to link
    front = ModelCardData(base_model=hub, library_name="peft", pipeline_tag="text-generation", tags=tags)
    base_ref = f"for [`{hub}`](https://huggingface.co/{hub}), trained" if hub else "trained from a local model (not on the Hub)"
    s: list[str] = [f"# {run_name}", "",
                    f"A LoRA adapter {base_ref} with QLoRA (4-bit base, 16-bit adapter) in the qlora-lab notebooks.", ""]
    s += _files_section(out_dir, exported)
    what = f"`{hub}`" if hub else "Trained from a local model (a file or folder on the training machine, not a Hub id)"
    s += ["## Base model", "", f"{what}, loaded in 4 bits (NF4) for training; merged into its 16-bit weights.", ""]
    s += _data_section(data_cfg, data_report)
    s += ["## LoRA", "", _table(lora) if lora else "Not recorded.", ""]
    s += ["## Training hyperparameters", "", _table(train) if train else "Not recorded.", ""]
    s += _evaluation_section(metrics)
    s += [line.replace("{base_model}", f"`{hub}`" if hub else "its own card") for line in _LIMITS]
    card = ModelCard(f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(s))  # the Hub's own front matter writer
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_text(out_dir / "README.md", str(card))
