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

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LabError
from .files import write_json, write_text
from .metrics import (  # noqa: F401 — re-exported: the metric choice, scorers and baseline moved to metrics.py
    METRICS,
    TIE_RELATIVE_FLOOR,
    TIE_STANDARD_ERRORS,
    _check_pattern,
    baseline_scores,
    beats_baseline,
    constant_answer,
    lower_is_better,
    metric_kind,
    normalize_answer,
    parse_number,
    parse_tool_calls,
    primary_keys,
    row_scores,
    task_metrics,
    tie_margin,
)

__all__ = [  # the metric names (metrics.__all__) are importable from here too
    "EVAL_VERSION",
    "load_tuned",
    "assistant_loss",
    "generate",
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
]

EVAL_VERSION = "2"  # bump when a cached part would now be computed differently

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
        write_json(self.path(key), {"label": label, "value": value})
        self.computed.append(label)
        return value


# ---------------------------------------------------------------------------------------------- the run


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj, indent=2, ensure_ascii=False)


def _free_memory() -> None:
    from .hardware import free_memory

    free_memory()


def _scores(loss: dict, preds: list[str], refs: list[str], kind: str, pattern: str | None, metric) -> dict:
    out = {"loss": loss["loss"], "perplexity": math.exp(min(loss["loss"], 50.0))}
    out.update(task_metrics(preds, refs, kind, pattern))
    if metric is not None:
        out.update({str(k): float(v) for k, v in metric(preds, refs).items()})
    return out


@dataclass
class _Sample:
    """The seeded validation sample every model is scored on, and what decides its metric and cache keys."""

    rows_idx: list[int]
    prompts: list[list[dict]]
    refs: list[str]
    tools: list | None
    rows: list[tuple[list[int], list[int]]]  # (input_ids, assistant_masks) per row
    kind: str
    pattern: str | None
    max_new: int
    seed: int
    fp: str  # the validation fingerprint

    def loss_key(self, h: str) -> str:
        return f"loss-{h}-{self.fp}"

    def gen_key(self, h: str) -> str:
        return f"answers-{h}-{self.fp}-{self.max_new}"


def _check_eval_settings(run) -> None:
    """LabError for an unknown eval.metric, a bad metric_pattern or a missing adapter, before any loading."""
    ev = run.cfg.get("eval", {})
    metric_kind(run.cfg, [])  # an unknown eval.metric fails here, before any loading
    if ev.get("metric") in ("regex", "number"):
        _check_pattern(ev.get("metric_pattern"), ev["metric"])
    if not (run.adapter_dir / "adapter_config.json").exists():
        raise LabError(f"no adapter in {run.display(run.adapter_dir)} — run 02_train to the end first")


def _sample(run, val, max_rows: int | None) -> _Sample:
    """Return the seeded sample of the validation split, its metric kind and its generation length."""
    cfg = run.cfg
    ev = cfg.get("eval", {})
    seed = int(cfg.get("data", {}).get("seed", 42))
    max_new = int(ev.get("max_new_tokens", 16))
    if len(val) == 0:
        raise LabError("the validation split is empty — raise data.val_fraction and run 01_data again")
    rows_idx = eval_sample(len(val), ev.get("rows") if max_rows is None else max_rows, seed)  # = validation_sample
    ds = val.select(rows_idx)
    prompts, refs = map(list, zip(*[prompt_and_reference(m) for m in ds["messages"]], strict=True))
    kind = metric_kind(cfg, refs)
    tools = [json.loads(t) if t else None for t in ds["tools"]] if "tools" in ds.column_names else None
    rows = list(zip(ds["input_ids"], ds["assistant_masks"], strict=True))
    if kind == "tool_call" and (need := max(_last_answer_tokens(m) for _, m in rows)) > max_new:
        print(f"Tool calls need up to {need} new tokens: generating up to {need} (eval.max_new_tokens is {max_new})")
        max_new = need
    sample = f"{len(ds)} of {len(val)} validation rows" if len(ds) < len(val) else f"all {len(ds)} validation rows"
    print(f"Evaluating on {sample} (seed {seed}); task metric: {kind}")
    return _Sample(rows_idx, prompts, refs, tools, rows, kind, ev.get("metric_pattern"), max_new, seed,
                   _validation_fingerprint(ds, cfg))


class _Models:
    """The one 4-bit base with the run's adapter, loaded on first use; each checkpoint's adapter goes beside it."""

    def __init__(self, run, sample: _Sample, batch_size: int, max_batch_tokens: int):
        self.run, self.s, self.batch_size, self.max_batch_tokens = run, sample, batch_size, max_batch_tokens
        self.model = self.tok = None

    def _loaded(self):
        if self.model is None:
            self.model, self.tok = load_tuned(self.run)
        return self.model

    def loss(self, label: str, adapter: str | None) -> dict:
        """Return {'loss', 'tokens'} of adapter (None: the base alone) over the sample's assistant tokens."""
        print(f"Measuring {label} …", flush=True)
        m = self._loaded()
        if adapter is None:
            with m.disable_adapter():
                total, count = _loss_sum(m, self.s.rows, self.tok.pad_token_id, self.batch_size, self.max_batch_tokens)
        else:
            m.set_adapter(adapter, inference_mode=True)
            total, count = _loss_sum(m, self.s.rows, self.tok.pad_token_id, self.batch_size, self.max_batch_tokens)
        return {"loss": total / max(count, 1), "tokens": count}

    def answers(self, label: str, adapter: str | None) -> list[str]:
        """Return adapter's greedy answers to the sample's prompts (None: the base alone)."""
        s = self.s
        print(f"Generating {label} ({len(s.prompts)} prompts, greedy, ≤ {s.max_new} new tokens) …", flush=True)
        m = self._loaded()
        if adapter is None:
            with m.disable_adapter():
                return generate(m, self.tok, s.prompts, s.max_new, self.batch_size, s.seed, s.tools)
        m.set_adapter(adapter, inference_mode=True)
        return generate(m, self.tok, s.prompts, s.max_new, self.batch_size, s.seed, s.tools)

    def with_checkpoint(self, path: Path, name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Return a computation running fn with the checkpoint's adapter loaded as name, then unloaded."""

        def compute():
            m = self._loaded()
            m.load_adapter(str(path), adapter_name=name, is_trainable=False)
            try:
                return fn()
            finally:
                m.set_adapter("default", inference_mode=True)
                m.delete_adapter(name)

        return compute

    def close(self) -> None:
        """Drop the model (its last reference) and give its (GPU) memory back before the chat loads one."""
        if self.model is not None:
            self.model = self.tok = None
            _free_memory()


def _say_reused(run, parts: _Parts, s: _Sample, tuned_hash: str, checkpoints: list) -> None:
    """Print which finished parts a re-run reuses from eval/cache/."""
    planned = [("base loss", s.loss_key("base")), ("tuned loss", s.loss_key(tuned_hash))]
    planned += [(f"{p.name} loss", s.loss_key(h)) for _, p, h in checkpoints if h != tuned_hash]
    planned += [("base answers", s.gen_key("base")), ("tuned answers", s.gen_key(tuned_hash))]
    print(f"Work: {len(planned) - 2} loss passes and 2 generation passes (≤ {s.max_new} new tokens) over "
          f"{len(s.rows)} rows, plus the best checkpoint's answers if it is not the final adapter — bounded by "
          "eval.rows, eval.max_new_tokens and eval.checkpoints (all | none)")
    cached = [label for label, key in planned if parts.has(key)]
    if cached:
        print(f"Reusing {len(cached)} of {len(planned)} finished parts from {run.display(parts.folder)}: {', '.join(cached)}")


def _checkpoint_curve(parts: _Parts, models: _Models, s: _Sample, checkpoints: list, tuned_hash: str,
                      tuned_loss: dict) -> tuple[list[dict], dict[str, dict]]:
    """Return (each checkpoint's loss, in step order; {adapter hash: loss})."""
    losses = {tuned_hash: tuned_loss}
    curve = []
    for step, path, h in checkpoints:
        if h == tuned_hash:
            loss = tuned_loss  # the final adapter is this checkpoint's weights
        else:
            name, label = f"ckpt_{step}", f"{path.name} loss"
            loss = parts.get(s.loss_key(h), label, models.with_checkpoint(path, name, lambda n=name, lb=label: models.loss(lb, n)))
            losses[h] = loss
        curve.append({"name": path.name, "step": step, "loss": loss["loss"], "same_as_final": h == tuned_hash})
    return curve, losses


def _generations(s: _Sample, preds: dict[str, list[str]]) -> list[str]:
    """Return generations.jsonl's lines: each row's prompt, reference and every model's answer."""
    lines = []
    for k, (i, p, r) in enumerate(zip(s.rows_idx, s.prompts, s.refs, strict=True)):
        row = {"row": i, "prompt": p[-1]["content"] if p else "", "reference": r, **{n: a[k] for n, a in preds.items()}}
        if s.kind == "tool_call":  # a call is shown as the structured call it makes, text that calls nothing as is
            row.update({c: _shown_call(row[c]) for c in ("reference", "base", "tuned", "best") if c in row})
        lines.append(json.dumps(row, ensure_ascii=False))
    return lines


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

    _check_eval_settings(run)
    prepared = load_prepared(run)
    val = prepared["validation"]
    s = _sample(run, val, max_rows)
    tuned_hash = adapter_hash(run.adapter_dir)
    checkpoints = [(step, p, adapter_hash(p)) for step, p in scan_checkpoints(run.checkpoints_dir)[0]]
    if run.cfg.get("eval", {}).get("checkpoints", "all") == "none":  # base and final only: one loss pass each
        checkpoints = [c for c in checkpoints if c[2] == tuned_hash]
    parts = _Parts(run.eval_dir / "cache")
    _say_reused(run, parts, s, tuned_hash, checkpoints)
    models = _Models(run, s, batch_size, max_batch_tokens)

    base_loss = parts.get(s.loss_key("base"), "base loss", lambda: models.loss("base loss", None))
    tuned_loss = parts.get(s.loss_key(tuned_hash), "tuned loss", lambda: models.loss("tuned loss", "default"))
    curve, losses = _checkpoint_curve(parts, models, s, checkpoints, tuned_hash, tuned_loss)
    best = min(curve, key=lambda c: (c["loss"], -c["step"])) if curve else None
    preds = {"base": parts.get(s.gen_key("base"), "base answers", lambda: models.answers("base answers", None)),
             "tuned": parts.get(s.gen_key(tuned_hash), "tuned answers", lambda: models.answers("tuned answers", "default"))}
    results: dict[str, Any] = {name: _scores(loss, preds[name], s.refs, s.kind, s.pattern, metric)
                               for name, loss in (("base", base_loss), ("tuned", tuned_loss))}
    if best and not best["same_as_final"]:
        _, path, h = next(c for c in checkpoints if c[1].name == best["name"])
        label = f"{path.name} answers"
        preds["best"] = parts.get(s.gen_key(h), label, models.with_checkpoint(path, "best", lambda: models.answers(label, "best")))
        results["best"] = _scores(losses[h], preds["best"], s.refs, s.kind, s.pattern, metric)
    models.close()
    train_refs = train_references(prepared.get("train"), s.seed)
    baseline = baseline_scores(train_refs, s.refs, s.kind, s.pattern, {k: v for k, v in preds.items() if k != "base"}, metric)
    if baseline is not None:
        results["baseline"] = baseline
    results.update(
        {
            "best_checkpoint": best["name"] if best else None,
            "checkpoints": [{k: c[k] for k in ("name", "step", "loss")} for c in curve],
            "metric": s.kind,
            "metric_pattern": s.pattern if s.kind in ("regex", "number") else None,
            "rows": len(s.rows),
            "tokens": tuned_loss["tokens"],
            "validation_rows": len(val),
            "validation_fingerprint": s.fp,
            "tuned_adapter_hash": tuned_hash,
            "parts": {"reused": parts.reused, "computed": parts.computed},
        }
    )
    run.eval_dir.mkdir(parents=True, exist_ok=True)
    write_text(run.eval_dir / "generations.jsonl", "\n".join(_generations(s, preds)) + "\n")
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
