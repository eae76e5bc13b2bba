"""Evaluation that answers "did it work?": base vs tuned on held-out rows, every checkpoint, saved to eval/.

What `evaluate_run` measures, on one seeded sample of the validation split (the same tokens for all):
- `loss` (mean cross-entropy over assistant tokens, the tokens training learned) and `perplexity`
  (exp of it), for the base model (the same loaded model with its adapter switched off) and the
  tuned adapter;
- the same loss for every kept checkpoint (each adapter loaded onto the one 4-bit base with peft's
  `load_adapter` / `set_adapter`, never a second base), so the best checkpoint is known;
- a task metric on greedy answers (see METRICS), chosen by `eval.metric`;
- the same task metric for a naive baseline: one constant answer taken from the training split (the
  median for price/number, the most frequent answer for exact_match/regex). The verdict calls the
  tuned model better only by more than `tie_margin` (2 paired standard errors, at least 1 %).

Resumable: each finished part (a loss, a set of answers) is cached in eval/cache/ under a key made
of the adapter's file hash and the validation sample's fingerprint. A re-run after a disconnect
says "Reusing ..." once and computes only what is missing; when everything is cached no model is
loaded at all. Task metrics are recomputed from the cached answers, so changing `eval.metric`
costs nothing.

eval/metrics.json (contract):
    {"base": {"loss", "perplexity", <task metrics>}, "tuned": {...},
     "best": {...} (only when the best checkpoint is not the final adapter),
     "baseline": {"answer", "train_rows", <task metrics>, "margin": {"tuned": {key: m}, "best": {...}}},
     "best_checkpoint": "checkpoint-N", "checkpoints": [{"name", "step", "loss"}, ...],
     "metric": kind, "rows": n, "tokens": assistant tokens scored, ...}
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import tmp_path
from .embedded import parse_price
from .errors import LabError

__all__ = [
    "METRICS",
    "EVAL_VERSION",
    "load_tuned",
    "assistant_loss",
    "generate",
    "parse_number",
    "normalize_answer",
    "task_metrics",
    "metric_kind",
    "lower_is_better",
    "primary_keys",
    "constant_answer",
    "row_scores",
    "tie_margin",
    "beats_baseline",
    "baseline_scores",
    "train_references",
    "prompt_and_reference",
    "eval_sample",
    "validation_sample",
    "loss_note",
    "adapter_hash",
    "evaluate_run",
    "metrics_table",
    "verdict",
    "generations_table",
    "export_adapter_source",
    "parse_tool_calls",
]

EVAL_VERSION = "2"  # bump when a cached part would now be computed differently

# eval.metric → what it measures (the keys it writes). Lower is better for *_mae, higher for the rest.
METRICS = {
    "price": "price_mae: mean absolute error of the first $ amount (an answer without one counts as $0); "
    "price_parsed: share of answers that hold a $ amount",
    "number": "number_mae: mean absolute error of the first number (or eval.metric_pattern's group 1) "
    "(an answer without one counts as 0); number_parsed: share of answers that hold one",
    "exact_match": "exact_match: share of answers equal to the reference, ignoring case, repeated spaces "
    "and a final . or !",
    "regex": "regex_match: share whose eval.metric_pattern match (group 1, else the whole match) equals the "
    "reference's; regex_found: share of answers where the pattern matches at all",
    "tool_call": "tool_call_match: share of answers that call the reference's functions with its arguments "
    "(names and parsed JSON arguments equal); tool_call_parsed: share of answers that hold a call",
    "overlap": "token_f1 and rouge_l: word overlap with the reference (free-form answers; read the generations "
    "side by side too)",
    "auto": "price when every reference holds a $ amount, number when every reference is a bare number, "
    "tool_call when every reference is a tool call, exact_match when every reference is short (≤ 5 words: "
    "labels, names), else overlap",
}
_NUMBER_RE = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_BARE_NUMBER_RE = re.compile(r"^\s*[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)\s*$")
# Files of a Trainer checkpoint that are training state, not part of the adapter.
TRAINING_STATE_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
    "lab_manifest.json",
)


# ---------------------------------------------------------------------------------------------- task metrics


def parse_number(text: str, pattern: str | None = None) -> float | None:
    """Return the first number in text (or in `pattern`'s group 1 / whole match), commas dropped; None if none."""
    if pattern:
        m = re.search(pattern, text)
        if not m:
            return None
        text = m.group(1) if m.re.groups else m.group(0)
    m = _NUMBER_RE.search(text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def normalize_answer(text: str) -> str:
    """Return text casefolded, whitespace collapsed and a final '.' or '!' dropped (for exact_match)."""
    return " ".join(text.casefold().split()).rstrip(".!").rstrip()


def parse_tool_calls(text: str) -> list[dict] | None:
    """Return the function calls in text as [{'name', 'arguments': dict}] (JSON objects with a name and
    arguments/parameters, e.g. inside <tool_call> tags), or None when it holds none."""
    decoder, calls, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(args, dict):
            calls.append({"name": obj["name"], "arguments": args})
            i = text.find("{", end)
        else:
            i = text.find("{", i + 1)
    return calls or None


def _check_pattern(pattern: str | None, kind: str) -> re.Pattern | None:
    if not pattern:
        if kind == "regex":
            raise LabError(
                "eval.metric is 'regex' but eval.metric_pattern is empty — set it to a pattern with one group, "
                "e.g. 'Answer: (\\w+)'"
            )
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise LabError(f"eval.metric_pattern {pattern!r} is not a valid regular expression ({e}) — fix the pattern") from None


def _mae(predictions: list[str], references: list[str], parse: Callable[[str], float | None], prefix: str) -> dict:
    errs, parsed = [], 0
    for p, r in zip(predictions, references, strict=True):
        rv = parse(r)
        if rv is None:
            continue  # a reference without a value cannot be scored
        pv = parse(p)
        if pv is not None:
            parsed += 1
        errs.append(abs((pv if pv is not None else 0.0) - rv))
    n = len(errs)
    return {f"{prefix}_mae": sum(errs) / n if n else math.nan, f"{prefix}_parsed": parsed / n if n else math.nan}


def task_metrics(predictions: list[str], references: list[str], kind: str = "price", pattern: str | None = None) -> dict:
    """Return the task metric of predictions vs references as {name: value} (kinds: see METRICS)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {}
    if kind == "price":
        return _mae(predictions, references, parse_price, "price")
    if kind == "number":
        rx = _check_pattern(pattern, kind)
        return _mae(predictions, references, lambda t: parse_number(t, rx.pattern if rx else None), "number")
    if kind == "overlap":
        from .overlap import overlap_scores

        return overlap_scores(predictions, references)
    if kind == "exact_match":
        hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
        return {"exact_match": hits / len(references)}
    if kind == "tool_call":
        hits = parsed = n = 0
        for p, r in zip(predictions, references, strict=True):
            want = parse_tool_calls(r)
            if want is None:
                continue  # a reference that calls nothing cannot be scored
            got = parse_tool_calls(p)
            n, parsed, hits = n + 1, parsed + (got is not None), hits + (got == want)
        return {"tool_call_match": hits / n if n else math.nan, "tool_call_parsed": parsed / n if n else math.nan}
    if kind == "regex":
        rx = _check_pattern(pattern, kind)

        def pick(m: re.Match) -> str:
            return (m.group(1) if rx.groups else m.group(0)).strip()

        hits = found = 0
        for p, r in zip(predictions, references, strict=True):
            mp, mr = rx.search(p), rx.search(r)
            found += mp is not None
            hits += bool(mp and mr and pick(mp) == pick(mr))
        return {"regex_match": hits / len(references), "regex_found": found / len(references)}
    raise LabError(f"eval.metric must be one of {', '.join(METRICS)}, got {kind!r} — e.g. auto")


def metric_kind(cfg: dict, references: list[str]) -> str:
    """Return the metric kind to use: eval.metric, or for 'auto' the one that fits the references."""
    kind = cfg.get("eval", {}).get("metric") or "auto"
    if kind not in METRICS:
        raise LabError(f"eval.metric must be one of {', '.join(METRICS)}, got {kind!r} — e.g. auto")
    if kind != "auto":
        return kind
    if references and all(parse_price(r) is not None for r in references):
        return "price"
    if references and all(_BARE_NUMBER_RE.match(r) for r in references):
        return "number"
    if references and all(parse_tool_calls(r) for r in references):
        return "tool_call"
    from .overlap import closed_answers

    return "exact_match" if closed_answers(references) or not references else "overlap"


def lower_is_better(name: str) -> bool:
    """Return True for metrics where smaller is better (loss, eval_loss, perplexity, *_mae, *_error)."""
    return name in ("loss", "perplexity") or name.endswith(("_loss", "_mae", "_error"))


# ---------------------------------------------------------------------------------------------- naive baseline

# A model "beats" the constant guess only by more than this many paired standard errors (see tie_margin).
TIE_STANDARD_ERRORS = 2.0
# ... and by more than this share of the baseline's own score, so near-identical answers stay a tie.
TIE_RELATIVE_FLOOR = 0.01
_AUX_SUFFIXES = ("_parsed", "_found")  # how often an answer parsed: a constant answer always does


def primary_keys(keys: list[str]) -> list[str]:
    """Return the task metrics that score answers (not the share that merely parsed)."""
    return [k for k in keys if k not in ("loss", "perplexity") and not k.endswith(_AUX_SUFFIXES)]


def _median_low(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def constant_answer(train_refs: list[str], kind: str, pattern: str | None = None) -> str | None:
    """Return the naive baseline's one answer, a training reference: the median value (price, number) or the most frequent answer."""
    if not train_refs:
        return None
    if kind in ("price", "number"):
        rx = _check_pattern(pattern, kind) if kind == "number" else None
        parse = parse_price if kind == "price" else (lambda t: parse_number(t, rx.pattern if rx else None))
        valued = [(v, r) for r in train_refs if (v := parse(r)) is not None]
        if not valued:
            return None
        median = _median_low([v for v, _ in valued])  # a real value: any value between the middle two minimises MAE
        return next(r for v, r in valued if v == median)
    if kind == "regex":
        rx = _check_pattern(pattern, kind)
        found = [(m.group(1) if rx.groups else m.group(0)).strip() for r in train_refs if (m := rx.search(r))]
        if not found:
            return None
        top = max(set(found), key=lambda a: (found.count(a), a))
        return next(r for r in train_refs if (m := rx.search(r)) and (m.group(1) if rx.groups else m.group(0)).strip() == top)
    keyed = [normalize_answer(r) for r in train_refs]
    top = max(set(keyed), key=lambda a: (keyed.count(a), a))
    return train_refs[keyed.index(top)]


def row_scores(
    preds: list[str], refs: list[str], kind: str, pattern: str | None = None, metric: Callable | None = None
) -> dict[str, list[float]]:
    """Return each task metric row by row ({key: [value per row]}, NaN where a row cannot be scored)."""
    out: dict[str, list[float]] = {}
    for p, r in zip(preds, refs, strict=True):
        one = task_metrics([p], [r], kind, pattern)
        if metric is not None:
            try:
                one.update({str(k): float(v) for k, v in metric([p], [r]).items()})
            except Exception:  # a corpus-level metric has no per-row value: its margin is the floor alone
                pass
        for k, v in one.items():
            out.setdefault(k, []).append(float(v))
    return out


def tie_margin(model_rows: list[float], baseline_rows: list[float], baseline_value: float) -> float:
    """Return how far past the baseline a model must score to count as better (the tie margin).

    max(TIE_STANDARD_ERRORS × the standard error of the row-by-row difference, TIE_RELATIVE_FLOOR ×
    |baseline|): a smaller difference is within what another sample of validation rows could show
    by chance (about 95 % one-sided at 2 SE), and the floor keeps answers that agree almost
    everywhere (standard error near 0) or differ only by rounding a tie. Fewer than two scored rows: infinite.
    """
    diffs = [m - b for m, b in zip(model_rows, baseline_rows, strict=True) if not (math.isnan(m) or math.isnan(b))]
    floor = TIE_RELATIVE_FLOOR * abs(baseline_value) if not math.isnan(baseline_value) else 0.0
    if len(diffs) < 2:
        return math.inf
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return max(TIE_STANDARD_ERRORS * sd / math.sqrt(len(diffs)), floor)


def beats_baseline(key: str, value: Any, baseline: Any, margin: Any) -> bool:
    """Return True only when value is better than baseline by more than margin, in the metric's direction."""
    if not all(isinstance(v, (int, float)) and not math.isnan(v) for v in (value, baseline, margin)):
        return False
    gain = baseline - value if lower_is_better(key) else value - baseline
    return gain > max(margin, 1e-12)


def baseline_scores(
    train_refs: list[str],
    refs: list[str],
    kind: str,
    pattern: str | None = None,
    models: dict[str, list[str]] | None = None,
    metric: Callable | None = None,
) -> dict[str, Any] | None:
    """Return the naive baseline's entry for metrics.json: its answer, its task metrics on refs, and each model's tie margin."""
    answer = constant_answer(train_refs, kind, pattern)
    if answer is None:
        return None
    const = [answer] * len(refs)
    task = task_metrics(const, refs, kind, pattern)
    if metric is not None:
        task.update({str(k): float(v) for k, v in metric(const, refs).items()})
    base_rows = row_scores(const, refs, kind, pattern, metric)
    margins: dict[str, dict[str, float]] = {}
    for name, preds in (models or {}).items():
        rows = row_scores(preds, refs, kind, pattern, metric)
        margins[name] = {
            k: tie_margin(rows[k], base_rows[k], task[k]) if k in rows and k in base_rows
            else TIE_RELATIVE_FLOOR * abs(task[k])
            for k in primary_keys(list(task))
        }
    return {"answer": answer, "train_rows": len(train_refs), **task, "margin": margins}


# ---------------------------------------------------------------------------------------------- model work


def load_tuned(run, adapter_dir: Path | None = None):
    """Return (PeftModel in eval mode, tokenizer): the 4-bit base with the run's adapter (or adapter_dir) as 'default'."""
    from peft import PeftModel

    from .model import load_base_model, load_tokenizer

    adapter_dir = Path(adapter_dir or run.adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise LabError(f"no adapter in {run.display(adapter_dir)} — run 02_train to the end first")
    tok = load_tokenizer(run.cfg)
    base = load_base_model(run.cfg)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, tok


def _device(model):
    return next(model.parameters()).device


def _loss_sum(model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, max_batch_tokens: int):
    """Return (summed cross-entropy, token count) over the masked tokens of rows, batched by length."""
    import torch

    device = _device(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    total, count = 0.0, 0
    i = 0
    with torch.no_grad():
        while i < len(order):
            batch = [order[i]]
            i += 1
            # rows are sorted by length, so the newest row sets the padded width
            while i < len(order) and len(batch) < batch_size and (len(batch) + 1) * len(rows[order[i]][0]) <= max_batch_tokens:
                batch.append(order[i])
                i += 1
            n = max(len(rows[j][0]) for j in batch)
            ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), n), dtype=torch.long)
            labels = torch.full((len(batch), n), -100, dtype=torch.long)
            for k, j in enumerate(batch):
                x, m = torch.tensor(rows[j][0]), torch.tensor(rows[j][1])
                ids[k, : len(x)] = x
                attn[k, : len(x)] = 1
                labels[k, : len(x)] = torch.where(m == 1, x, torch.tensor(-100))
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            target = labels[:, 1:].to(logits.device)
            r, c = (target != -100).nonzero(as_tuple=True)
            # only the scored positions go to float32: a (batch, length, vocab) float copy is GBs on a big vocab
            picked = logits[:, :-1][r, c].float()
            total += float(torch.nn.functional.cross_entropy(picked, target[r, c], reduction="sum"))
            count += int(r.numel())
            del logits
    return total, count


def assistant_loss(model, dataset, batch_size: int = 16, pad_id: int = 0, max_batch_tokens: int = 4096) -> float:
    """Return the mean cross-entropy over assistant tokens (the trained tokens) of a processed split."""
    rows = list(zip(dataset["input_ids"], dataset["assistant_masks"], strict=True))
    total, count = _loss_sum(model, rows, pad_id, batch_size, max_batch_tokens)
    return total / max(count, 1)


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Return (the conversation up to its last assistant turn, that turn's text; a tool call as JSON lines)."""
    from .chat import call_text, from_record

    messages = from_record(messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = messages[last]
    if answer.get("tool_calls"):
        return messages[:last], "\n".join(filter(None, [answer["content"], call_text(answer["tool_calls"])]))
    return messages[:last], answer["content"]


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Return the token ids that end an answer: eos (tokenizer and generation config) and the template's end of turn."""
    ids: list[int] = []

    def add(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(tokenizer.eos_token_id)
    try:
        from .chat import _end_of_turn

        for text in _end_of_turn(tokenizer):
            enc = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                add(enc[0])
    except Exception:  # a template the probe cannot render: eos alone ends answers
        pass
    return ids


def _clean(text: str, tokenizer) -> str:
    """Return a decoded answer cut at the template's end-of-turn text (when it is not a special token)."""
    try:
        from .chat import _end_of_turn

        for marker in _end_of_turn(tokenizer):
            if marker and marker.strip() and marker.strip() in text:
                text = text[: text.index(marker.strip())]
    except Exception:
        pass
    return text.strip()


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """Return the chat template applied to messages (and tools) with the assistant's generation prompt appended."""
    from .chat import template_messages

    messages = template_messages(tokenizer, messages)
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    tools: list[list[dict] | None] | None = None,
) -> list[str]:
    """Return greedy completions (assistant text only) for chat prompts, batched by length with left padding.

    tools: each prompt's tool list (None: no tools), rendered by the chat template as in training.
    """
    import torch

    device = _device(model)
    stop = stop_token_ids(tokenizer, model)
    texts = [render_prompt(tokenizer, p, tools[i] if tools else None) for i, p in enumerate(prompts)]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outs: list[str] = [""] * len(texts)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop or None,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, t in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                outs[i] = _clean(t, tokenizer)
    finally:
        tokenizer.padding_side = old_side
    return outs


# ---------------------------------------------------------------------------------------------- cache


def adapter_hash(folder: Path) -> str:
    """Return a short sha256 of an adapter folder's weights and config (what decides its outputs)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = Path(folder) / name
        if p.is_file():
            h.update(name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def eval_sample(n_rows: int, max_rows: int | None, seed: int) -> list[int]:
    """Return the sorted row indices evaluated: all rows, or a seeded sample of max_rows of them."""
    if not max_rows or max_rows >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), int(max_rows)))


def validation_sample(cfg: dict, val):
    """Return the validation rows that are scored (03 and the loss during training alike): eval.rows of them, seeded."""
    rows = cfg.get("eval", {}).get("rows")
    idx = eval_sample(len(val), rows, int(cfg.get("data", {}).get("seed", 42)))
    return val if len(idx) == len(val) else val.select(idx)


def loss_note(run, metrics: dict) -> str | None:
    """Return one sentence relating 03's tuned loss to the trainer's last eval_loss (why they differ), or None."""
    try:
        history = json.loads((run.dir / "log_history.json").read_text())
    except (OSError, ValueError):
        return None
    evals = [h for h in history if "eval_loss" in h and "step" in h]
    if not evals or "tuned" not in metrics:
        return None
    last, ours = evals[-1], float(metrics["tuned"]["loss"])
    steps = [h["step"] for h in history if "step" in h]
    final = max(steps) if steps else last["step"]
    gap = abs(float(last["eval_loss"]) - ours) / max(ours, 1e-9)
    why = ("the trainer averages per-batch means (rows with long answers weigh less), 03 takes one mean over "
           f"all {metrics.get('tokens', '?')} answer tokens of the same {metrics.get('rows', '?')} rows")
    if last["step"] != final:
        why += f", and the trainer's was measured at step {last['step']}, before the final step {final}"
    agree = "agrees with" if gap < 0.005 else f"differs by {gap:.1%} from"
    return (f"Validation loss: 03's {ours:.4f} for the final adapter {agree} the trainer's eval_loss "
            f"{float(last['eval_loss']):.4f} (step {last['step']}) — {why}.")


BASELINE_TRAIN_ROWS = 20_000  # a seeded sample this large pins a median or a most frequent answer


def train_references(train, seed: int) -> list[str]:
    """Return the last assistant answers of (a seeded sample of) the training split: the baseline's source."""
    if train is None or len(train) == 0 or "messages" not in train.column_names:
        return []
    picked = train.select(eval_sample(len(train), BASELINE_TRAIN_ROWS, seed))
    return [prompt_and_reference(m)[1] for m in picked["messages"]]


def _validation_fingerprint(ds, cfg: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg["model"]["name"], cfg["model"].get("load_in_4bit", True), cfg["model"].get("revision"),
                         EVAL_VERSION]).encode())
    for ids, mask in zip(ds["input_ids"], ds["assistant_masks"], strict=True):
        h.update(json.dumps([ids, mask]).encode())
    return h.hexdigest()[:16]


class _Parts:
    """Finished parts of an evaluation, one small JSON file each in eval/cache/, keyed by what decides them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.reused: list[str] = []
        self.computed: list[str] = []
        self.seconds: dict[str, float] = {}

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def has(self, key: str) -> bool:
        try:
            json.loads(self.path(key).read_text())
            return True
        except (OSError, ValueError):
            return False

    def get(self, key: str, label: str, compute: Callable[[], Any]) -> Any:
        """Return the cached value of a part (noting the reuse), or compute, store and return it."""
        try:
            value = json.loads(self.path(key).read_text())["value"]
            if label not in self.reused:
                self.reused.append(label)
            return value
        except (OSError, ValueError, KeyError):
            pass
        t0 = time.monotonic()
        value = compute()
        self.seconds[label] = time.monotonic() - t0
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(self.path(key))
        tmp.write_text(json.dumps({"label": label, "value": value}))
        os.replace(tmp, self.path(key))
        self.computed.append(label)
        return value


# ---------------------------------------------------------------------------------------------- the run


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _scores(loss: dict, preds: list[str], refs: list[str], kind: str, pattern: str | None, metric) -> dict:
    out = {"loss": loss["loss"], "perplexity": math.exp(min(loss["loss"], 50.0))}
    out.update(task_metrics(preds, refs, kind, pattern))
    if metric is not None:
        out.update({str(k): float(v) for k, v in metric(preds, refs).items()})
    return out


def evaluate_run(
    run,
    *,
    max_rows: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int = 4096,
    metric: Callable[[list[str], list[str]], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Return (and save to eval/) base vs tuned loss, perplexity and task metric, plus every checkpoint's loss.

    max_rows: validation rows evaluated (a seeded sample); None: eval.rows (null there = all). batch_size / max_batch_tokens:
    rows and padded tokens per forward pass (lower them on an out-of-memory error). metric: an
    extra task metric, a function (predictions, references) → {name: value} (names ending in _mae
    or _error are lower-is-better).
    """
    from .checkpoints import scan_checkpoints
    from .data import load_prepared

    cfg = run.cfg
    ev = cfg.get("eval", {})
    pattern = ev.get("metric_pattern")
    max_new = int(ev.get("max_new_tokens", 16))
    seed = int(cfg.get("data", {}).get("seed", 42))
    metric_kind(cfg, [])  # an unknown eval.metric fails here, before any loading
    if ev.get("metric") in ("regex", "number"):
        _check_pattern(pattern, ev["metric"])
    if not (run.adapter_dir / "adapter_config.json").exists():
        raise LabError(f"no adapter in {run.display(run.adapter_dir)} — run 02_train to the end first")

    prepared = load_prepared(run)
    val = prepared["validation"]
    if len(val) == 0:
        raise LabError("the validation split is empty — raise data.val_fraction and run 01_data again")
    rows_idx = eval_sample(len(val), ev.get("rows") if max_rows is None else max_rows, seed)  # = validation_sample
    ds = val.select(rows_idx)
    fp = _validation_fingerprint(ds, cfg)
    prompts, refs = map(list, zip(*[prompt_and_reference(m) for m in ds["messages"]], strict=True))
    kind = metric_kind(cfg, refs)
    tools = [json.loads(t) if t else None for t in ds["tools"]] if "tools" in ds.column_names else None
    rows = list(zip(ds["input_ids"], ds["assistant_masks"], strict=True))
    if kind == "tool_call" and (need := max(_last_answer_tokens(m) for _, m in rows)) > max_new:
        print(f"Tool calls need up to {need} new tokens: generating up to {need} (eval.max_new_tokens is {max_new})")
        max_new = need
    sample = f"{len(ds)} of {len(val)} validation rows" if len(ds) < len(val) else f"all {len(ds)} validation rows"
    print(f"Evaluating on {sample} (seed {seed}); task metric: {kind}")

    tuned_hash = adapter_hash(run.adapter_dir)
    checkpoints = [(step, p, adapter_hash(p)) for step, p in scan_checkpoints(run.checkpoints_dir)[0]]
    if ev.get("checkpoints", "all") == "none":  # base and final only: each checkpoint costs one more loss pass
        checkpoints = [c for c in checkpoints if c[2] == tuned_hash]
    parts = _Parts(run.eval_dir / "cache")

    def loss_key(h: str) -> str:
        return f"loss-{h}-{fp}"

    def gen_key(h: str) -> str:
        return f"answers-{h}-{fp}-{max_new}"

    planned = [("base loss", loss_key("base")), ("tuned loss", loss_key(tuned_hash))]
    planned += [(f"{p.name} loss", loss_key(h)) for _, p, h in checkpoints if h != tuned_hash]
    planned += [("base answers", gen_key("base")), ("tuned answers", gen_key(tuned_hash))]
    n_loss = len(planned) - 2
    print(f"Work: {n_loss} loss passes and 2 generation passes (≤ {max_new} new tokens) over {len(ds)} rows, plus "
          "the best checkpoint's answers if it is not the final adapter — bounded by eval.rows, eval.max_new_tokens "
          "and eval.checkpoints (all | none)")
    cached = [label for label, key in planned if parts.has(key)]
    if cached:
        print(f"Reusing {len(cached)} of {len(planned)} finished parts from {run.display(parts.folder)}: {', '.join(cached)}")

    loaded: dict[str, Any] = {}

    def model():
        if "model" not in loaded:
            loaded["model"], loaded["tok"] = load_tuned(run)
        return loaded["model"]

    def pad_id() -> int:
        model()
        return loaded["tok"].pad_token_id

    def measure_loss(label: str, adapter: str | None):
        def compute():
            print(f"Measuring {label} …", flush=True)
            m = model()
            if adapter is None:
                with m.disable_adapter():
                    total, count = _loss_sum(m, rows, pad_id(), batch_size, max_batch_tokens)
            else:
                m.set_adapter(adapter, inference_mode=True)
                total, count = _loss_sum(m, rows, pad_id(), batch_size, max_batch_tokens)
            return {"loss": total / max(count, 1), "tokens": count}

        return compute

    def answers(label: str, adapter: str | None):
        def compute():
            print(f"Generating {label} ({len(prompts)} prompts, greedy, ≤ {max_new} new tokens) …", flush=True)
            m = model()
            if adapter is None:
                with m.disable_adapter():
                    return generate(m, loaded["tok"], prompts, max_new, batch_size, seed, tools)
            m.set_adapter(adapter, inference_mode=True)
            return generate(m, loaded["tok"], prompts, max_new, batch_size, seed, tools)

        return compute

    def with_checkpoint(path: Path, name: str, fn):
        """Run fn with the checkpoint's adapter loaded next to 'default' on the same base, then unload it."""

        def compute():
            m = model()
            m.load_adapter(str(path), adapter_name=name, is_trainable=False)
            try:
                return fn()
            finally:
                m.set_adapter("default", inference_mode=True)
                m.delete_adapter(name)

        return compute

    base_loss = parts.get(loss_key("base"), "base loss", measure_loss("base loss", None))
    tuned_loss = parts.get(loss_key(tuned_hash), "tuned loss", measure_loss("tuned loss", "default"))
    losses = {tuned_hash: tuned_loss}
    curve = []
    for step, path, h in checkpoints:
        if h == tuned_hash:
            loss = tuned_loss  # the final adapter is this checkpoint's weights
        else:
            name = f"ckpt_{step}"
            label = f"{path.name} loss"
            loss = parts.get(loss_key(h), label, with_checkpoint(path, name, measure_loss(label, name)))
            losses[h] = loss
        curve.append({"name": path.name, "step": step, "loss": loss["loss"], "same_as_final": h == tuned_hash})
    best = min(curve, key=lambda c: (c["loss"], -c["step"])) if curve else None

    base_preds = parts.get(gen_key("base"), "base answers", answers("base answers", None))
    tuned_preds = parts.get(gen_key(tuned_hash), "tuned answers", answers("tuned answers", "default"))
    results: dict[str, Any] = {
        "base": _scores(base_loss, base_preds, refs, kind, pattern, metric),
        "tuned": _scores(tuned_loss, tuned_preds, refs, kind, pattern, metric),
    }
    best_preds = None
    if best and not best["same_as_final"]:
        step, path, h = next(c for c in checkpoints if c[1].name == best["name"])
        label = f"{path.name} answers"
        best_preds = parts.get(gen_key(h), label, with_checkpoint(path, "best", answers(label, "best")))
        results["best"] = _scores(losses[h], best_preds, refs, kind, pattern, metric)
    models = {"tuned": tuned_preds, **({"best": best_preds} if best_preds is not None else {})}
    baseline = baseline_scores(train_references(prepared.get("train"), seed), refs, kind, pattern, models, metric)
    if baseline is not None:
        results["baseline"] = baseline
    if loaded:
        loaded.clear()  # the model's last reference: give its (GPU) memory back before the chat loads one
        _free_memory()

    results.update(
        {
            "best_checkpoint": best["name"] if best else None,
            "checkpoints": [{k: c[k] for k in ("name", "step", "loss")} for c in curve],
            "metric": kind,
            "metric_pattern": pattern if kind in ("regex", "number") else None,
            "rows": len(ds),
            "tokens": tuned_loss["tokens"],
            "validation_rows": len(val),
            "validation_fingerprint": fp,
            "tuned_adapter_hash": tuned_hash,
            "parts": {"reused": parts.reused, "computed": parts.computed},
        }
    )
    with_best = best_preds is not None
    lines = []
    for k, (i, p, r) in enumerate(zip(rows_idx, prompts, refs, strict=True)):
        row = {"row": i, "prompt": p[-1]["content"] if p else "", "reference": r,
               "base": base_preds[k], "tuned": tuned_preds[k]}
        if with_best:
            row["best"] = best_preds[k]
        if kind == "tool_call":  # a call is shown as the structured call it makes, text that calls nothing as is
            row.update({c: _shown_call(row[c]) for c in ("reference", "base", "tuned", "best") if c in row})
        lines.append(json.dumps(row, ensure_ascii=False))
    run.eval_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(run.eval_dir / "generations.jsonl")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, run.eval_dir / "generations.jsonl")
    results["seconds"] = {k: round(v, 1) for k, v in parts.seconds.items()}
    _write_json(run.eval_dir / "metrics.json", results)
    print(f"Saved metrics → {run.display(run.eval_dir / 'metrics.json')}")
    if parts.seconds:
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in parts.seconds.items())
        print(f"Evaluation took {sum(parts.seconds.values()):.0f} s ({spent})")
    return results


# ---------------------------------------------------------------------------------------------- showing results


def _last_answer_tokens(mask: list[int]) -> int:
    """Return the length of the last run of assistant tokens in a mask (the reference answer and its end of turn)."""
    n = 0
    for bit in reversed(mask):
        if bit:
            n += 1
        elif n:
            break
    return n


def _shown_call(text: str) -> Any:
    """Return the call(s) text makes as {'name', 'arguments'} (a list when several), else the text itself."""
    calls = parse_tool_calls(text)
    return text if calls is None else calls[0] if len(calls) == 1 else calls


def _task_keys(metrics: dict) -> list[str]:
    return [k for k, v in metrics["base"].items() if k not in ("loss", "perplexity") and isinstance(v, (int, float))]


def metrics_table(metrics: dict) -> list[dict[str, Any]]:
    """Return rows (metric, constant guess, base, tuned[, best], tuned better?, beats the guess?) on every measured number."""
    cols = [c for c in ("baseline", "base", "tuned", "best") if c in metrics]
    baseline = metrics.get("baseline")
    rows = []
    for key in ["loss", "perplexity", *_task_keys(metrics)]:
        row: dict[str, Any] = {"metric": key + (" (lower is better)" if lower_is_better(key) else " (higher is better)")}
        for c in cols:  # a constant answer has no loss: "n/a" rather than None
            row["constant guess" if c == "baseline" else c] = metrics[c].get(key, "n/a" if c == "baseline" else None)
        b, t = metrics["base"].get(key), metrics["tuned"].get(key)
        row["tuned better?"] = _better(key, t, b)
        if baseline is not None:
            row["beats the guess?"] = _vs_baseline(metrics, key)
        rows.append(row)
    return rows


def _better(key: str, tuned: Any, base: Any) -> str:
    if not all(isinstance(v, (int, float)) and not math.isnan(v) for v in (tuned, base)):
        return "n/a"
    if tuned == base:
        return "same"
    return "yes" if (tuned < base) == lower_is_better(key) else "no"


def _margin(metrics: dict, key: str, col: str = "tuned") -> float | None:
    return (metrics.get("baseline") or {}).get("margin", {}).get(col, {}).get(key)


def _vs_baseline(metrics: dict, key: str, col: str = "tuned") -> str:
    """Return 'yes (by X)', 'tie (within ±m)' or 'no' for the tuned model against the constant guess; 'n/a' when unscored."""
    b, t, m = metrics["baseline"].get(key), metrics[col].get(key), _margin(metrics, key, col)
    if key not in primary_keys([key]) or not all(isinstance(v, (int, float)) for v in (b, t, m)):
        return "n/a"
    if beats_baseline(key, t, b, m):
        return f"yes (by {abs(b - t):.3g})"
    worse = (t - b if lower_is_better(key) else b - t) > m
    return "no (worse)" if worse else f"tie (within ±{m:.2g})"


def _baseline_parts(metrics: dict) -> tuple[list[str], list[bool]]:
    """Return the verdict's clause per primary task metric against the constant guess, and whether each was beaten."""
    baseline = metrics.get("baseline")
    if not baseline:
        return [], []
    t, answer = metrics["tuned"], baseline.get("answer")
    parts, wins = [], []
    for k in primary_keys(_task_keys(metrics)):
        if not isinstance(baseline.get(k), (int, float)):
            continue
        win = beats_baseline(k, t.get(k), baseline[k], _margin(metrics, k))
        wins.append(win)
        if win:
            parts.append(f"{k} better than a constant guess by {abs(baseline[k] - t[k]):.3g} "
                         f"({t[k]:.3g} vs {baseline[k]:.3g} for always answering {answer!r})")
        else:
            parts.append(f"{k} {t.get(k, math.nan):.3g}: no better than always answering {answer!r} ({baseline[k]:.3g})")
    return parts, wins


def verdict(metrics: dict) -> str:
    """Return one line saying whether the tuned adapter beats the base and a constant guess, with the numbers."""
    b, t = metrics["base"], metrics["tuned"]
    ratio = t["loss"] / b["loss"] if b["loss"] else math.nan
    parts = [f"loss {b['loss']:.3f} → {t['loss']:.3f} ({ratio:.2f}× the base)"]
    parts += [f"{k} {b[k]:.3g} → {t[k]:.3g}" for k in _task_keys(metrics)]
    wins = [_better(k, t.get(k), b.get(k)) == "yes" for k in ["loss", *_task_keys(metrics)]]
    guess_parts, guess_wins = _baseline_parts(metrics)
    answer = (metrics.get("baseline") or {}).get("answer")
    if guess_wins and not any(guess_wins):
        head = (f"It did not learn the task: the tuned adapter is no better than always answering {answer!r}"
                + (" (it beats the base model only)" if any(wins) else ""))
    elif all(wins) and all(guess_wins):
        head = "It worked: the tuned adapter beats the base" + (" and a constant guess" if guess_wins else "")
    elif any(wins) or any(guess_wins):
        head = "Mixed result: the tuned adapter beats the base" + (" or a constant guess" if guess_wins else "") + \
            " on some measures only"
    else:
        head = "It did not work: the tuned adapter does not beat the base"
    best = metrics.get("best_checkpoint")
    tail = f"; best checkpoint by validation loss: {best}" if best else ""
    if "best" in metrics:
        tail += f" (loss {metrics['best']['loss']:.3f}, better than the final adapter; 04_export ships it)"
    return f"{head} — {'; '.join(parts + guess_parts)}{tail}."


def generations_table(run, n: int | None = None) -> list[dict[str, Any]]:
    """Return the first n rows of eval/generations.jsonl (prompt, reference, base, tuned[, best])."""
    path = run.eval_dir / "generations.jsonl"
    if not path.is_file():
        raise LabError(f"no {run.display(path)} yet — run evaluate_run first")
    n = int(n if n is not None else run.cfg.get("eval", {}).get("num_generations", 8))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "row"} for r in rows[:n]]


# ---------------------------------------------------------------------------------------------- which adapter ships


def export_adapter_source(run) -> tuple[Path, str]:
    """Return (adapter folder to export, one-line reason): the best checkpoint from eval/metrics.json unless export.adapter is 'last'."""
    choice = run.cfg.get("export", {}).get("adapter") or "best"
    if choice not in ("best", "last"):
        raise LabError(f"export.adapter must be 'best' or 'last', got {choice!r} — e.g. best")
    final = run.adapter_dir
    if choice == "last":
        return final, "the final adapter (export.adapter: last)"
    path = run.eval_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return final, "the final adapter (no eval/metrics.json: run 03_evaluate to pick the best checkpoint)"
    best = metrics.get("best_checkpoint")
    if not best:
        return final, "the final adapter (no checkpoint was measured)"
    final_hash = adapter_hash(final) if (final / "adapter_config.json").exists() else None
    if final_hash and metrics.get("tuned_adapter_hash") != final_hash:
        return final, "the final adapter (eval/metrics.json is older than it: run 03_evaluate again to pick the best)"
    ckpt = run.checkpoints_dir / best
    if not (ckpt / "adapter_config.json").exists():
        return final, f"the final adapter (the best checkpoint, {best}, is no longer on disk)"
    if final_hash and adapter_hash(ckpt) == final_hash:
        return final, f"the final adapter (it is {best}, the best checkpoint by validation loss)"
    return ckpt, f"{best}, the best checkpoint by validation loss (export.adapter: last would take the final adapter)"
