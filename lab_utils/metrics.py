"""Task metrics: which metric a run is scored by, how answers are scored, which direction is better.

One implementation shared by 03_evaluate (`evaluation.evaluate_run`) and 05_sweep (`sweep`): the metric
choice (`metric_kind`), the direction (`lower_is_better`), the scorers (`task_metrics`, `row_scores`)
and the naive baseline (`constant_answer`, `baseline_scores`, `tie_margin`, `beats_baseline`). Pure
Python: no torch, no model, imported by config for the list of metric names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from .errors import LabError

__all__ = [
    "METRICS",
    "parse_price",
    "parse_number",
    "normalize_answer",
    "parse_tool_calls",
    "task_metrics",
    "metric_kind",
    "lower_is_better",
    "primary_keys",
    "constant_answer",
    "row_scores",
    "tie_margin",
    "beats_baseline",
    "baseline_scores",
    "TIE_STANDARD_ERRORS",
    "TIE_RELATIVE_FLOOR",
]

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


# ---------------------------------------------------------------------------------------------- task metrics


def parse_price(text: str) -> float | None:
    """Return the first dollar amount in `text` ("Price is $120" → 120.0), or None."""
    m = re.search(r"\$\s*([0-9][0-9,]*(?:\.[0-9]+)?)", text)
    return float(m.group(1).replace(",", "")) if m else None


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
