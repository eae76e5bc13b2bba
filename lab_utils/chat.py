"""Chat data: detect a dataset's format, standardize rows to messages, tokenize with an assistant mask.

The mask (`assistant_masks`) is 1 exactly on each assistant turn's content plus the end-of-turn marker the
chat template writes right after it (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`, `<|end|>`, ...), and
0 on system/user turns, role headers, BOS and generation prompts. How it is computed:

1. Render the conversation once with the tokenizer's own chat template (text) and tokenize that text once
   with `add_special_tokens=False` (the template writes BOS itself, so there is never a second BOS) and
   character offsets. `input_ids` are therefore exactly what `apply_chat_template` gives at inference.
2. Find each assistant content's character span: render again with every assistant content replaced by a
   sentinel, which splits the text into the template's own fixed pieces; the content lies between them (the
   template may `trim` it). If the template's layout depends on the content, search forward instead.
   Templates with `{% generation %}` markers are checked with transformers' `return_assistant_tokens_mask`:
   content inside the marked blocks keeps the rule above (so markers that also wrap a role header or '\n'
   change nothing); content that cannot be found there gives way to the marked blocks (edges trimmed).
3. Extend each span over the end-of-turn marker that follows it. The marker is learned once per template by
   rendering a probe chat: the whole tokens an assistant turn ends with both mid-chat and last (`<|im_end|>`,
   `" </s>"` for Llama-2), else the special token each starts with (gpt-oss: `<|end|>` / `<|return|>`), else
   the tokenizer's eos_token. An eos_token written right after the marker is included too.
4. Boundary rule: a token is masked in when MORE than half of its non-whitespace characters lie inside a
   span (a whitespace-only token: more than half of its characters; a zero-width token: when it starts
   inside). So `"▁Sure"` after `[/INST]` (template space + content) is in, a token mostly made of header
   text is out, and a tie is out. Decoding the masked tokens gives the contents + end-of-turn text, up to
   whitespace at the span edges.
"""

from __future__ import annotations

import bisect
import operator
import re
from typing import Any

FORMATS = ("sharegpt", "messages", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
DEFAULT_ROLE_MAP: dict[str, str] = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "ai": "assistant",
}  # fmt: skip
CONVERSATION_COLUMNS = ("messages", "conversations", "conversation")

# ChatML with the tokenizer's eos token ending every turn; `{% generation %}` wraps what the model learns.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SENTINEL = "<<lab_utils.chat:{}>>"
_SENTINEL_RE = re.compile(r"<<lab_utils\.chat:(\d+)>>")
_EOT_CACHE: dict[tuple, tuple[str, ...]] = {}


class RowError(ValueError):
    """A row that must be dropped (never the whole run): `reason` is a stable key, `detail` one sentence."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple:
        return RowError, (self.reason, self.detail)  # survives datasets.map(num_proc=...) worker pickling


# ----------------------------------------------------------------------------------------------- formats


def detect_format(columns: list[str], sample_rows: list[dict]) -> tuple[str, str]:
    """Return (format, reason) for a dataset with these columns, or raise ValueError saying how to set it."""
    cols = list(columns)
    for col in CONVERSATION_COLUMNS:
        if col not in cols:
            continue
        rows = [r[col] for r in sample_rows if isinstance(r, dict) and isinstance(r.get(col), list)]
        turn = next((t for turns in rows for t in turns if isinstance(t, dict)), None)
        if turn is not None and ("from" in turn or "value" in turn):
            return "sharegpt", f"column '{col}' holds from/value turns"
        if turn is not None and ("role" in turn or "content" in turn):
            return "messages", f"column '{col}' holds role/content turns"
        if turn is None:
            fmt = "sharegpt" if col == "conversations" else "messages"
            return fmt, f"column '{col}' (no turns in the sample; guessed from the column name)"
    if "instruction" in cols and "output" in cols:
        return "alpaca", "columns 'instruction' and 'output'" + (" (+ 'input')" if "input" in cols else "")
    if "prompt" in cols and "completion" in cols:
        conv = any(isinstance(r.get("prompt"), list) for r in sample_rows if isinstance(r, dict))
        return "prompt_completion", "columns 'prompt' and 'completion'" + (" (conversational)" * conv)
    if "text" in cols:
        return "text", "column 'text' holds plain text (language modelling, no turns)"
    raise ValueError(
        f"Cannot detect the data format: got columns {cols}; fix: set data.format to one of {list(FORMATS)} "
        "(sharegpt/messages need 'conversations'/'messages', alpaca 'instruction'+'output', "
        "prompt_completion 'prompt'+'completion', text 'text') or rename the columns."
    )


def _role_map(role_map: dict | None) -> dict[str, str]:
    """Return DEFAULT_ROLE_MAP extended by the user's entries (keys lower-cased); ValueError on a bad target."""
    merged = dict(DEFAULT_ROLE_MAP)
    for key, target in (role_map or {}).items():
        if target not in ROLES:
            raise ValueError(f"data.role_map maps {key!r} to {target!r}; fix: map it to one of {ROLES}")
        merged[str(key).strip().lower()] = target
    return merged


def _either(turn: dict, key: str, alias: str) -> Any:
    """Return turn[key] unless it is absent or None, else turn[alias] (role/from, content/value)."""
    value = turn.get(key)
    return turn.get(alias) if value is None else value


def _turns(value: Any, field: str, roles: dict[str, str], default_role: str | None = None) -> list[dict]:
    """Return validated {'role','content'} turns from a list of turns (or a string under default_role)."""
    if isinstance(value, str) and default_role is not None:
        value = [{"role": default_role, "content": value}]
    if value is None or (isinstance(value, (list, str)) and len(value) == 0):
        raise RowError("empty", f"field '{field}' is empty")
    if not isinstance(value, list):
        raise RowError("missing_field", f"field '{field}' is {type(value).__name__}, not a list of turns")
    out = []
    for i, turn in enumerate(value):
        # Arrow gives every turn every key seen in the file (None where absent): take the one that is set
        role = _either(turn, "role", "from") if isinstance(turn, dict) else None
        content = _either(turn, "content", "value") if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or role is None or ("content" not in turn and "value" not in turn):
            raise RowError(
                "missing_field", f"{field}[{i}] needs role/content or from/value, got {turn!r:.60}"
            )
        if not isinstance(content, str):
            raise RowError("non_string_content", f"{field}[{i}] content is {type(content).__name__}, not str")
        mapped = roles.get(role.strip().lower()) if isinstance(role, str) else None
        if mapped is None:
            raise RowError("unknown_role", f"{field}[{i}] has unknown role {role!r}; add it to data.role_map")
        if not content.strip():
            if mapped == "system":
                continue  # an empty system prompt says nothing; dropping it keeps the row
            raise RowError("empty_content", f"{field}[{i}] ({mapped}) has empty content")
        out.append({"role": mapped, "content": content})
    return out


def _text_field(row: dict, field: str, required: bool = True, blank: str = "empty_content") -> str:
    """Return row[field] as a string ('' when optional and absent/None) or raise RowError (`blank` if blank)."""
    value = row.get(field)
    if value is None and not required:
        return ""
    if field not in row:
        raise RowError("missing_field", f"row has no field '{field}' (fields: {sorted(row)})")
    if not isinstance(value, str):
        raise RowError("non_string_content", f"field '{field}' is {type(value).__name__}, expected str")
    if required and not value.strip():
        raise RowError(blank, f"field '{field}' is empty")
    return value


def standardize(
    row: dict, fmt: str, role_map: dict | None = None, system_prompt: str | None = None
) -> list[dict]:
    """Return the row as [{'role','content'}, ...] (user/assistant/system; 'text' for fmt='text') or raise RowError."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown data format {fmt!r}; fix: set data.format to one of {list(FORMATS)}")
    roles = _role_map(role_map)
    if fmt == "text":
        return [{"role": "text", "content": _text_field(row, "text", blank="empty")}]
    if fmt in ("sharegpt", "messages"):
        col = next((c for c in CONVERSATION_COLUMNS if c in row), None)
        if col is None:
            raise RowError("missing_field", f"row has none of {list(CONVERSATION_COLUMNS)}: {sorted(row)}")
        messages = _turns(row[col], col, roles)
    elif fmt == "alpaca":
        instruction, extra = _text_field(row, "instruction"), _text_field(row, "input", required=False)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        answer = _text_field(row, "output")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    else:  # prompt_completion: plain strings or TRL's conversational lists of messages
        for field in ("prompt", "completion"):
            if field not in row:
                raise RowError("missing_field", f"row has no field '{field}' (fields: {sorted(row)})")
        messages = _turns(row["prompt"], "prompt", roles, "user")
        messages += _turns(row["completion"], "completion", roles, "assistant")
    if not messages:
        raise RowError("empty", "the conversation has no turns with content")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(
            "no_assistant_turn", f"no assistant turn among {len(messages)} turns: nothing to learn"
        )
    if messages[-1]["role"] != "assistant":
        raise RowError(
            "ends_on_user",
            f"the conversation ends on a {messages[-1]['role']} turn after the last answer; "
            "a trailing turn has no answer to learn",
        )
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


# ---------------------------------------------------------------------------------------------- template


def ensure_chat_template(tokenizer) -> bool:
    """Return True after setting DEFAULT_CHAT_TEMPLATE on a tokenizer that has none; False if it had one."""
    if getattr(tokenizer, "chat_template", None):
        return False
    if not getattr(tokenizer, "eos_token", None):
        raise ValueError(
            "Cannot add the default chat template: got a tokenizer without eos_token; "
            "fix: set tokenizer.eos_token (it ends every turn) or give the tokenizer a chat_template"
        )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _render(tokenizer, messages: list[dict]) -> str:
    """Return the conversation rendered by the tokenizer's chat template, or raise RowError(template_rejected)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # the template is code run on row data: any failure is this row's
        raise RowError("template_rejected", f"chat template raised {type(exc).__name__}: {exc}") from exc


def _end_of_turn(tokenizer) -> tuple[str, ...]:
    """Return the text(s) the template writes right after an assistant's content, e.g. ('<|im_end|>',) (cached)."""
    template, eos = tokenizer.get_chat_template(), getattr(tokenizer, "eos_token", None)
    key = (template, eos, getattr(tokenizer, "bos_token", None))
    if key not in _EOT_CACHE:
        s = [_SENTINEL.format(f"probe{i}") for i in range(4)]
        probe = [{"role": r, "content": c} for r, c in zip(("user", "assistant") * 2, s, strict=True)]
        eot: tuple[str, ...] = ()
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
            mid, final = text[text.index(s[1]) + len(s[1]) :], text[text.index(s[3]) + len(s[3]) :]
            a, b = (tokenizer(x, add_special_tokens=False, return_offsets_mapping=True) for x in (mid, final))
            ia, ib, n = a["input_ids"], b["input_ids"], 0
            while n < min(len(ia), len(ib)) and ia[n] == ib[n]:  # whole tokens: '<|end|>\n<|user|>' and
                n += 1  # '<|end|>\n<|endoftext|>' share '<|end|>\n', not '<|end|>\n<|'
            special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            if n and mid[: a["offset_mapping"][n - 1][1]].strip():
                eot = (mid[: a["offset_mapping"][n - 1][1]].rstrip(),)  # Llama-2 keeps ' </s>'
            elif ia and ib and ia[0] in special and ib[0] in special:  # gpt-oss: <|end|> mid, <|return|> last
                eot = (mid[slice(*a["offset_mapping"][0])], final[slice(*b["offset_mapping"][0])])
        except Exception:  # a template that rejects the probe: fall back to eos below
            pass
        _EOT_CACHE[key] = eot or ((eos,) if eos else ())
    return _EOT_CACHE[key]


def _content_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]] | None:
    """Return the character span of each assistant content in `text`, or None if they cannot be located."""
    asst = [m["content"] for m in messages if m["role"] == "assistant"]
    marked, k = [], 0
    for m in messages:
        if m["role"] == "assistant":
            m, k = {**m, "content": _SENTINEL.format(k)}, k + 1
        marked.append(m)
    try:
        parts = _SENTINEL_RE.split(tokenizer.apply_chat_template(marked, tokenize=False))
    except Exception:
        parts = []
    spans, cursor = [], 0
    if parts[1::2] == [str(i) for i in range(len(asst))]:  # template pieces, sentinel ids alternate
        pieces = parts[0::2]
        for i, content in enumerate(asst):
            if not text.startswith(pieces[i], cursor):
                break
            start = cursor + len(pieces[i])
            for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                if text.startswith(cand, start) and text.startswith(pieces[i + 1], start + len(cand)):
                    spans.append((start, start + len(cand)))
                    cursor = start + len(cand)
                    break
            else:
                break
        if len(spans) == len(asst):
            return spans
    spans, cursor = [], 0  # the layout depends on the content: search forward, user turns move the cursor
    for m in messages:
        for cand in dict.fromkeys((m["content"], m["content"].strip())):
            at = text.find(cand, cursor) if m["role"] != "system" else -1
            if at >= 0:
                cursor = at + len(cand)
                if m["role"] == "assistant":
                    spans.append((at, cursor))
                break
        else:
            if m["role"] == "assistant":
                return None
    return spans


def _generation_spans(tokenizer, messages: list[dict], text: str, enc) -> list[tuple[int, int]]:
    """Return the character spans of a template's `{% generation %}` blocks via transformers' assistant mask.

    The mask is transformers' own (`apply_chat_template(..., return_assistant_tokens_mask=True)`: the
    tokens from `char_to_token(start)` to `char_to_token(end - 1)` of each block), computed on `enc`, the
    encoding of the same rendered `text`, so the text is not tokenized a second time.
    """
    offsets = enc["offset_mapping"]
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            conversations=[messages],
            chat_template=tokenizer.get_chat_template(),
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
        ok = rendered[0] == text
    except Exception:  # another transformers: take the public, slower route
        ok = False
    runs: list[tuple[int, int]] = []  # token ranges [first, stop) of the mask
    if ok:
        for a, b in indices[0]:  # as transformers does it, edge cases included
            first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
            if first is None:
                break
            runs.append((first, last + 1 if last else len(offsets)))
    else:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        mask = list(out["assistant_masks"])
        for i, bit in enumerate(mask if len(mask) == len(offsets) else []):
            if bit:
                runs.append((i, i + 1))
    merged: list[list[int]] = []
    for first, stop in sorted(r for r in runs if r[0] < r[1]):
        if merged and first <= merged[-1][1]:  # touching or overlapping: one run of masked tokens
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([first, stop])
    return [(offsets[first][0], offsets[stop - 1][1]) for first, stop in merged]


def _token_bit(text: str, s: int, e: int, spans: list[tuple[int, int]], ends: list[int]) -> int:
    """Return 1 when the token at char offsets (s, e) is mostly inside the spans (module docstring, 4)."""
    k = bisect.bisect_right(ends, s)  # the first span that ends after the token starts
    if k == len(spans) or spans[k][0] >= max(e, s + 1):  # no overlap (zero-width: not inside)
        return 0
    if spans[k][0] <= s and e <= spans[k][1]:  # wholly inside (zero-width: starts inside)
        return 1
    token = text[s:e]  # straddles a span edge: weigh its non-whitespace characters
    inside = "".join(text[max(s, a) : min(e, b)] for a, b in spans[k:] if a < e)
    total, got = sum(not c.isspace() for c in token), sum(not c.isspace() for c in inside)
    if not total:  # a whitespace-only token: count every character
        total, got = len(token), len(inside)
    return int(2 * got > total)


def _token_mask(text: str, offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """Return 1 for each token (char offsets) mostly inside the sorted, disjoint spans (module docstring, 4).

    Tokens come in text order, so each span's wholly-inside tokens form one run found by bisection;
    only the tokens at its edges are weighed one by one (`_token_bit`).
    """
    ends = [b for _, b in spans]
    starts_t, ends_t = [s for s, _ in offsets], [e for _, e in offsets]
    if not (all(map(operator.le, starts_t, starts_t[1:])) and all(map(operator.le, ends_t, ends_t[1:]))):
        return [
            _token_bit(text, s, e, spans, ends) for s, e in offsets
        ]  # offsets out of order: token by token
    mask = [0] * len(offsets)
    for a, b in spans:
        lo, hi = bisect.bisect_right(ends_t, a), bisect.bisect_left(starts_t, b)  # tokens overlapping [a, b)
        while lo > 0 and starts_t[lo - 1] == ends_t[lo - 1] == a:  # zero-width tokens at the span start
            lo -= 1
        first = bisect.bisect_left(starts_t, a, lo, hi)  # the run with start >= a ...
        last = max(first, bisect.bisect_right(ends_t, b, lo, hi))  # ... and end <= b
        mask[first:last] = [1] * (last - first)
        for i in (*range(lo, first), *range(last, hi)):
            mask[i] = _token_bit(text, offsets[i][0], offsets[i][1], spans, ends)
    return mask


def _assistant_mask(tokenizer, messages: list[dict], text: str, enc) -> list[int]:
    """Return the assistant mask over the tokens of `enc`, the encoding of the rendered `text` (module docstring)."""
    offsets = list(enc["offset_mapping"])
    spans = _content_spans(tokenizer, messages, text)
    if _GENERATION_TAG.search(tokenizer.get_chat_template()):
        gen = _generation_spans(tokenizer, messages, text, enc)
        if gen and not (spans and all(any(a <= s and e <= b for a, b in gen) for s, e in spans)):
            # the content is not where the markers say (or cannot be found): the markers know better
            trim = [
                (a + len(t) - len(t.lstrip()), b - len(t) + len(t.rstrip()))
                for a, b in gen
                if (t := text[a:b])
            ]
            spans = [(a, b) for a, b in trim if a < b]
    if not spans:
        raise RowError(
            "template_rejected",
            "the chat template rewrites assistant content so it cannot be located; "
            "fix: use a template with {% generation %} markers",
        )
    eos = getattr(tokenizer, "eos_token", None)
    eots = [re.compile(re.escape(e) + "|" + r"\s*" + re.escape(e.strip())) for e in _end_of_turn(tokenizer)]
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if m := next((m for r in eots if (m := r.match(text, b))), None):
            b = m.end()
        if eos and text.startswith(eos, b) and not text[a:b].endswith(eos):
            b += len(eos)  # an eos written right after the end-of-turn marker
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return _token_mask(text, offsets, merged)


def tokenize_chat(
    tokenizer, messages: list[dict], max_length: int | None = None, on_too_long: str = "drop"
) -> dict:
    """Return {'input_ids', 'assistant_masks'} (same length) for standardized messages, or raise RowError."""
    if on_too_long not in ("drop", "truncate"):
        raise ValueError(f"on_too_long must be 'drop' or 'truncate', got {on_too_long!r}; fix: pick one")
    if not messages:
        raise RowError("empty", "no messages to tokenize")
    if messages[0]["role"] == "text":  # plain language-model text: learn every token, end with eos
        ids = list(tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"])
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
        mask = [1] * len(ids)
    else:
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("no_assistant_turn", f"no assistant turn among {len(messages)} messages")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "Tokenizer has no chat_template; got None; fix: call ensure_chat_template(tokenizer) first"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenize_chat needs character offsets; got the slow tokenizer {type(tokenizer).__name__}; "
                "fix: load a fast tokenizer (AutoTokenizer.from_pretrained(name), the transformers 5 default)"
            )
        text = _render(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = _assistant_mask(tokenizer, messages, text, enc)
        if not any(mask):
            raise RowError("no_assistant_turn", "no token of the rendered chat belongs to an assistant turn")
    if max_length is not None and len(ids) > max_length:
        if on_too_long == "drop":
            raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            raise RowError("too_long", f"no assistant token survives truncation to max_length {max_length}")
    return {"input_ids": ids, "assistant_masks": mask}
