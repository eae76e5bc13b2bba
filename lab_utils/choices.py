"""The values a config key may take, owned below every stage so that config.py imports no stage module.

config.py checks a config against these lists before anything is loaded; the stages that act on the
values (chat, embedded, export) import them from here and re-export them under their old names.
"""

from __future__ import annotations

# model.name / data.path: the built-in tiny model and datasets, named by reserved values (embedded.py builds them).
EMBEDDED_MODEL = "embedded:tiny-llama"
EMBEDDED_DATA = "embedded:pricer"
EMBEDDED_TOOLS = "embedded:tools"  # a small tool-calling task: pick the tool, fill its arguments
EMBEDDED_DATASETS = (EMBEDDED_DATA, EMBEDDED_TOOLS)

# data.format: the row shapes chat.py reads; data.role_map targets; data.reasoning.
CHAT_FORMATS = ("sharegpt", "messages", "alpaca", "prompt_completion", "text")
# Targets a role may map to: `tool` is a tool's result, `function_call` a ShareGPT turn whose value is the call.
ROLES = ("system", "user", "assistant", "tool", "function_call")
REASONING = ("keep", "drop")  # data.reasoning: what happens to an assistant turn's thinking trace

# export.gguf: what llama.cpp's converter writes itself; export.push: the parts a Hub upload may hold.
CONVERTER_OUTTYPES = ("f16", "bf16", "f32", "q8_0")
EXPORT_PARTS = ("adapter", "merged", "gguf")

# profile / LAB_PROFILE: the hardware a run expects (defaults.PROFILES holds what each one means).
PROFILE_NAMES = ("auto", "colab-t4", "colab-l4", "colab-a100", "cpu-smoke")
