"""Evaluation: held-out assistant-token loss and a task metric, base model vs tuned adapter, saved to eval/.

The base model is the same loaded model with its adapter disabled, so both see exactly the same
tokens. The task metric is chosen by `eval.metric`: `price` (mean absolute error of the first
dollar amount and the share of answers that contain one; the embedded Pricer's measure),
`exact_match`, `regex` (`eval.metric_pattern` with one group, compared as text or number), or
`auto` (price when every reference answer holds a dollar amount, else exact match).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .embedded import parse_price
from .errors import LabError

__all__ = [
    "load_tuned",
    "assistant_loss",
    "generate",
    "task_metrics",
    "prompt_and_reference",
    "evaluate_run",
]


def load_tuned(run, adapter_dir: Path | None = None):
    """Return (PeftModel in eval mode, tokenizer): the 4-bit base with the run's adapter (or adapter_dir)."""
    from peft import PeftModel

    from .model import load_base_model, load_tokenizer

    adapter_dir = Path(adapter_dir or run.adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise LabError(f"no adapter in {run.display(adapter_dir)} — run 02_train first")
    tok = load_tokenizer(run.cfg)
    base = load_base_model(run.cfg)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, tok


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def assistant_loss(model, dataset, batch_size: int = 16, pad_id: int = 0) -> float:
    """Return the mean cross-entropy over assistant tokens (the trained tokens) of a processed split."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows = list(zip(dataset["input_ids"], dataset["assistant_masks"]))
    with torch.no_grad():
        for batch in _batches(rows, batch_size):
            n = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), n), -100, dtype=torch.long)
            attn = torch.zeros((len(batch), n), dtype=torch.long)
            for i, (x, m) in enumerate(batch):
                ids[i, : len(x)] = torch.tensor(x)
                attn[i, : len(x)] = 1
                labels[i, : len(x)] = torch.where(torch.tensor(m) == 1, torch.tensor(x), torch.tensor(-100))
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1).to(device)
            loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Return (the conversation up to its last assistant turn, that turn's text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Return greedy completions (assistant text only) for chat prompts, batched with left padding."""
    import torch

    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for batch in _batches(prompts, batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            outs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
    return outs


def _metric_kind(cfg: dict, references: list[str]) -> str:
    kind = cfg.get("eval", {}).get("metric", "auto")
    if kind != "auto":
        return kind
    return "price" if references and all(parse_price(r) is not None for r in references) else "exact_match"


def task_metrics(predictions: list[str], references: list[str], kind: str = "price", pattern: str | None = None) -> dict:
    """Return the task metric for predictions vs references (see the module docstring for the kinds)."""
    n = len(references)
    if n == 0:
        return {}
    if kind == "price":
        errs, parsed = [], 0
        for p, r in zip(predictions, references):
            pv, rv = parse_price(p), parse_price(r)
            if rv is None:
                continue
            if pv is None:
                errs.append(abs(rv))  # an unparsable answer counts as predicting $0
            else:
                parsed += 1
                errs.append(abs(pv - rv))
        return {"price_mae": sum(errs) / len(errs) if errs else math.nan, "price_parsed": parsed / n}
    if kind == "exact_match":
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        return {"exact_match": hits / n}
    if kind == "regex":
        if not pattern:
            raise LabError("eval.metric is 'regex' but eval.metric_pattern is empty — e.g. 'Answer: (\\w+)'")
        rx = re.compile(pattern)
        hits, found = 0, 0
        for p, r in zip(predictions, references):
            mp, mr = rx.search(p), rx.search(r)
            if mp:
                found += 1
            if mp and mr and mp.group(1).strip() == mr.group(1).strip():
                hits += 1
        return {"regex_match": hits / n, "regex_found": found / n}
    raise LabError(f"eval.metric must be auto, price, exact_match or regex, got {kind!r}")


def evaluate_run(run, *, max_rows: int | None = 200) -> dict[str, Any]:
    """Return (and save to eval/metrics.json) base vs tuned loss, perplexity and task metric on validation."""
    from .data import load_prepared

    ds = load_prepared(run)["validation"]
    if max_rows:
        ds = ds.select(range(min(max_rows, len(ds))))
    model, tok = load_tuned(run)
    cfg = run.cfg
    prompts, refs = zip(*[prompt_and_reference(m) for m in ds["messages"]])
    kind = _metric_kind(cfg, list(refs))
    max_new = int(cfg.get("eval", {}).get("max_new_tokens", 16))
    results: dict[str, Any] = {}
    gens: dict[str, list[str]] = {}
    for name in ("base", "tuned"):
        if name == "base":
            with model.disable_adapter():
                loss = assistant_loss(model, ds, pad_id=tok.pad_token_id)
                preds = generate(model, tok, list(prompts), max_new)
        else:
            loss = assistant_loss(model, ds, pad_id=tok.pad_token_id)
            preds = generate(model, tok, list(prompts), max_new)
        gens[name] = preds
        results[name] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50)),
            **task_metrics(preds, list(refs), kind, cfg.get("eval", {}).get("metric_pattern")),
        }
    results["metric"] = kind
    results["rows"] = len(ds)
    out = run.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "generations.jsonl.tmp", "w") as f:
        for p, r, b, t in zip(prompts, refs, gens["base"], gens["tuned"]):
            f.write(json.dumps({"prompt": p[-1]["content"], "reference": r, "base": b, "tuned": t}) + "\n")
    os.replace(out / "generations.jsonl.tmp", out / "generations.jsonl")
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "metrics.json")
    return results
