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
   An assistant turn with tool calls or a thinking trace in a field of its own is located by rendering the
   chat again with that turn replaced by a plain sentinel answer: what differs is what the turn wrote (its
   trace, content and calls, in the template's own layout: `<tool_call>...</tool_call>`, Llama 3.1's JSON).
   Tool results (`tool` turns), the tool list the template writes and user turns are never in a span.
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
import json
import operator
import os
import re
from typing import Any

from .choices import CHAT_FORMATS, REASONING, ROLES  # noqa: F401 — the allowed values live below config
from .errors import problem

FORMATS = CHAT_FORMATS
DEFAULT_ROLE_MAP: dict[str, str] = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "ai": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
    "function_call": "function_call", "tool_call": "function_call",
}  # fmt: skip
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # where datasets keep the trace
_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)  # a trace written at the start of the content
CONVERSATION_COLUMNS = ("messages", "conversations", "conversation")

def chatml_template(end: str, bos: bool = False) -> str:
    """Return a ChatML chat template ending every turn with the Jinja expression `end`, taking tools= and traces.

    `{% generation %}` wraps what the model learns: the assistant's trace (`<think>` block), content and
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` calls. With tools, one compact line per tool
    (`- name(arg: type, ...): description`, short enough for a small max_length) opens the system turn;
    tool results are `tool` turns. A chat without tools renders as plain ChatML.
    """
    return (
        ("{{ bos_token }}" if bos else "")
        + "{%- if tools %}{{ '<|im_start|>system\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{%- endif %}"
        "{{ 'Tools:' }}{%- for tool in tools %}{%- set f = tool['function'] if tool['function'] is defined else tool %}"
        "{%- set props = f['parameters']['properties'] if f['parameters'] is defined and "
        "f['parameters']['properties'] is defined else {} %}{{ '\n- ' + f['name'] + '(' }}"
        "{%- for name, spec in props | items %}{{ (', ' if not loop.first else '') + name + ': ' + "
        "(spec['type'] if spec['type'] is defined else 'any') }}{%- endfor %}{{ ')' }}"
        "{%- if f['description'] is defined %}{{ ': ' + f['description'] }}{%- endif %}{%- endfor %}"
        "{{ '\nCall as <tool_call>{json}</tool_call>' + "
        + end
        + " + '\n' }}{%- endif %}"
        "{%- for message in messages %}{%- if not (tools and loop.first and message['role'] == 'system') %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{%- if message['role'] == 'assistant' %}{% generation %}"
        "{%- if message['reasoning_content'] %}{{ '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' }}"
        "{%- endif %}{{ message['content'] }}"
        "{%- for call in message['tool_calls'] or [] %}"
        "{%- set f = call['function'] if call['function'] is defined else call %}"
        "{{ ('\n' if (message['content'] or not loop.first) else '') + '<tool_call>' + "
        "({'name': f['name'], 'arguments': f['arguments']} | tojson) + '</tool_call>' }}{%- endfor %}"
        "{{ " + end + " }}{% endgeneration %}{{ '\n' }}"
        "{%- else %}{{ message['content'] + " + end + " + '\n' }}{%- endif %}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
    )


# ChatML with the tokenizer's eos token ending every turn (for tokenizers that have no template).
DEFAULT_CHAT_TEMPLATE = chatml_template("eos_token")

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
    raise problem(
        "Cannot detect the data format", got=f"columns {cols}",
        fix=f"set data.format to one of {list(FORMATS)} (sharegpt/messages need 'conversations'/'messages', "
        "alpaca 'instruction'+'output', prompt_completion 'prompt'+'completion', text 'text') or rename the columns.",
        kind=ValueError,
    )


def describe_tools(columns: list[str], sample_rows: list[dict]) -> str | None:
    """Return how the sample carries tool calling (e.g. "ShareGPT function_call/observation turns, ..."), or None."""
    rows = [r for r in sample_rows if isinstance(r, dict)]
    turns = [t for r in rows for c in CONVERSATION_COLUMNS if isinstance(r.get(c), list) for t in r[c]]
    turns = [t for t in turns if isinstance(t, dict)]
    roles = {str(_either(t, "role", "from")).strip().lower() for t in turns}
    parts = []
    if roles & {"function_call", "tool_call", "observation"}:
        parts.append("ShareGPT function_call/observation turns (LLaMA-Factory / glaive style)")
    if any(t.get("tool_calls") for t in turns) or roles & {"tool", "ipython"}:
        parts.append("OpenAI tool_calls on assistant turns with role 'tool' results")
    kinds = {type(r["tools"]).__name__ for r in rows if r.get("tools") not in (None, "", [], "[]")}
    if kinds:
        parts.append("a 'tools' column " + ("of JSON text" if kinds == {"str"} else "of lists"))
    return "tool calling: " + ", ".join(parts) if parts else None


def _role_map(role_map: dict | None) -> dict[str, str]:
    """Return DEFAULT_ROLE_MAP extended by the user's entries (keys lower-cased); ValueError on a bad target."""
    merged = dict(DEFAULT_ROLE_MAP)
    for key, target in (role_map or {}).items():
        if target not in ROLES:
            raise problem(f"data.role_map maps {key!r} to an unknown role", got=repr(target),
                          fix=f"map it to one of {', '.join(ROLES)}", kind=ValueError)
        merged[str(key).strip().lower()] = target
    return merged


def _either(turn: dict, key: str, alias: str) -> Any:
    """Return turn[key] unless it is absent or None, else turn[alias] (role/from, content/value)."""
    value = turn.get(key)
    return turn.get(alias) if value is None else value


def _drop_nulls(value: Any) -> Any:
    """Return value with None entries of every mapping removed (Arrow gives each dict every key seen in the file)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _json_value(value: Any, where: str, reason: str) -> Any:
    """Return value, parsed when it is JSON text; RowError(reason) when that text is not JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise RowError(reason, f"{where} is not valid JSON ({e.msg}): {value[:60]!r}") from None


def _tool_calls(value: Any, where: str) -> list[dict]:
    """Return [{'type': 'function', 'function': {'name', 'arguments': dict}}] from a call, a list of calls or JSON text."""
    value = _json_value(value, where, "bad_tool_call")
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        fn = item.get("function") if isinstance(item, dict) and isinstance(item.get("function"), dict) else item
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowError("bad_tool_call", f"{where} needs a function name, got {item!r:.60}")
        args = fn.get("arguments")
        args = fn.get("parameters") if args is None else args  # Llama 3.1 writes 'parameters'
        args = {} if args is None or args == "" else _json_value(args, f"{where} arguments", "bad_tool_call")
        if not isinstance(args, dict):
            raise RowError("bad_tool_call", f"{where} arguments are {type(args).__name__}, not a JSON object")
        call: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": _drop_nulls(args)}}
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            call["id"] = item["id"]
        calls.append(call)
    if not calls:
        raise RowError("bad_tool_call", f"{where} holds no function call")
    return calls


def standardize_tools(value: Any) -> list[dict] | None:
    """Return a row's tool list as [{'type': 'function', 'function': {name, description, parameters}}], or None."""
    if isinstance(value, str) and not value.strip():
        return None  # an empty cell (CSV) offers no tools
    value = _json_value(value, "column 'tools'", "bad_tools")
    if value is None or value == []:
        return None
    items = value if isinstance(value, list) else [value]
    tools = []
    for i, item in enumerate(items):
        item = _drop_nulls(item)
        fn = item.get("function") if isinstance(item, dict) and isinstance(item.get("function"), dict) else item
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowError("bad_tools", f"tools[{i}] needs a function name, got {item!r:.60}")
        tools.append({"type": "function", "function": fn})
    return tools


def _reasoning_of(turn: dict, content: str) -> tuple[str | None, str]:
    """Return (the turn's thinking trace or None, its content without a leading <think> block)."""
    trace = next((turn[k] for k in _REASONING_FIELDS if isinstance(turn.get(k), str) and turn[k].strip()), None)
    if m := _THINK_RE.match(content):
        trace, content = trace or m.group(1), content[m.end() :]
    return (trace.strip() if trace and trace.strip() else None), content


def _turns(
    value: Any,
    field: str,
    roles: dict[str, str],
    default_role: str | None = None,
    reasoning: str = "keep",
    stats: dict | None = None,
) -> list[dict]:
    """Return validated turns ({'role','content'} plus tool_calls / reasoning_content / name / tool_call_id)."""
    if isinstance(value, str) and default_role is not None:
        value = [{"role": default_role, "content": value}]
    if value is None or (isinstance(value, (list, str)) and len(value) == 0):
        raise RowError("empty", f"field '{field}' is empty")
    if not isinstance(value, list):
        raise RowError("missing_field", f"field '{field}' is {type(value).__name__}, not a list of turns")
    out: list[dict] = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        # Arrow gives every turn every key seen in the file (None where absent): take the one that is set
        role = _either(turn, "role", "from") if isinstance(turn, dict) else None
        content = _either(turn, "content", "value") if isinstance(turn, dict) else None
        raw_calls = (turn.get("tool_calls") or turn.get("function_call")) if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or role is None or (
            "content" not in turn and "value" not in turn and not raw_calls
        ):
            raise RowError("missing_field", f"{where} needs role/content or from/value, got {turn!r:.60}")
        mapped = roles.get(role.strip().lower()) if isinstance(role, str) else None
        if mapped is None:
            raise RowError("unknown_role", f"{where} has unknown role {role!r}; add it to data.role_map")
        if mapped == "function_call":  # ShareGPT: the value is the call; it belongs to the assistant's turn
            calls = _tool_calls(content, where)
            if out and out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
                out[-1]["tool_calls"] = calls  # "I'll look that up" + the call: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        if mapped == "tool" and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        if content is None and mapped == "assistant" and raw_calls:
            content = ""
        if not isinstance(content, str):
            raise RowError("non_string_content", f"{where} content is {type(content).__name__}, not str")
        msg: dict[str, Any] = {"role": mapped, "content": content}
        if mapped == "assistant":
            if raw_calls:
                msg["tool_calls"] = _tool_calls(raw_calls, where)
            trace, msg["content"] = _reasoning_of(turn, content)
            if trace and stats is not None:
                stats["reasoning"] = stats.get("reasoning", 0) + 1
            if trace and reasoning == "keep":
                msg["reasoning_content"] = trace
        if mapped == "tool":
            msg.update({k: turn[k] for k in ("name", "tool_call_id") if isinstance(turn.get(k), str)})
        if not msg["content"].strip() and not msg.get("tool_calls") and mapped != "tool":
            if mapped == "system":
                continue  # an empty system prompt says nothing; dropping it keeps the row
            raise RowError("empty_content", f"{where} ({mapped}) has empty content")
        out.append(msg)
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
    row: dict,
    fmt: str,
    role_map: dict | None = None,
    system_prompt: str | None = None,
    reasoning: str = "keep",
    stats: dict | None = None,
) -> list[dict]:
    """Return the row as [{'role','content'}, ...] (user/assistant/system/tool; 'text' for fmt='text') or raise RowError.

    Assistant turns may carry `tool_calls` (name + arguments as a dict) and, with reasoning='keep',
    `reasoning_content`; tool turns may carry `name` / `tool_call_id`. `stats` (optional) counts traces seen.
    """
    if fmt not in FORMATS:
        raise problem("Unknown data format", got=repr(fmt), fix=f"set data.format to one of {list(FORMATS)}", kind=ValueError)
    if reasoning not in REASONING:
        raise problem(f"data.reasoning must be one of {REASONING}", got=repr(reasoning), fix="pick one", kind=ValueError)
    roles = _role_map(role_map)
    if fmt == "text":
        return [{"role": "text", "content": _text_field(row, "text", blank="empty")}]
    if fmt in ("sharegpt", "messages"):
        col = next((c for c in CONVERSATION_COLUMNS if c in row), None)
        if col is None:
            raise RowError("missing_field", f"row has none of {list(CONVERSATION_COLUMNS)}: {sorted(row)}")
        messages = _turns(row[col], col, roles, reasoning=reasoning, stats=stats)
        head = row.get("system")  # LLaMA-Factory's ShareGPT keeps the system prompt in its own column
        if isinstance(head, str) and head.strip() and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": head})
    elif fmt == "alpaca":
        instruction, extra = _text_field(row, "instruction"), _text_field(row, "input", required=False)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        answer = _text_field(row, "output")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    else:  # prompt_completion: plain strings or TRL's conversational lists of messages
        for field in ("prompt", "completion"):
            if field not in row:
                raise RowError("missing_field", f"row has no field '{field}' (fields: {sorted(row)})")
        messages = _turns(row["prompt"], "prompt", roles, "user", reasoning, stats)
        messages += _turns(row["completion"], "completion", roles, "assistant", reasoning, stats)
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


# Fields of a stored message (the processed dataset's `messages` column): tool_calls as JSON text.
RECORD_FIELDS = ("role", "content", "tool_calls", "reasoning_content", "name", "tool_call_id")


def to_record(messages: list[dict]) -> list[dict]:
    """Return messages in the processed dataset's fixed layout (RECORD_FIELDS; absent ones None)."""
    return [
        {
            k: (json.dumps(m[k], ensure_ascii=False) if k == "tool_calls" and m.get(k) else m.get(k))
            for k in RECORD_FIELDS
        }
        for m in messages
    ]


def from_record(messages: list[dict]) -> list[dict]:
    """Return stored messages as a chat template takes them: absent fields left out, tool_calls decoded."""
    out = []
    for m in messages:
        msg = {k: v for k, v in m.items() if v is not None}
        if isinstance(msg.get("tool_calls"), str):
            msg["tool_calls"] = json.loads(msg["tool_calls"])
        out.append(msg)
    return out


def tool_names(tools: list[dict] | None) -> list[str]:
    """Return the function names of a standardized tool list."""
    return [t["function"]["name"] for t in tools or []]


def call_text(calls: list[dict]) -> str:
    """Return tool calls as JSON lines {"name": ..., "arguments": {...}} (the reference a tool metric compares)."""
    return "\n".join(
        json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
        for c in calls
    )


def _reasoning_field(tokenizer) -> str | None:
    """Return the message field this template reads a thinking trace from ('reasoning_content', 'thinking'), or None."""
    template = tokenizer.get_chat_template()
    if "reasoning_content" in template:
        return "reasoning_content"
    if re.search(r"message\.thinking|message\[['\"]thinking['\"]\]|['\"]thinking['\"] in message", template):
        return "thinking"
    return None


def template_messages(tokenizer, messages: list[dict]) -> list[dict]:
    """Return messages with each thinking trace where this template expects it: its field, else a <think> block."""
    field, out = None, []
    for m in messages:
        trace = m.get("reasoning_content")
        if trace:
            field = field or _reasoning_field(tokenizer) or "content"
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            if field == "content":  # a template that knows no trace field: the trace leads the answer
                m["content"] = f"<think>\n{trace}\n</think>\n\n" + m["content"]
            else:
                m[field] = trace
        out.append(m)
    return out


_PROBE_TOOLS = [
    {"type": "function", "function": {"name": n, "description": f"Probe tool {n}.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for n in ("lab_probe_weather", "lab_probe_clock")
]  # fmt: skip


def tool_support(tokenizer) -> str | None:
    """Return None when the chat template renders tools, tool calls and tool results; else what it cannot do."""
    messages = [
        {"role": "user", "content": "Weather in Zqville?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "lab_probe_weather", "arguments": {"city": "Zqville"}}}]},
        {"role": "tool", "content": "lab-probe-result: 21 C", "name": "lab_probe_weather"},
        {"role": "assistant", "content": "It is 21 C."},
    ]  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(messages, tools=_PROBE_TOOLS, tokenize=False)
    except Exception as e:  # the template is code: whatever it raises means it cannot take this chat
        return f"it raises {type(e).__name__} on a chat with tools ({str(e)[:80]})"
    if "lab_probe_clock" not in text:
        return "it drops the tool list (tools=) without a word"
    if "Zqville\"" not in text and "Zqville'" not in text:
        return "it drops the assistant's tool calls"
    if "lab-probe-result" not in text:
        return "it drops the tool results"
    return None


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


def _render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """Return the conversation rendered by the tokenizer's chat template, or raise RowError(template_rejected)."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
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


def _plain(m: dict) -> bool:
    """Return True for an assistant turn that is only content (no tool calls, no trace in a field of its own)."""
    return m["role"] == "assistant" and not m.get("tool_calls") and not m.get("reasoning_content") and not m.get("thinking")


def _content_spans(
    tokenizer, messages: list[dict], text: str, tools: list[dict] | None = None
) -> list[tuple[int, int]] | None:
    """Return the character span of each plain assistant content in `text`, or None if they cannot be located."""
    asst = [m["content"] for m in messages if _plain(m)]
    marked, k = [], 0
    for m in messages:
        if _plain(m):
            m, k = {**m, "content": _SENTINEL.format(k)}, k + 1
        marked.append(m)
    try:
        parts = _SENTINEL_RE.split(tokenizer.apply_chat_template(marked, tools=tools, tokenize=False))
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
        if m["role"] == "assistant" and not _plain(m):
            continue  # located by _structured_spans
        for cand in dict.fromkeys((m["content"], m["content"].strip())):
            at = text.find(cand, cursor) if m["role"] != "system" and cand else -1
            if at >= 0:
                cursor = at + len(cand)
                if m["role"] == "assistant":
                    spans.append((at, cursor))
                break
        else:
            if m["role"] == "assistant":
                return None
    return spans


def _structured_spans(
    tokenizer, messages: list[dict], text: str, tools: list[dict] | None = None
) -> list[tuple[int, int]] | None:
    """Return the span of each assistant turn with tool calls or a trace field in `text`, or None if one cannot be found.

    The turn is rendered again as a plain sentinel answer (twice, with sentinels that differ in their first
    and last characters); the text before the first and after the last difference is the template's own,
    so what lies between is what the turn itself wrote: its trace, content and tool calls, as rendered.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or _plain(m):
            continue
        for cut in (False, True):  # the whole chat, else the chat up to this turn (gpt-oss wants a call before a result)
            try:
                ref = _render(tokenizer, messages[: i + 1], tools) if cut else text
                heads, tails = [], []
                for sentinel in (_SENTINEL.format("turn"), "##lab_utils.chat.turn##"):
                    alt = [*messages[:i], {"role": "assistant", "content": sentinel}, *messages[i + 1 :] * (not cut)]
                    other = tokenizer.apply_chat_template(alt, tools=tools, tokenize=False)
                    heads.append(len(os.path.commonprefix([ref, other])))
                    tails.append(len(os.path.commonprefix([ref[::-1], other[::-1]])))
                break
            except Exception:
                if cut:
                    return None
        a = min(heads)  # one sentinel may share a first or last character with the turn; the other does not
        b = len(ref) - min(min(tails), len(ref) - a)
        if cut and not text.startswith(ref[:b]):
            return None  # the turn reads otherwise in the whole chat
        if a >= b and m.get("tool_calls"):
            raise RowError(
                "tools_not_rendered",
                f"the chat template writes nothing of assistant turn {i} (its tool calls); "
                "fix: use a model whose chat template takes tools",
            )
        if a >= b:
            return None  # the template writes nothing of this turn
        spans.append((a, b))
    return spans


def _generation_spans(
    tokenizer, messages: list[dict], text: str, enc, tools: list[dict] | None = None
) -> list[tuple[int, int]]:
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
            tools=tools,
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
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
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


def _assistant_mask(tokenizer, messages: list[dict], text: str, enc, tools: list[dict] | None = None) -> list[int]:
    """Return the assistant mask over the tokens of `enc`, the encoding of the rendered `text` (module docstring)."""
    offsets = list(enc["offset_mapping"])
    spans = _content_spans(tokenizer, messages, text, tools)
    structured = _structured_spans(tokenizer, messages, text, tools) if spans is not None else None
    spans = sorted(spans + structured) if spans is not None and structured is not None else None
    if _GENERATION_TAG.search(tokenizer.get_chat_template()):
        gen = _generation_spans(tokenizer, messages, text, enc, tools)
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


def _check_tools_rendered(text: str, messages: list[dict], tools: list[dict] | None) -> None:
    """Raise RowError(tools_not_rendered) when a tool or a call's function name is missing from the rendered text."""
    calls = [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]
    missing = [n for n in dict.fromkeys(tool_names(tools) + calls) if n not in text]
    if missing:
        raise RowError(
            "tools_not_rendered",
            f"the chat template wrote no trace of {', '.join(map(repr, missing[:3]))}; "
            "fix: use a model whose chat template takes tools",
        )


def tokenize_chat(
    tokenizer,
    messages: list[dict],
    max_length: int | None = None,
    on_too_long: str = "drop",
    tools: list[dict] | None = None,
) -> dict:
    """Return {'input_ids', 'assistant_masks'} (same length) for standardized messages (and tools), or raise RowError.

    Tool calls and thinking traces are the assistant's and carry loss; tool results, the tool list
    (written by the template, usually into the system turn) and user turns do not.
    """
    if on_too_long not in ("drop", "truncate"):
        raise problem("on_too_long must be 'drop' or 'truncate'", got=repr(on_too_long), fix="pick one", kind=ValueError)
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
            raise problem("Tokenizer has no chat_template", got="None", fix="call ensure_chat_template(tokenizer) first",
                          kind=ValueError)
        if not getattr(tokenizer, "is_fast", False):
            raise problem("tokenize_chat needs character offsets", got=f"the slow tokenizer {type(tokenizer).__name__}",
                          fix="load a fast tokenizer (AutoTokenizer.from_pretrained(name), the transformers 5 default)",
                          kind=ValueError)
        messages = template_messages(tokenizer, messages)
        text = _render(tokenizer, messages, tools)
        _check_tools_rendered(text, messages, tools)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = _assistant_mask(tokenizer, messages, text, enc, tools)
        if not any(mask):
            raise RowError("no_assistant_turn", "no token of the rendered chat belongs to an assistant turn")
    if max_length is not None and len(ids) > max_length:
        if on_too_long == "drop":
            raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            raise RowError("too_long", f"no assistant token survives truncation to max_length {max_length}")
    return {"input_ids": ids, "assistant_masks": mask}
