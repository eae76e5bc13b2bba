"""Tool-calling and reasoning data as a specification: both common shapes in, calls trained, results not.

Tokenizers only (no model): the embedded SentencePiece tokenizer with the lab's ChatML-with-tools template,
and test_chat's byte-level BPE wrapped with verbatim copies of real templates with tool support
(Qwen 2.5, Qwen 2.5 with `{% generation %}` markers, Qwen 3, Llama 3.1, gpt-oss — tests/fixtures/chat_templates).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_chat import byte_level, masked_runs, wrap  # noqa: F401 — byte_level is a fixture used by name

from lab_utils import chat
from lab_utils.chat import (
    RowError,
    describe_tools,
    standardize,
    standardize_tools,
    tokenize_chat,
    tool_support,
)
from lab_utils.config import resolve_config
from lab_utils.data import prepare
from lab_utils.embedded import EMBEDDED_TOOLS, TOOLS_ROWS, resolve_data, tokenizer_dir, tool_rows
from lab_utils.errors import LabError
from lab_utils.evaluation import (
    metric_kind,
    parse_tool_calls,
    prompt_and_reference,
    render_prompt,
    task_metrics,
)
from lab_utils.run import Run

TOOL_SCHEMAS = [
    {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "get_time", "description": "Clock of a town",
     "parameters": {"type": "object", "properties": {"town": {"type": "string"}}, "required": ["town"]}},
]  # fmt: skip
QUESTION, RESULT, ANSWER = "What is the weather in Paris?", '{"sky": "sunny", "temp": 21}', "It is sunny in Paris."
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def sharegpt_row(i: int = 0, reasoning: bool = False) -> dict:
    """Return a LLaMA-Factory (glaive-style) ShareGPT row: function_call/observation turns, tools as JSON text."""
    answer = f"<think>The tool says sunny {i}.</think>{ANSWER}" if reasoning else ANSWER
    return {
        "conversations": [
            {"from": "human", "value": f"{QUESTION} ({i})"},
            {"from": "function_call", "value": json.dumps(CALL)},
            {"from": "observation", "value": RESULT},
            {"from": "gpt", "value": answer},
        ],
        "system": "You may use tools.",
        "tools": json.dumps(TOOL_SCHEMAS),
    }


def openai_row(i: int = 0, reasoning: bool = False) -> dict:
    """Return an OpenAI/TRL messages row: tool_calls (arguments as JSON text) on the assistant, a role tool result."""
    final = {"role": "assistant", "content": ANSWER}
    if reasoning:
        final["reasoning_content"] = f"The tool says sunny {i}."
    call = {"id": "call_1", "type": "function",
            "function": {"name": CALL["name"], "arguments": json.dumps(CALL["arguments"])}}  # fmt: skip
    return {
        "messages": [
            {"role": "user", "content": f"{QUESTION} ({i})"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": RESULT, "tool_call_id": "call_1", "name": "get_weather"},
            final,
        ],
        "tools": [{"type": "function", "function": t} for t in TOOL_SCHEMAS],
    }


SHAPES = {"sharegpt": sharegpt_row, "messages": openai_row}

# family: (bos, eos, what the template writes for the call turn as trained, end of the final answer)
FAMILIES = {
    "qwen2_5": (None, "<|im_end|>",
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                "<|im_end|>"),
    "qwen2_5_training": (None, "<|im_end|>",
                         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                         "<|im_end|>"),
    "qwen3": (None, "<|im_end|>",
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
              "<|im_end|>"),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>",
                 '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "<|eot_id|>"),
    # harmony: after '<|start|>assistant' the model writes the recipient, channel and arguments, then <|call|>
    "gptoss": ("<|startoftext|>", "<|return|>",
               ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>', "<|return|>"),
}  # fmt: skip
CHATML_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'


@pytest.fixture(scope="module")
def embedded_tok():
    """The embedded tokenizer: its ChatML template renders tools, tool calls and thinking traces."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


@pytest.fixture(params=sorted(FAMILIES))
def family(request, byte_level):  # noqa: F811
    """Return (name, tokenizer, call turn as trained, end of turn) for each real template with tool support."""
    bos, eos, call, eot = FAMILIES[request.param]
    return request.param, wrap(byte_level, request.param, bos, eos), call, eot


def standardized(shape: str, reasoning: str = "keep", with_trace: bool = False) -> tuple[list[dict], list[dict]]:
    row = SHAPES[shape](0, with_trace)
    return standardize(row, shape, reasoning=reasoning), standardize_tools(row["tools"])


# ------------------------------------------------------------------------------------------ standardizing


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_both_shapes_standardize_to_the_same_tool_call_messages(shape):
    messages, tools = standardized(shape)
    assert [m["role"] for m in messages] == (["system"] if shape == "sharegpt" else []) + [
        "user", "assistant", "tool", "assistant"]  # fmt: skip
    call_turn = messages[-3]
    assert call_turn["content"] == ""
    assert [c["function"] for c in call_turn["tool_calls"]] == [CALL]  # arguments parsed to a dict
    assert messages[-2]["content"] == RESULT and messages[-1]["content"] == ANSWER
    assert [t["function"] for t in tools] == TOOL_SCHEMAS and all(t["type"] == "function" for t in tools)


def test_detection_says_which_tool_shape_it_saw():
    sharegpt = describe_tools(["conversations", "system", "tools"], [sharegpt_row()])
    openai = describe_tools(["messages", "tools"], [openai_row()])
    assert "function_call/observation" in sharegpt and "JSON text" in sharegpt
    assert "tool_calls" in openai and "role 'tool'" in openai and "of lists" in openai
    assert describe_tools(["messages"], [{"messages": [{"role": "user", "content": "hi"}]}]) is None


def test_arrow_padding_of_tool_schemas_and_arguments_is_removed():
    """datasets gives every dict every key seen in the file, as None: those must not reach the template."""
    tools = standardize_tools([{"type": "function", "function": {**TOOL_SCHEMAS[0], "strict": None,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "town": None}}}}])  # fmt: skip
    assert tools[0]["function"]["parameters"]["properties"] == {"city": {"type": "string"}}
    assert "strict" not in tools[0]["function"]
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"city": "Oslo", "town": None}}}]}]}  # fmt: skip
    assert standardize(row, "messages")[-1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


@pytest.mark.parametrize(
    "value, reason",
    [('{"name": "f", "arguments": {"x": 1}', "bad_tool_call"), ('{"arguments": {}}', "bad_tool_call"),
     ('{"name": "f", "arguments": "[1, 2]"}', "bad_tool_call")],
)  # fmt: skip
def test_malformed_function_call_drops_the_row_with_a_reason(value, reason):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": value}]}
    with pytest.raises(RowError) as err:
        standardize(row, "sharegpt")
    assert err.value.reason == reason


def test_malformed_tools_column_drops_the_row_with_a_reason():
    with pytest.raises(RowError) as err:
        standardize_tools('[{"name": "f"')
    assert err.value.reason == "bad_tools"
    assert standardize_tools("") is None and standardize_tools("[]") is None and standardize_tools(None) is None


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_tool_call_turns_train_and_tool_results_tools_and_user_turns_do_not(family, shape):
    name, tok, call, eot = family
    messages, tools = standardized(shape)
    out = tokenize_chat(tok, messages, tools=tools)
    text = tok.decode(out["input_ids"])
    assert "get_time" in text and "Clock of a town" in text  # the template wrote the tool list
    assert masked_runs(tok, out) == [call, ANSWER + eot]
    masked = "".join(masked_runs(tok, out))
    for unlearned in (RESULT, "Clock of a town", "get_time", QUESTION, "You may use tools."):
        assert unlearned not in masked


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_embedded_template_trains_calls_and_answers_only(embedded_tok, shape):
    messages, tools = standardized(shape)
    out = tokenize_chat(embedded_tok, messages, tools=tools)
    runs = [r.strip() for r in masked_runs(embedded_tok, out)]
    assert runs == [CHATML_CALL, ANSWER + "<|im_end|>"]
    assert "get_time(town: string): Clock of a town" in embedded_tok.decode(out["input_ids"])


def test_parallel_calls_in_one_turn_are_one_trained_run(byte_level):  # noqa: F811
    tok = wrap(byte_level, "qwen2_5", None, "<|im_end|>")
    second = {"name": "get_time", "arguments": {"town": "Lyon"}}
    row = sharegpt_row()
    row["conversations"][1]["value"] = json.dumps([CALL, second])
    out = tokenize_chat(tok, standardize(row, "sharegpt"), tools=standardize_tools(row["tools"]))
    assert masked_runs(tok, out)[0] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"town": "Lyon"}}\n</tool_call><|im_end|>'
    )


# ------------------------------------------------------------------------------------------ refusal


@pytest.mark.parametrize("template, bos, eos", [("llama3", "<|begin_of_text|>", "<|eot_id|>"),
                                                ("phi3", None, "<|endoftext|>")])  # fmt: skip
def test_template_that_drops_tools_is_named_and_no_row_trains_without_them(byte_level, template, bos, eos):  # noqa: F811
    tok = wrap(byte_level, template, bos, eos)
    assert "drops the tool list" in tool_support(tok)
    messages, tools = standardized("messages")
    with pytest.raises(RowError) as err:
        tokenize_chat(tok, messages, tools=tools)
    assert err.value.reason == "tools_not_rendered" and "get_weather" in err.value.detail


def test_templates_with_tool_support_pass_the_probe(family, embedded_tok):
    assert tool_support(family[1]) is None
    assert tool_support(embedded_tok) is None


@pytest.mark.parametrize("data_format", ["auto", "messages"])
def test_tool_data_with_a_template_without_tools_stops_in_one_line_naming_it_and_the_fix(
    byte_level, tmp_path, lab_root, data_format  # noqa: F811
):
    tok = wrap(byte_level, "llama3", "<|begin_of_text|>", "<|eot_id|>")
    rows = [openai_row(i) for i in range(6)]
    run = make_run(lab_root, write_rows(tmp_path, rows), name="refused", format=data_format)
    with pytest.raises(LabError) as err:
        prepare(run, tok)
    msg = str(err.value)
    assert "\n" not in msg and "'embedded:tiny-llama'" in msg and "drops the tool list" in msg
    assert "Qwen" in msg and "model.tokenizer" in msg
    assert not (run.data_dir / "dataset").exists()


# ------------------------------------------------------------------------------------------ reasoning


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_reasoning_keep_puts_the_trace_where_each_template_expects_it_and_trains_it(shape, byte_level, embedded_tok):  # noqa: F811
    messages, tools = standardized(shape, "keep", with_trace=True)
    assert messages[-1]["reasoning_content"] == "The tool says sunny 0." and messages[-1]["content"] == ANSWER
    qwen3 = wrap(byte_level, "qwen3", None, "<|im_end|>")  # reads reasoning_content itself
    llama = wrap(byte_level, "llama3_1", "<|begin_of_text|>", "<|eot_id|>")  # knows no trace field: inline <think>
    cases = [(qwen3, "The tool says sunny 0.\n</think>\n\n" + ANSWER + "<|im_end|>"),
             (llama, "<think>\nThe tool says sunny 0.\n</think>\n\n" + ANSWER + "<|eot_id|>"),
             (embedded_tok, "<think>\nThe tool says sunny 0.\n</think>\n\n" + ANSWER + "<|im_end|>")]  # fmt: skip
    for tok, last_run in cases:
        out = tokenize_chat(tok, messages, tools=tools)
        assert masked_runs(tok, out)[-1].strip() == last_run


def test_gpt_oss_template_gets_the_trace_in_its_thinking_field(byte_level):  # noqa: F811
    tok = wrap(byte_level, "gptoss", "<|startoftext|>", "<|return|>")
    out = chat.template_messages(tok, [{"role": "assistant", "content": "A", "reasoning_content": "R"}])
    assert out == [{"role": "assistant", "content": "A", "thinking": "R"}]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_reasoning_drop_removes_fields_and_think_blocks(shape, embedded_tok):
    messages, tools = standardized(shape, "drop", with_trace=True)
    assert "reasoning_content" not in messages[-1] and messages[-1]["content"] == ANSWER
    text = embedded_tok.decode(tokenize_chat(embedded_tok, messages, tools=tools)["input_ids"])
    assert "sunny 0" not in text and "<think>" not in text
    stats: dict = {}
    standardize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                 "thinking": "t"}]}, "messages", reasoning="drop", stats=stats)  # fmt: skip
    assert stats == {"reasoning": 1}  # counted even when dropped


def test_unknown_reasoning_setting_is_a_config_error():
    with pytest.raises(LabError, match="data.reasoning"):
        resolve_config(form={"data.reasoning": "maybe"})


# ------------------------------------------------------------------------------------------ 01_data end to end


def make_run(root: Path, path: Path | str, name: str = "t", max_length: int = 512, **data) -> Run:
    form = {"run_name": name, "data.path": str(path), "model.max_length": max_length}
    form.update({f"data.{k}": v for k, v in data.items()})
    return Run(name=name, dir=root / name, cfg=resolve_config(form=form))


def write_rows(tmp: Path, rows: list[dict]) -> Path:
    path = tmp / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("template", ["embedded", "qwen2_5", "llama3_1"])
def test_01_data_reads_both_tool_shapes_end_to_end(shape, template, byte_level, embedded_tok, tmp_path, lab_root, capsys):  # noqa: F811
    if template == "embedded":
        tok, call, eot = embedded_tok, CHATML_CALL, "<|im_end|>"
    else:
        bos, eos, call, eot = FAMILIES[template]
        tok = wrap(byte_level, template, bos, eos)
    rows = [SHAPES[shape](i, reasoning=i % 2 == 0) for i in range(8)]
    rows.append({**SHAPES[shape](99), "tools": "[{oops" if shape == "sharegpt" else [{"description": "no name"}]})
    run = make_run(lab_root, write_rows(tmp_path, rows), max_length=512 if template == "embedded" else 2048)
    ds = prepare(run, tok)  # (the test BPE spends ~1 token per character on the real templates' tool prose)
    out = capsys.readouterr().out
    expected_shape = "function_call/observation" if shape == "sharegpt" else "tool_calls on assistant turns"
    assert f"Format: {shape} (" in out and expected_shape in out
    assert "Tool calling: 8 rows with tools, 8 tool calls" in out and "thinking traces in 4 rows" in out
    report = json.loads((run.data_dir / "data_report.json").read_text())
    assert report["dropped_by_reason"] == {"bad_tools": 1}
    assert report["tools"] == {
        "rows_with_tools": 8, "rows_with_tool_calls": 8, "tool_calls": 8, "tool_results": 8, "reasoning_rows": 4,
        "tool_calls_per_row": {"mean": 1.0, "max": 1}, "reasoning": "keep",
    }  # fmt: skip
    assert set(ds["train"].column_names) == {"input_ids", "assistant_masks", "messages", "tools"}
    for row in (r for split in ds.values() for r in split):
        assert [t["function"]["name"] for t in json.loads(row["tools"])] == ["get_weather", "get_time"]
        messages = chat.from_record(row["messages"])
        assert messages[-3]["tool_calls"][0]["function"] == CALL
        runs = [r.strip() for r in masked_runs(tok, row)]
        assert runs[0] == call.strip() and runs[-1].endswith(ANSWER + eot) and len(runs) == 2
        assert RESULT not in "".join(runs)


def test_01_data_with_reasoning_drop_counts_traces_and_trains_none(embedded_tok, tmp_path, lab_root):
    rows = [openai_row(i, reasoning=True) for i in range(6)]
    run = make_run(lab_root, write_rows(tmp_path, rows), reasoning="drop")
    ds = prepare(run, embedded_tok)
    report = json.loads((run.data_dir / "data_report.json").read_text())
    assert report["tools"]["reasoning_rows"] == 6 and report["tools"]["reasoning"] == "drop"
    assert all("sunny 0" not in embedded_tok.decode(r["input_ids"]) for s in ds.values() for r in s)
    assert all(m["reasoning_content"] is None for s in ds.values() for r in s for m in r["messages"])


# ------------------------------------------------------------------------------------------ embedded task


def test_embedded_tools_task_is_deterministic_and_prepares_whole(embedded_tok, lab_root, monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    assert tool_rows(20) == tool_rows(20)
    assert Path(resolve_data(EMBEDDED_TOOLS)).read_text().count("\n") == TOOLS_ROWS
    run = make_run(lab_root, EMBEDDED_TOOLS, limit=40)
    ds = prepare(run, embedded_tok)
    report = json.loads((run.data_dir / "data_report.json").read_text())
    assert report["rows_kept"] == 40 and report["tools"]["rows_with_tools"] == 40
    assert report["tools"]["tool_results"] > 0 and report["length_stats"]["max"] <= 512
    for row in ds["validation"]:  # every row ends on the call the model should make: 03 can score it
        prompt, reference = prompt_and_reference(row["messages"])
        assert parse_tool_calls(reference) and prompt[-1]["role"] == "user"


def test_misspelt_embedded_dataset_names_both_built_ins():
    with pytest.raises(LabError, match="'embedded:pricer', 'embedded:tools'"):
        resolve_config(form={"data.path": "embedded:tool"})


# ------------------------------------------------------------------------------------------ 03 evaluation


def test_tool_call_reference_is_the_structured_call_and_the_prompt_renders_tools(embedded_tok):
    messages, tools = standardized("messages")
    record = chat.to_record(messages[:2])  # ends on the call
    prompt, reference = prompt_and_reference(record)
    assert parse_tool_calls(reference) == [CALL] and json.loads(reference) == CALL
    text = render_prompt(embedded_tok, prompt, tools)
    assert "get_weather(city: string)" in text and text.endswith("<|im_start|>assistant\n")


def test_tool_call_metric_is_exact_match_on_name_and_parsed_arguments():
    ref = json.dumps(CALL)
    preds = [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',  # same call
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.1's spelling
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',  # arguments as JSON text
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon"}}</tool_call>',  # wrong argument
        '<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>',  # wrong function
        "It is sunny.",  # no call
    ]
    out = task_metrics(preds, [ref] * len(preds), "tool_call")
    assert out == {"tool_call_match": 3 / 6, "tool_call_parsed": 5 / 6}
    assert metric_kind({"eval": {"metric": "auto"}}, [ref, ref]) == "tool_call"
    assert metric_kind({"eval": {"metric": "auto"}}, [ref, "plain"]) == "exact_match"


def test_template_that_drops_the_calls_themselves_is_refused_and_the_row_dropped(byte_level):  # noqa: F811
    drops_calls = (
        "{%- if tools %}{{ '<|im_start|>system\\n' }}{%- for t in tools %}{{ t | tojson }}{%- endfor %}"
        "{{ '<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    )  # renders the tool list, but an assistant turn is its content only
    tok = wrap(byte_level, None, None, "<|im_end|>")
    tok.chat_template = drops_calls
    assert tool_support(tok) == "it drops the assistant's tool calls"
    messages, tools = standardized("messages")
    with pytest.raises(RowError) as err:
        tokenize_chat(tok, messages, tools=tools)
    assert err.value.reason == "tools_not_rendered" and "assistant turn 1" in err.value.detail


def test_tokenizer_without_template_gets_the_default_chatml_that_takes_tools(byte_level):  # noqa: F811
    tok = wrap(byte_level, None, None, "<|im_end|>")
    assert chat.ensure_chat_template(tok) and tool_support(tok) is None
    messages, tools = standardized("sharegpt")
    out = tokenize_chat(tok, messages, tools=tools)
    assert masked_runs(tok, out) == [CHATML_CALL, ANSWER + "<|im_end|>"]


def test_generations_show_a_tool_call_answer_as_the_call_it_makes():
    from lab_utils.evaluation import _shown_call

    assert _shown_call('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>') == CALL
    assert _shown_call(json.dumps(CALL) + "\n" + json.dumps(CALL)) == [CALL, CALL]
    assert _shown_call("It is sunny.") == "It is sunny."
