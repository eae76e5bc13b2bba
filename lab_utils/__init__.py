"""lab_utils: the shared work behind the QLoRA lab notebooks.

`import lab_utils` is instant and needs no GPU: torch, transformers and unsloth are imported
inside the functions that use them.
"""

__version__ = "0.1.0"
