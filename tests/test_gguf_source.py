"""A local `.gguf` file as model.name: converted once to a model folder, then loaded like any model.

The GGUF is written from the embedded tiny model by the lab's own export (llama.cpp's converter, f32),
so the test needs no download and compares against the model it came from.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab_utils.errors import LabError


def test_only_existing_gguf_files_count_as_gguf(tmp_path):
    from lab_utils.gguf_source import is_gguf_file

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "m.bin").write_bytes(b"x")
    assert is_gguf_file(str(tmp_path / "m.gguf"))
    assert not is_gguf_file(str(tmp_path / "m.bin"))
    assert not is_gguf_file(str(tmp_path / "missing.gguf"))
    assert not is_gguf_file("org/model.gguf")  # a hub id, not a file here


def test_a_file_that_is_not_gguf_is_refused_naming_both_choices(tmp_path):
    from lab_utils.model import check_model_source

    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(LabError, match=r"is a file — point it at the folder that holds config.json, or at a .gguf file"):
        check_model_source(str(tmp_path / "weights.bin"))


def test_a_damaged_gguf_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from lab_utils.embedded import resolve_model

    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LabError, match=r"could not be read as a GGUF model, got .* — use a GGUF of an architecture"):
        resolve_model(str(bad))
    assert not list((tmp_path / "cache").glob("gguf-*"))  # nothing left that a later load could take for the model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, str]:
    """The embedded tiny model written as a GGUF by the lab's export; returns (file, original folder)."""
    from lab_utils import export
    from lab_utils.embedded import EMBEDDED_MODEL, resolve_model

    folder = resolve_model(EMBEDDED_MODEL)
    out = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    export.to_gguf(Path(folder), out, "f32")
    return out, folder


@pytest.mark.slow
def test_a_gguf_file_as_model_name_loads_like_the_model_it_came_from(tiny_gguf, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab_utils.model import load_base_model, load_tokenizer

    gguf, original = tiny_gguf
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))  # a fresh cache: the conversion itself runs
    cfg = {"model": {"name": str(gguf), "trust_remote_code": False, "load_in_4bit": False}}
    tok = load_tokenizer(cfg)
    folders = list((tmp_path / "cache").glob("gguf-tiny-llama.f32-*"))
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()
    assert "quantization_config" not in (folders[0] / "config.json").read_text()  # plain weights, loadable anywhere
    ref_tok = AutoTokenizer.from_pretrained(original)
    text = "What is the price of this item? Pro monitor, 2-pack"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert (tok.eos_token, tok.bos_token) == (ref_tok.eos_token, ref_tok.bos_token)

    model = load_base_model(cfg, four_bit=False, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    ids = torch.tensor([ref_tok(text)["input_ids"]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()

    stamp = folders[0].stat().st_mtime_ns  # converted once: a second load reuses the folder
    load_tokenizer(cfg)
    assert folders[0].stat().st_mtime_ns == stamp
