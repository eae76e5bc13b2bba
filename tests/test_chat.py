"""Specification of lab_utils.chat: data formats, row validation, and the assistant-only loss mask.

No model hub: the tokenizers are trained here in milliseconds on a generated corpus (a byte-level BPE like
Llama 3 / Qwen, and a SentencePiece-style `▁` BPE like Llama-2 / Mistral / Gemma / Phi-3), wrapped as
transformers fast tokenizers, and given verbatim copies of the real chat templates (tests/fixtures/chat_templates).
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, PythonBackend

from lab_utils import chat
from lab_utils.chat import RowError, detect_format, ensure_chat_template, standardize, tokenize_chat

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SPECIAL = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<bos>", "<eos>",
    "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|startoftext|>",
    "<|start|>", "<|channel|>", "<|message|>", "<|return|>", "<|call|>",
]  # fmt: skip
WORDS = (
    "the a an of to and is in it you that for on with as this be are at by what why how which when hello there "
    "sure thing answer question capital france paris sky blue light scatter explain please thanks model user "
    "assistant system python code list number two three four seven yes no maybe because sunlight shorter "
    "wavelengths more strongly than red ones"
).split()


def corpus() -> list[str]:
    """Return ~400 generated lines (spaces, newlines, punctuation) so BPE learns merges across them."""
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ":", "\n", "\n\n", " 42.", " (x)"]))
    return lines


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """Return a byte-level BPE (GPT-2 regex, Llama 3 / Qwen style) trained on the corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


@pytest.fixture(scope="module")
def base_byte_level() -> Tokenizer:
    """Return a byte-level BPE of a base model: ChatML markers are not tokens, they split into pieces."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    """Return a SentencePiece-style BPE: spaces become a `▁` prefix of the next piece, '\\n' is its own piece."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace = {"replacement": "▁", "prepend_scheme": "first", "split": True}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(**metaspace)]
    )
    tok.decoder = decoders.Metaspace(**metaspace)
    alphabet = list(string.printable.replace(" ", "▁"))
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def wrap(backend: Tokenizer, template: str | None, bos: str | None, eos: str) -> PreTrainedTokenizerFast:
    """Return a transformers fast tokenizer over a copy of `backend` with the named fixture template (or a literal)."""
    copy = Tokenizer.from_str(backend.to_str())
    if bos is not None:  # like the real Llama / Gemma tokenizers: plain encoding adds BOS by itself
        copy.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, copy.token_to_id(bos))]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=copy,
        bos_token=bos, eos_token=eos, unk_token="<unk>", clean_up_tokenization_spaces=False,
    )  # fmt: skip
    if template is not None:
        path = TEMPLATES / f"{template}.jinja"
        tok.chat_template = path.read_text() if path.exists() else template
    return tok


# name: backend fixture, bos, eos, end-of-turn text the template writes after assistant content (mid-chat, last
# turn), whether the template strips content
STYLES = {
    "gptoss": ("byte_level", "<|startoftext|>", "<|return|>", ("<|end|>", "<|return|>"), False),
    "llama3": ("byte_level", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", True),
    "llama3_1": ("byte_level", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", True),
    "qwen2_5": ("byte_level", None, "<|im_end|>", "<|im_end|>", False),
    "qwen2_5_training": ("byte_level", None, "<|im_end|>", "<|im_end|>", False),
    "chatml_generation_content_only": ("byte_level", None, "<|im_end|>", "<|im_end|>", False),
    "phi3": ("sentencepiece", "<s>", "<|endoftext|>", "<|end|>", False),
    "mistral_v3": ("sentencepiece", "<s>", "</s>", "</s>", False),
    "llama2": ("sentencepiece", "<s>", "</s>", " </s>", True),
    "gemma": ("sentencepiece", "<bos>", "<eos>", "<end_of_turn>", True),
}
SYSTEM = "You answer briefly: one or two sentences."
USER1, USER2 = "What is the capital of France?", "Why is the sky blue? Explain please."
ASSISTANT1 = "Paris is the capital.\nThanks for asking!"
ASSISTANT2 = " Because sunlight scatter: shorter wavelengths more strongly than red ones (x). "


def conversation(with_system: bool = True) -> list[dict]:
    """Return a system + two user/assistant exchanges conversation (second answer has edge whitespace)."""
    turns = [
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": ASSISTANT1},
        {"role": "user", "content": USER2},
        {"role": "assistant", "content": ASSISTANT2},
    ]
    return ([{"role": "system", "content": SYSTEM}] if with_system else []) + turns


@pytest.fixture(params=sorted(STYLES))
def style(request, byte_level, sentencepiece):
    """Return (name, tokenizer, end-of-turn text, strips) for each real template style."""
    backend_name, bos, eos, eot, strips = STYLES[request.param]
    backend = byte_level if backend_name == "byte_level" else sentencepiece
    return request.param, wrap(backend, request.param, bos, eos), eot, strips


def expected_runs(answers: list[str], eot: str | tuple[str, str], strips: bool) -> list[str]:
    """Return what each masked run must decode to (stripped): the answer (as rendered) + its end-of-turn."""
    mid, last = eot if isinstance(eot, tuple) else (eot, eot)
    ends = [mid] * (len(answers) - 1) + [last]
    return [((a.strip() if strips else a) + end).strip() for a, end in zip(answers, ends, strict=True)]


def masked_runs(tok, out: dict) -> list[str]:
    """Return the decoded text of each maximal run of masked-in tokens."""
    runs, current = [], []
    for token_id, bit in zip(out["input_ids"], out["assistant_masks"], strict=True):
        if bit:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tok.decode(run) for run in runs]


def unmasked_text(tok, out: dict) -> str:
    """Return the decoded text of every masked-out token."""
    return tok.decode([i for i, bit in zip(out["input_ids"], out["assistant_masks"], strict=True) if not bit])


# ------------------------------------------------------------------------------------ mask, every template


def test_mask_covers_each_assistant_content_and_end_of_turn_for_every_template(style):
    name, tok, eot, strips = style
    messages = conversation(with_system=name != "gemma")
    out = tokenize_chat(tok, messages)
    assert len(out["input_ids"]) == len(out["assistant_masks"])
    assert [run.strip() for run in masked_runs(tok, out)] == expected_runs(
        [ASSISTANT1, ASSISTANT2], eot, strips
    )


def test_user_system_text_and_role_headers_are_never_masked_in(style):
    name, tok, _, _ = style
    messages = conversation(with_system=name != "gemma")
    out = tokenize_chat(tok, messages)
    masked = "".join(masked_runs(tok, out))
    headers = (
        "assistant",
        "model",
        "[INST]",
        "<|start|>",
        "<|message|>",
        "<|im_start|>",
        "<|start_header_id|>",
    )
    for text in (USER1, USER2, SYSTEM, "capital of France?", "Explain please") + headers:
        assert text not in masked
    rest = unmasked_text(tok, out)
    for text in (USER1, USER2) + ((SYSTEM,) if name not in ("gemma", "mistral_v3") else ()):
        assert text in rest  # Mistral v3 only shows the system prompt when the chat ends on a user turn


def test_input_ids_are_exactly_what_the_template_gives_at_inference(style):
    name, tok, _, _ = style
    messages = conversation(with_system=name != "gemma")
    reference = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenize_chat(tok, messages)["input_ids"] == list(reference)


def test_template_bos_appears_once_and_is_not_masked(style):
    _, tok, _, _ = style
    out = tokenize_chat(tok, conversation(with_system=False)[:2])
    if tok.bos_token and tok.bos_token in tok.apply_chat_template(conversation(False)[:2], tokenize=False):
        assert out["input_ids"][0] == tok.bos_token_id and out["assistant_masks"][0] == 0
        assert out["input_ids"].count(tok.bos_token_id) == 1  # no second BOS from the tokenizer


def test_single_turn_answer_is_masked_with_its_end_of_turn(style):
    _, tok, eot, strips = style
    out = tokenize_chat(tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}])
    assert [run.strip() for run in masked_runs(tok, out)] == expected_runs(["yes"], eot, strips)


def test_short_answers_that_also_appear_in_role_headers_are_masked_in_their_own_turn(style):
    name, tok, eot, strips = style
    header_word = {"gemma": "model", "llama2": "INST", "mistral_v3": "INST", "phi3": "assistant"}.get(
        name, "assistant"
    )
    messages = [
        {"role": "user", "content": f"Say {header_word}."},
        {"role": "assistant", "content": header_word},
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "user"},
    ]
    out = tokenize_chat(tok, messages)
    assert [run.strip() for run in masked_runs(tok, out)] == expected_runs([header_word, "user"], eot, strips)


# ------------------------------------------------------------------------------ mask, specific behaviours


def test_mask_covers_assistant_content_and_eot_for_llama3_template(byte_level):
    tok = wrap(byte_level, "llama3", "<|begin_of_text|>", "<|eot_id|>")
    out = tokenize_chat(tok, conversation())
    eot_id = tok.convert_tokens_to_ids("<|eot_id|>")
    masked_eots = [
        i
        for i, (t, m) in enumerate(zip(out["input_ids"], out["assistant_masks"], strict=True))
        if t == eot_id and m
    ]
    all_eots = [i for i, t in enumerate(out["input_ids"]) if t == eot_id]
    assert len(all_eots) == 5 and len(masked_eots) == 2  # system, 2 user, 2 assistant turns
    assert masked_eots == [all_eots[2], all_eots[4]]


def test_boundary_token_merging_the_template_space_with_content_is_masked_in(sentencepiece):
    tok = wrap(sentencepiece, "mistral_v3", "<s>", "</s>")
    out = tokenize_chat(
        tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "thanks"}]
    )
    first = out["assistant_masks"].index(1)
    assert tok.convert_ids_to_tokens(out["input_ids"][first]) == "▁thanks"  # the '▁' is the template's space
    assert tok.convert_ids_to_tokens(out["input_ids"][first - 1]) == "[/INST]"


def test_token_rule_masks_in_only_tokens_mostly_inside_the_span():
    text = "Bot: Hi there\n\nok"
    span = [(5, 13)]  # "Hi there"
    offsets = [(0, 3), (3, 6), (6, 7), (7, 13), (13, 15), (4, 5), (8, 8), (2, 2), (15, 17)]
    # "Bot" out; ": H" 1 of 2 non-space chars inside (tie) -> out; "i" in; " there" in; "\n\n" outside -> out;
    # " " (whitespace-only, outside) out; zero-width at 8 (inside) in; zero-width at 2 out; "ok" out
    assert chat._token_mask(text, offsets, span) == [0, 0, 1, 1, 0, 0, 1, 0, 0]
    assert chat._token_mask("ab:Hi", [(1, 5)], [(3, 5)]) == [0]  # "b:Hi": 2 of 4 inside -> a tie is out
    assert chat._token_mask("b:Hi!", [(0, 5)], [(2, 5)]) == [1]  # 3 of 5 inside -> in
    assert chat._token_mask("x \n", [(1, 3)], [(1, 2)]) == [0]  # whitespace-only token half inside -> out


def test_generation_markers_with_end_of_turn_outside_are_extended_to_it(byte_level):
    tok = wrap(byte_level, "chatml_generation_content_only", None, "<|im_end|>")
    marker_only = tok.apply_chat_template(conversation(), return_dict=True, return_assistant_tokens_mask=True)
    assert tok.convert_tokens_to_ids("<|im_end|>") not in [
        t for t, m in zip(marker_only["input_ids"], marker_only["assistant_masks"], strict=True) if m
    ]  # transformers alone would not teach the model to stop
    out = tokenize_chat(tok, conversation())
    assert [r.strip() for r in masked_runs(tok, out)] == [
        ASSISTANT1 + "<|im_end|>",
        ASSISTANT2.strip() + " <|im_end|>",
    ]


def test_generation_markers_around_header_newlines_are_trimmed_to_content_and_eot(byte_level):
    tok = wrap(byte_level, "qwen2_5_training", None, "<|im_end|>")
    out = tokenize_chat(tok, conversation())
    runs = masked_runs(tok, out)
    assert runs[0] == ASSISTANT1 + "<|im_end|>"  # no '\n' from the header, none after <|im_end|>
    assert not runs[1].startswith("\n") and runs[1].endswith("<|im_end|>")


def test_generation_markers_that_wrap_the_role_header_still_mask_only_content_and_eot(byte_level):
    template = (
        "{% for m in messages %}{{ '<|im_start|>' }}{% if m.role == 'assistant' %}{% generation %}"
        "{{ 'assistant\\n' + m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.role + '\\n' + m.content"
        " + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    tok = wrap(byte_level, template, None, "<|im_end|>")
    out = tokenize_chat(tok, conversation())
    assert masked_runs(tok, out) == [ASSISTANT1 + "<|im_end|>", ASSISTANT2 + "<|im_end|>"]


def test_generation_markers_locate_assistant_text_the_template_rewrites(byte_level):
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}"
        "{% generation %}{{ m.content | upper }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>"
        "{% endif %}{{ '\n' }}{% endfor %}"
    )
    tok = wrap(byte_level, template, None, "<|im_end|>")
    out = tokenize_chat(
        tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "sure thing"}]
    )
    assert masked_runs(tok, out) == ["SURE THING<|im_end|>"]


def test_template_that_rewrites_content_without_markers_drops_the_row(byte_level):
    template = "{% for m in messages %}{{ m.role + ': ' + m.content | upper + eos_token }}{% endfor %}"
    tok = wrap(byte_level, template, None, "<|endoftext|>")
    with pytest.raises(RowError) as err:
        tokenize_chat(
            tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "sure thing"}]
        )
    assert err.value.reason == "template_rejected" and "generation" in err.value.detail


def test_template_whose_layout_depends_on_content_is_located_by_forward_search(byte_level):
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role }}{% if m.content | length > 30 %} (long){% endif %}"
        "{{ '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    )
    tok = wrap(byte_level, template, None, "<|im_end|>")
    long_answer = "Paris is the capital of France, thanks."
    out = tokenize_chat(
        tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": long_answer}]
    )
    assert masked_runs(tok, out) == [long_answer + "<|im_end|>"]


def test_template_without_end_of_turn_marker_masks_the_content_only(byte_level):
    template = "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
    tok = wrap(byte_level, template, None, "<|endoftext|>")
    out = tokenize_chat(tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}])
    assert [run.strip() for run in masked_runs(tok, out)] == [
        "yes"
    ]  # nothing to stop on: the template's choice


def test_eos_written_right_after_the_end_of_turn_is_masked_too(byte_level):
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' }}"
        "{% if loop.last %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    tok = wrap(byte_level, template, None, "<|endoftext|>")
    out = tokenize_chat(tok, conversation())
    assert masked_runs(tok, out) == [ASSISTANT1 + "<|im_end|>", ASSISTANT2 + "<|im_end|><|endoftext|>"]


def test_chatml_on_a_base_tokenizer_masks_the_whole_multi_token_end_marker(base_byte_level):
    tok = wrap(base_byte_level, "qwen2_5", None, "<|endoftext|>")
    out = tokenize_chat(tok, conversation())
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1  # not a token here
    assert masked_runs(tok, out) == [ASSISTANT1 + "<|im_end|>", ASSISTANT2 + "<|im_end|>"]
    assert "<|im_start|>" not in "".join(masked_runs(tok, out))


def test_gemma_template_rejects_a_system_turn_so_the_row_is_dropped(sentencepiece):
    tok = wrap(sentencepiece, "gemma", "<bos>", "<eos>")
    with pytest.raises(RowError) as err:
        tokenize_chat(tok, conversation(with_system=True))
    assert err.value.reason == "template_rejected"
    assert "System role not supported" in err.value.detail


def test_mistral_template_rejects_non_alternating_roles_so_the_row_is_dropped(sentencepiece):
    tok = wrap(sentencepiece, "mistral_v3", "<s>", "</s>")
    messages = [{"role": "user", "content": "hello"}, {"role": "user", "content": "there"}]
    with pytest.raises(RowError) as err:
        tokenize_chat(tok, messages + [{"role": "assistant", "content": "yes"}])
    assert err.value.reason == "template_rejected" and "alternate" in err.value.detail


# ---------------------------------------------------------------------------------------- length, text


def test_too_long_row_is_dropped_with_its_token_count(byte_level):
    tok = wrap(byte_level, "llama3", "<|begin_of_text|>", "<|eot_id|>")
    n = len(tokenize_chat(tok, conversation())["input_ids"])
    with pytest.raises(RowError) as err:
        tokenize_chat(tok, conversation(), max_length=n - 1)
    assert err.value.reason == "too_long" and err.value.detail == f"{n} tokens > max_length {n - 1}"
    assert (
        len(tokenize_chat(tok, conversation(), max_length=n)["input_ids"]) == n
    )  # exactly at the limit is kept


def test_too_long_row_is_truncated_when_asked_and_keeps_its_early_answer(byte_level):
    tok = wrap(byte_level, "llama3", "<|begin_of_text|>", "<|eot_id|>")
    full = tokenize_chat(tok, conversation())
    cut = full["assistant_masks"].index(1) + 3
    out = tokenize_chat(tok, conversation(), max_length=cut, on_too_long="truncate")
    assert (
        out["input_ids"] == full["input_ids"][:cut]
        and out["assistant_masks"] == full["assistant_masks"][:cut]
    )
    assert sum(out["assistant_masks"]) == 3


def test_truncation_that_removes_every_assistant_token_drops_the_row(byte_level):
    tok = wrap(byte_level, "llama3", "<|begin_of_text|>", "<|eot_id|>")
    first = tokenize_chat(tok, conversation())["assistant_masks"].index(1)
    with pytest.raises(RowError) as err:
        tokenize_chat(tok, conversation(), max_length=first, on_too_long="truncate")
    assert err.value.reason == "too_long"


def test_unknown_on_too_long_policy_is_a_config_error(byte_level):
    tok = wrap(byte_level, "llama3", "<|begin_of_text|>", "<|eot_id|>")
    with pytest.raises(ValueError, match="drop.*truncate"):
        tokenize_chat(tok, conversation(), max_length=5, on_too_long="cut")


def test_plain_text_rows_learn_every_token_and_end_with_eos(byte_level):
    tok = wrap(byte_level, None, None, "<|endoftext|>")
    messages = standardize({"text": "hello there, the sky is blue."}, "text")
    out = tokenize_chat(tok, messages, max_length=100)
    assert out["assistant_masks"] == [1] * len(out["input_ids"])
    assert out["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(out["input_ids"]) == "hello there, the sky is blue.<|endoftext|>"
    assert len(tokenize_chat(tok, messages, max_length=4, on_too_long="truncate")["input_ids"]) == 4


def test_chat_without_assistant_turn_has_nothing_to_learn(byte_level):
    tok = wrap(byte_level, "llama3", "<|begin_of_text|>", "<|eot_id|>")
    with pytest.raises(RowError) as err:
        tokenize_chat(tok, [{"role": "user", "content": "hello"}])
    assert err.value.reason == "no_assistant_turn"


def test_tokenizer_without_template_is_a_config_error_naming_the_fix(byte_level):
    tok = wrap(byte_level, None, None, "<|endoftext|>")
    with pytest.raises(ValueError, match="ensure_chat_template"):
        tokenize_chat(tok, conversation())


class CharTokenizer(PythonBackend):
    """A real (tiny) slow transformers tokenizer: one token per printable character."""

    def __init__(self, **kwargs):
        self.vocab = {c: i for i, c in enumerate(string.printable)}
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict:
        return dict(self.vocab, **self.added_tokens_encoder)

    def _tokenize(self, text, **kwargs):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return string.printable[index]


def test_slow_tokenizer_gets_an_error_telling_to_use_a_fast_one():
    tok = CharTokenizer(eos_token="</s>")
    assert ensure_chat_template(tok) is True
    with pytest.raises(ValueError, match="fast tokenizer") as err:
        tokenize_chat(tok, conversation())
    assert "CharTokenizer" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- default template


def test_default_template_is_set_only_when_missing_and_masks_answer_plus_eos(byte_level):
    tok = wrap(byte_level, None, None, "<|endoftext|>")
    assert ensure_chat_template(tok) is True
    assert tok.chat_template == chat.DEFAULT_CHAT_TEMPLATE
    assert ensure_chat_template(tok) is False
    out = tokenize_chat(tok, conversation())
    assert masked_runs(tok, out) == [ASSISTANT1 + "<|endoftext|>", ASSISTANT2 + "<|endoftext|>"]
    assert tok.apply_chat_template(conversation()[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_existing_template_is_left_alone(byte_level):
    tok = wrap(byte_level, "qwen2_5", None, "<|im_end|>")
    before = tok.chat_template
    assert ensure_chat_template(tok) is False and tok.chat_template == before


def test_default_template_needs_an_eos_token():
    with pytest.raises(ValueError, match="eos_token"):
        ensure_chat_template(CharTokenizer())


# ------------------------------------------------------------------------------------------ detect_format


@pytest.mark.parametrize(
    "columns, rows, fmt, reason_has",
    [
        (
            ["conversations"],
            [{"conversations": [{"from": "human", "value": "hi"}]}],
            "sharegpt",
            "from/value",
        ),
        (["messages"], [{"messages": [{"role": "user", "content": "hi"}]}], "messages", "role/content"),
        (
            ["conversations", "id"],
            [{"conversations": [{"role": "user", "content": "x"}]}],
            "messages",
            "conversations",
        ),
        (["conversations"], [{"conversations": []}], "sharegpt", "guessed"),
        (["instruction", "input", "output"], [{}], "alpaca", "'input'"),
        (["instruction", "output"], [{}], "alpaca", "'instruction'"),
        (["prompt", "completion"], [{"prompt": "a", "completion": "b"}], "prompt_completion", "'prompt'"),
        (
            ["prompt", "completion"],
            [{"prompt": [{"role": "user", "content": "a"}]}],
            "prompt_completion",
            "conversational",
        ),
        (["text", "meta"], [{"text": "hello"}], "text", "plain text"),
        (["messages", "text"], [{"messages": [{"role": "user", "content": "hi"}]}], "messages", "messages"),
    ],
)
def test_detect_format_recognises_each_layout(columns, rows, fmt, reason_has):
    got, reason = detect_format(columns, rows)
    assert got == fmt and reason_has in reason


def test_detect_format_names_the_columns_and_the_config_fix_when_nothing_fits():
    with pytest.raises(ValueError) as err:
        detect_format(["question", "answer"], [{"question": "q", "answer": "a"}])
    message = str(err.value)
    assert "['question', 'answer']" in message and "data.format" in message and "\n" not in message


# -------------------------------------------------------------------------------------------- standardize


def test_sharegpt_roles_are_mapped_to_user_assistant_system():
    row = {"conversations": [
        {"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
    ]}  # fmt: skip
    assert standardize(row, "sharegpt") == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]  # fmt: skip


def test_messages_keep_their_content_verbatim():
    row = {"messages": [{"role": "user", "content": " hi "}, {"role": "model", "content": "a\n b "}]}
    assert standardize(row, "messages") == [
        {"role": "user", "content": " hi "},
        {"role": "assistant", "content": "a\n b "},
    ]


def test_alpaca_joins_instruction_and_input_with_a_blank_line():
    row = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    assert standardize(row, "alpaca") == [
        {"role": "user", "content": "Translate.\n\nbonjour"}, {"role": "assistant", "content": "hello"},
    ]  # fmt: skip
    for empty_input in ("", "  ", None):
        got = standardize({"instruction": "Say hi.", "input": empty_input, "output": "hi"}, "alpaca")
        assert got[0] == {"role": "user", "content": "Say hi."}


def test_prompt_completion_accepts_strings_and_trl_conversational_lists():
    assert standardize({"prompt": "2+2?", "completion": "4"}, "prompt_completion") == [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
    ]  # fmt: skip
    row = {
        "prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    assert [m["role"] for m in standardize(row, "prompt_completion")] == ["system", "user", "assistant"]


def test_text_rows_become_a_single_text_turn():
    assert standardize({"text": "plain words"}, "text") == [{"role": "text", "content": "plain words"}]


def test_role_map_extends_the_default_map():
    row = {"conversations": [{"from": "Narrator", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    with pytest.raises(RowError) as err:
        standardize(row, "sharegpt")
    assert (
        err.value.reason == "unknown_role"
        and "'Narrator'" in err.value.detail
        and "role_map" in err.value.detail
    )
    got = standardize(row, "sharegpt", role_map={"narrator": "user"})
    assert [m["role"] for m in got] == ["user", "assistant"]  # gpt still maps via the default map


def test_role_map_target_outside_user_assistant_system_is_a_config_error():
    with pytest.raises(ValueError, match="role_map"):
        standardize(
            {"messages": [{"role": "user", "content": "x"}]}, "messages", role_map={"narrator": "narrator"}
        )


def test_system_prompt_is_prepended_only_when_the_row_has_none():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    got = standardize(row, "messages", system_prompt="Be kind.")
    assert got[0] == {"role": "system", "content": "Be kind."} and len(got) == 3
    row["messages"].insert(0, {"role": "system", "content": "Own prompt."})
    assert standardize(row, "messages", system_prompt="Be kind.")[0]["content"] == "Own prompt."
    alpaca = standardize({"instruction": "hi", "output": "hello"}, "alpaca", system_prompt="Be kind.")
    assert alpaca[0]["role"] == "system"


def test_empty_system_turn_is_dropped_instead_of_the_row():
    row = {
        "conversations": [
            {"from": "system", "value": ""},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
        ]
    }
    assert [m["role"] for m in standardize(row, "sharegpt")] == ["user", "assistant"]


@pytest.mark.parametrize(
    "row, fmt, reason, detail_has",
    [
        ({"conversations": []}, "sharegpt", "empty", "empty"),
        ({"conversations": None}, "sharegpt", "empty", "empty"),
        ({"text": "   "}, "text", "empty", "empty"),
        ({"id": 3}, "sharegpt", "missing_field", "'id'"),
        ({"conversations": [{"from": "human"}]}, "sharegpt", "missing_field", "conversations[0]"),
        ({"conversations": "hi"}, "sharegpt", "missing_field", "str"),
        ({"instruction": "x"}, "alpaca", "missing_field", "'output'"),
        ({"prompt": "x"}, "prompt_completion", "missing_field", "'completion'"),
        ({"conversations": [{"from": "human", "value": None}]}, "sharegpt", "non_string_content", "NoneType"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages",
         "non_string_content", "list"),
        ({"instruction": 5, "output": "x"}, "alpaca", "non_string_content", "int"),
        ({"text": 5}, "text", "non_string_content", "int"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages", "unknown_role", "'narrator'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no_assistant_turn", "no assistant"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                       {"role": "user", "content": "and?"}]}, "messages", "ends_on_user", "ends on a user turn"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]}, "messages",
         "empty_content", "assistant"),
        ({"instruction": "hi", "output": ""}, "alpaca", "empty_content", "'output'"),
    ],
)  # fmt: skip
def test_each_bad_row_raises_row_error_with_a_stable_reason(row, fmt, reason, detail_has):
    with pytest.raises(RowError) as err:
        standardize(row, fmt)
    assert err.value.reason == reason and detail_has in err.value.detail
    assert isinstance(err.value, ValueError) and "\n" not in err.value.detail


def test_row_error_survives_pickling_for_multiprocess_map():
    import pickle

    err = pickle.loads(pickle.dumps(RowError("too_long", "9 tokens > max_length 8")))
    assert (err.reason, err.detail, str(err)) == (
        "too_long",
        "9 tokens > max_length 8",
        "too_long: 9 tokens > max_length 8",
    )


def test_unknown_format_is_a_config_error():
    with pytest.raises(ValueError, match="data.format"):
        standardize({"text": "x"}, "jsonl")


def test_standardized_rows_tokenize_end_to_end_for_each_format(byte_level):
    tok = wrap(byte_level, "qwen2_5", None, "<|im_end|>")
    rows = [
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
            "sharegpt",
        ),
        ({"instruction": "Say hi.", "input": "", "output": "hello there"}, "alpaca"),
        ({"prompt": "Say hi.", "completion": "hello there"}, "prompt_completion"),
    ]
    for row, fmt in rows:
        out = tokenize_chat(tok, standardize(row, fmt))
        assert masked_runs(tok, out) == ["hello there<|im_end|>"]


def test_import_is_instant_without_transformers():
    import subprocess
    import sys

    code = "import sys, lab_utils.chat; print('transformers' in sys.modules, 'tokenizers' in sys.modules)"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["False", "False"]
