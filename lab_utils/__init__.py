"""lab_utils: the shared work behind the QLoRA lab notebooks.

`import lab_utils` is instant and needs no GPU: torch, transformers and unsloth are imported
inside the functions that use them, and the names below load their module on first use.
"""

from __future__ import annotations

import importlib
import logging

# bitsandbytes announces at import that an optional CPU kernel package (fetched from the hub) is
# absent; the CPU path works without it, so the line only confuses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

# name used by the notebooks → module that defines it
_EXPORTS = {
    "start": "run",
    "Run": "run",
    "LabError": "errors",
    "environment_report": "environment",
    "training_path": "environment",
    "get_secret": "environment",
    "in_colab": "environment",
    "resolve_config": "config",
    "load_tokenizer": "model",
    "load_for_training": "model",
    "prepare_data": ("data", "prepare"),
    "load_prepared": "data",
    "report_table": "data",
    "report_examples": "data",
    "lengths_table": "data",
    "read_data_report": "data",
    "train_settings": "training",
    "TrainPlan": "training",
    "settings_table": "training",
    "memory_table": "training",
    "build_trainer": "training",
    "plan_resume": "training",
    "train": "training",
    "save_adapter": "training",
    "plot_training": "plots",
    "evaluate_run": "evaluation",
    "load_tuned": "evaluation",
    "task_metrics": "evaluation",
    "metrics_table": "evaluation",
    "verdict": "evaluation",
    "loss_note": "evaluation",
    "generations_table": "evaluation",
    "export_adapter_source": "evaluation",
    "plot_loss_curve": "plots",
    "plot_task_metric": "plots",
    "chat_widget": "chatui",
    "ChatUI": "chatui",
    "show_table": "display",
    "show_image": "display",
    "show_masked_example": "display",
    "detect_hardware": "hardware",
    "export_adapter": "export",
    "export_merged": "export",
    "export_gguf": "export",
    "export_card": "export",
    "push_export": "export",
    "plan_sweep": "sweep",
    "plan_table": "sweep",
    "run_sweep": "sweep",
    "sweep_table": "sweep",
    "plot_sweep": "sweep",
    "write_best_config": "sweep",
    "dashboard": "tracking",
    "tracked_history": ("tracking", "history"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'lab_utils' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
