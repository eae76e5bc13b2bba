"""Tests for lab_utils.export on a tiny Llama with a SentencePiece tokenizer, built here (no hub)."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lab_utils import export
from lab_utils.errors import LabError

SECRET = "hf_testsecret123"
BASE_TEMPLATE = "{% for m in messages %}BASE {{ m['content'] }}{% endfor %}"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>[assistant] {% endif %}"
)


# ---------------------------------------------------------------------------------------------
# fixtures: tiny base model + LoRA adapter + merged model + converter


def _pretrain(model, tok, lines: list[str], steps: int = 60, lr: float = 3e-3) -> None:
    """Train the tiny model briefly (~2 s) so its next-token logits are peaked like a real LM's.

    Freshly initialised, the logits are nearly flat (std 0.23, median top1-top2 gap 0.05): q8_0's
    rounding (~0.02 on a logit) then flips near-ties and top-1 agreement measures tie noise
    (92 % at seed 0, 92-98 % over seeds) rather than export fidelity. After 60 steps: std 1.4, gap 0.46.
    """
    import torch

    data = torch.tensor([t for line in lines for t in tok(line).input_ids + [tok.eos_token_id]])
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (16,), generator=gen)
        batch = torch.stack([data[s:s + 32] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build a tiny Llama (SentencePiece tokenizer, chat template, briefly trained) and a LoRA adapter with random B."""
    import sentencepiece as spm
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    root = tmp_path_factory.mktemp("tiny")
    sp_dir, base, adapter = root / "sp", root / "base", root / "adapter"
    sp_dir.mkdir()
    rng = random.Random(0)
    words = ("the a cat dog sat on mat ran fast slow red blue green house tree river model train "
             "loss token chat user assistant hello world answer question why how").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 15))) for _ in range(400)]
    (sp_dir / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(sp_dir / "corpus.txt"), model_prefix=str(sp_dir / "tokenizer"), vocab_size=300,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    tok = LlamaTokenizer.from_pretrained(str(sp_dir))  # reads sp_dir/tokenizer.model
    tok.chat_template = BASE_TEMPLATE
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _pretrain(model, tok, lines)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    shutil.copy(sp_dir / "tokenizer.model", base / "tokenizer.model")  # as on the hub

    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora)
    peft_model.save_pretrained(adapter)
    tok.chat_template = CHAT_TEMPLATE  # the trainer saves the (chat-templated) tokenizer with the adapter
    tok.save_pretrained(adapter)
    return {"root": root, "base": base, "adapter": adapter}


@pytest.fixture(scope="module")
def merged(tiny: dict[str, Path]) -> Path:
    """Merge the tiny adapter into its base (float16)."""
    return export.merge_adapter(str(tiny["base"]), tiny["adapter"], tiny["root"] / "export" / "merged")


@pytest.fixture(scope="module")
def converter() -> Path:
    """Fetch/extract llama.cpp's converter once (user cache); skip the GGUF tests when it cannot be had."""
    try:
        return export.converter_dir()
    except RuntimeError as e:
        pytest.skip(f"llama.cpp converter unavailable: {e}")


# ---------------------------------------------------------------------------------------------
# merge


def test_merge_writes_a_complete_16bit_model(tiny: dict[str, Path], merged: Path) -> None:
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model"} <= names
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float16"
    assert "adapter_config.json" not in names
    # tokenizer from the adapter folder (its chat template), not the base
    assert (merged / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    # written through a temp sibling: nothing half-written left next to it
    assert sorted(p.name for p in merged.parent.iterdir()) == ["merged"]


def test_check_merged_matches_unmerged_adapter(tiny: dict[str, Path], merged: Path) -> None:
    res = export.check_merged(str(tiny["base"]), tiny["adapter"], merged)
    assert set(res) == {"max_abs_diff", "top1_agreement", "cosine"}
    assert res["max_abs_diff"] < 0.05
    assert res["top1_agreement"] >= 0.99
    assert res["cosine"] > 0.999
    # the adapter matters: the base alone disagrees with the merged model
    import torch
    from transformers import AutoModelForCausalLM

    ids = export._random_ids(300, 64, 0)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()(ids).logits[0]
        b = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits[0]
    assert export._compare(a, b)["max_abs_diff"] > 0.1


def test_merge_rejects_a_folder_without_adapter(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LabError, match="adapter_config.json — "):
        export.merge_adapter(str(tiny["base"]), tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_to_gguf_and_check(converter: Path, merged: Path, outtype: str) -> None:
    from gguf import GGUFReader

    out = merged.parent / "gguf" / f"tiny-{outtype}.gguf"
    assert export.to_gguf(merged, out, outtype) == out
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    res = export.check_gguf(merged, out)
    print(f"\n{outtype}: {res}")
    assert res["top1_agreement"] >= 0.95
    assert res["cosine"] >= 0.99
    assert res["n_tensors"] == 4 * 9 + 3  # 9 per block + token_embd, output_norm, output
    assert res["file_size"] == out.stat().st_size
    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"  # SentencePiece vocab, from tokenizer.model
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE


def test_converter_files(converter: Path) -> None:
    assert (converter / "convert_hf_to_gguf.py").is_file()
    assert (converter / "conversion" / "llama.py").is_file()
    assert (converter / "gguf-py" / "gguf" / "gguf_writer.py").is_file()
    assert export.LLAMA_CPP_PYTHON_VERSION in (converter / "SOURCE.txt").read_text()
    assert export.converter_dir() == converter  # cached: same folder, no second download


def test_to_gguf_refuses_quantizer_types(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="quantize_gguf"):
        export.to_gguf(tmp_path, tmp_path / "x.gguf", "q4_k_m")


def _fake_sdist(path: Path) -> Path:
    """Write a small tar.gz laid out like the llama-cpp-python sdist."""
    prefix = f"llama_cpp_python-{export.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    files = {
        "convert_hf_to_gguf.py": "print('converter')\n",
        "conversion/__init__.py": "",
        "conversion/llama.py": "",
        "gguf-py/gguf/__init__.py": "",
        "models/templates/x.jinja": "{{ x }}",
        "ggml/src/huge.c": "int main(){}",  # not needed by the converter: must not be extracted
        "../evil.py": "",
    }
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_converter_dir_extracts_only_what_the_converter_needs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(export.SDIST_ENV, str(_fake_sdist(tmp_path / "fake.tar.gz")))
    folder = export.converter_dir(tmp_path / "cache")
    assert folder == tmp_path / "cache" / f"llama.cpp-{export.LLAMA_CPP_PYTHON_VERSION}"
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == ["SOURCE.txt", "conversion/__init__.py", "conversion/llama.py", "convert_hf_to_gguf.py",
                   "gguf-py/gguf/__init__.py", "models/templates/x.jinja"]
    assert not (tmp_path / "evil.py").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]  # no temp folders left


def test_converter_dir_offline_error_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(export.SDIST_ENV, raising=False)

    def fail(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", fail)  # the converter download (gguf.py) runs pip
    with pytest.raises(LabError) as err:
        export.converter_dir(tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and "No matching distribution" in msg and " — " in msg
    assert not (tmp_path / "cache" / f"llama.cpp-{export.LLAMA_CPP_PYTHON_VERSION}").exists()


def _isolate_quantize(monkeypatch, tmp_path: Path, bin_dir: Path) -> None:
    """Make _find_quantize look only in bin_dir (PATH) and a fresh HOME/cwd."""
    for var in ("LLAMA_QUANTIZE", "UNSLOTH_LLAMA_CPP_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def test_quantize_without_binary_returns_none(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "bin").mkdir()
    _isolate_quantize(monkeypatch, tmp_path, tmp_path / "bin")
    src = tmp_path / "m-f16.gguf"
    src.write_bytes(b"GGUF")
    assert export.quantize_gguf(src, tmp_path / "m-q4_k_m.gguf") is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "llama-quantize" in out[0]
    assert not (tmp_path / "m-q4_k_m.gguf").exists()


def test_quantize_uses_llama_quantize_on_path(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llama-quantize"
    fake.write_text(f"#!{sys.executable}\nimport shutil, sys\nshutil.copy(sys.argv[1], sys.argv[2])\n"
                    "open(sys.argv[2], 'a').write(sys.argv[3])\n")
    fake.chmod(0o755)
    _isolate_quantize(monkeypatch, tmp_path, bin_dir)
    src, dst = tmp_path / "m-f16.gguf", tmp_path / "out" / "m-q4_k_m.gguf"
    src.write_bytes(b"GGUF")
    dst.parent.mkdir()
    assert export.quantize_gguf(src, dst, "q4_k_m") == dst
    assert dst.read_bytes() == b"GGUFQ4_K_M"
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]


# ---------------------------------------------------------------------------------------------
# disk space


def test_free_space_ok(tmp_path: Path) -> None:
    assert export.free_space_ok(tmp_path / "not" / "yet", 1000) is None
    with pytest.raises(LabError) as err:
        export.free_space_ok(tmp_path, 10**18)
    msg = str(err.value)
    assert "\n" not in msg and ", got " in msg and "free" in msg and " — " in msg


def test_estimate_export_bytes(tiny: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny["base"]).parameters())
    assert export._count_params(str(tiny["base"])) == n
    shutil.copy(tiny["base"] / "config.json", tiny["root"] / "config.json")  # no weights: from the config
    assert export._count_params(str(tiny["root"])) == n
    f16 = export.estimate_export_bytes(str(tiny["base"]), ["f16"])
    both = export.estimate_export_bytes(str(tiny["base"]), ["merged", "f16", "q8_0"])
    assert f16 >= 2 * n and both > 2 * f16
    with pytest.raises(LabError, match=", got .* — use"):
        export.estimate_export_bytes(str(tiny["base"]), ["q3_xyz"])


# ---------------------------------------------------------------------------------------------
# model card and push


def _card(out_dir: Path) -> str:
    config = {
        "model": {"name": "tiny-llama", "max_seq_length": 512},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "train": {"learning_rate": 2e-4, "max_steps": 60, "per_device_train_batch_size": 2, "seed": 0},
        "data": {"dataset": "local/tiny-chat.jsonl"},
        "hf_token": SECRET,
    }
    (out_dir.parent / "eval").mkdir(parents=True, exist_ok=True)
    (out_dir.parent / "eval" / "metrics.json").write_text(json.dumps({"eval_loss": 1.2345, "perplexity": 3.44}))
    path = export.write_model_card(
        out_dir, run_name="tiny-run", base_model="org/tiny-base", config=config, metrics=None,
        data_report={"n_train": 380, "n_eval": 20, "tokens": {"p50": 41, "max": 120}},
    )
    return path.read_text()


def test_model_card(tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "run" / "export"
    text = _card(out)
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "org/tiny-base" and front["library_name"] == "peft"
    assert "qlora" in front["tags"]
    for needle in ("# tiny-run", "`lora.r` | 8", "`lora.lora_alpha` | 16", "`train.learning_rate` | 0.0002",
                   "local/tiny-chat.jsonl", "`n_train` | 380", "`tokens.p50` | 41",
                   "`eval_loss` | 1.234", "`perplexity` | 3.44", "## Intended use and limits"):
        assert needle in text, needle
    assert SECRET not in text and "hf_token" not in text
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]


def test_the_model_card_is_one_the_hub_library_reads(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "run" / "export"
    (out / "gguf").mkdir(parents=True)
    card = ModelCard.load(export.write_model_card(out, run_name="r", base_model="org/base", config={}, metrics=None,
                                                  data_report=None))
    assert card.data.base_model == "org/base" and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation" and {"qlora", "gguf"} <= set(card.data.tags)
    assert card.text.lstrip().startswith("# r\n")


def test_count_params_reads_safetensors_headers_and_falls_back_for_packed_weights(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"a": np.zeros((3, 4), np.float16), "b": np.zeros(5, np.float32)}, str(tmp_path / "model.safetensors"))
    assert export._count_params(str(tmp_path)) == 17
    save_file({"q": np.zeros(8, np.uint8)}, str(tmp_path / "model.safetensors"))  # 4-bit packed: no true count
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 10}))
    assert export._count_params(str(tmp_path)) == (8 * 2 * 4 * 2 * 2 + 3 * 8 * 16 + 2 * 8) + 10 * 8 * 2 + 8


def _export_dir(tmp_path: Path, tiny: dict[str, Path], merged: Path) -> Path:
    """Lay out an export folder: README, adapter, merged, gguf."""
    out = tmp_path / "run" / "export"
    _card(out)
    shutil.copytree(tiny["adapter"], out / "adapter")
    shutil.copytree(merged, out / "merged")
    (out / "gguf").mkdir()
    (out / "gguf" / "tiny-q8_0.gguf").write_bytes(b"GGUF" + bytes(1000))
    (out / "gguf" / ".tiny-q4.partial-1.gguf").write_bytes(b"half")  # temp files are never uploaded
    return out


def _assert_secret_nowhere(root: Path, *texts: str) -> None:
    for t in texts:
        assert SECRET not in t
    for f in root.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_push_dry_run_lists_files_and_hides_token(tmp_path, tiny, merged, monkeypatch, capsys) -> None:
    out = _export_dir(tmp_path, tiny, merged)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = export.push_to_hub(out, "student/tiny-run")
    cap = capsys.readouterr()
    assert "README.md" in files and "adapter/adapter_model.safetensors" in files
    assert "merged/model.safetensors" in files and "gguf/tiny-q8_0.gguf" in files
    assert not any(".partial" in f for f in files)
    assert "dry run (HF_HUB_OFFLINE is set)" in cap.out and "student/tiny-run: gguf/tiny-q8_0.gguf" in cap.out
    assert "1.0 KB" in cap.out  # sizes listed
    _assert_secret_nowhere(out, cap.out, cap.err)

    only = export.push_to_hub(out, "student/tiny-run", what=("gguf",), dry_run=True)
    assert only == ["README.md", "gguf/tiny-q8_0.gguf"]
    _assert_secret_nowhere(out, *capsys.readouterr())


def test_push_without_token_is_a_dry_run(tmp_path, tiny, merged, monkeypatch, capsys) -> None:
    out = _export_dir(tmp_path, tiny, merged)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", None)  # not on Colab
    export.push_to_hub(out, "student/tiny-run", what=("adapter",))
    assert "dry run (no HF token" in capsys.readouterr().out
    with pytest.raises(LabError, match="owner"):
        export.push_to_hub(out, "tiny-run", dry_run=True)


def test_push_real_calls_hub_and_hides_token(tmp_path, tiny, merged, monkeypatch, capsys) -> None:
    import huggingface_hub

    out = _export_dir(tmp_path, tiny, merged)
    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    files = export.push_to_hub(out, "student/tiny-run", what=("adapter", "gguf"), dry_run=False)
    cap = capsys.readouterr()
    assert calls[0] == ("init", {"token": SECRET})
    assert calls[1] == ("create_repo", {"repo_id": "student/tiny-run", "private": True, "exist_ok": True,
                                        "repo_type": "model"})
    up = calls[2][1]
    assert up["repo_id"] == "student/tiny-run" and Path(up["folder_path"]) == out
    assert up["allow_patterns"] == files and "merged/model.safetensors" not in files
    _assert_secret_nowhere(out, cap.out, cap.err)


def test_partial_files_of_a_killed_export_are_removed_and_never_listed(tmp_path):
    import subprocess
    import sys

    from lab_utils.export import clean_leftovers, write_model_card

    gguf = tmp_path / "export" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / "run-f16.gguf").write_bytes(b"GGUF")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    killed = gguf / f".run-q8_0.partial-{dead}.gguf"
    killed.write_bytes(b"half")
    half_dir = tmp_path / "export" / f".adapter.tmp-{dead}"
    half_dir.mkdir()
    running = gguf / f".run-q8_0.partial-{os.getppid()}.gguf"  # a live export (another process) keeps its file
    running.write_bytes(b"in progress")
    card = write_model_card(tmp_path / "export", run_name="run", base_model="b", config={}, metrics=None,
                            data_report=None).read_text()
    assert "`run-f16.gguf`" in card and "partial" not in card
    assert sorted(clean_leftovers(tmp_path / "export")) == sorted([killed, half_dir])
    assert not killed.exists() and not half_dir.exists() and running.exists()


def test_model_card_has_the_baseline_score_but_not_its_training_answer(tmp_path: Path) -> None:
    out = tmp_path / "run" / "export"
    metrics = {"base": {"loss": 6.8, "price_mae": 488.2}, "tuned": {"loss": 0.04, "price_mae": 9.0},
               "baseline": {"answer": "Price is $489 for the private row", "train_rows": 1900, "price_mae": 190.8}}
    text = export.write_model_card(out, run_name="r", base_model="org/base", config={}, metrics=metrics,
                                   data_report=None).read_text()
    assert "`baseline.price_mae` | 190.8" in text and "`tuned.price_mae` | 9" in text
    assert "private row" not in text and "baseline.answer" not in text


@pytest.mark.parametrize("base", ["/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf", "embedded:tiny-llama", "./models/mine"])
def test_model_card_of_a_local_base_has_no_path_no_hub_link_and_says_local(tmp_path: Path, base: str) -> None:
    import yaml

    out = tmp_path / "run" / "export"
    config = {"model": {"name": base, "max_length": 128}, "data": {"path": "/content/drive/MyDrive/rows.jsonl"},
              "train": {"learning_rate": 2e-4}}
    report = {"source": "/content/drive/MyDrive/rows.jsonl", "rows_kept": 10}
    text = export.write_model_card(out, run_name="r", base_model=base, config=config, metrics=None,
                                   data_report=report).read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert "base_model" not in front
    assert base not in text and "/content/drive" not in text and "huggingface.co//" not in text
    assert "trained from a local model" in text
    assert "`model.name` | a local model" in text and "`data.path` | (a local path)" in text


def test_model_card_lists_sweep_settings_only_when_a_sweep_ran(tmp_path: Path) -> None:
    from types import SimpleNamespace

    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    cfg = {"model": {"name": "org/base"}, "train": {"learning_rate": 2e-4}, "sweep": {"space": {"lora.r": [8, 32]}}}
    run = SimpleNamespace(dir=run_dir, name="run", cfg=cfg, data_dir=run_dir / "data", eval_dir=run_dir / "eval",
                          export_dir=run_dir / "export", display=str, data_report=lambda: None)
    assert "sweep." not in export.export_card(run).read_text()
    (run_dir / "sweep" / "trial-000-lr2e-4").mkdir(parents=True)
    assert "`sweep.space.lora.r` | 8, 32" in export.export_card(run).read_text()


def test_converter_warnings_that_change_nothing_are_explained_and_per_tensor_lines_hidden() -> None:
    from lab_utils.gguf import converter_line

    assert converter_line("INFO:hf-to-gguf:blk.9.attn_v.weight,        torch.float16 --> F16, shape = {576, 192}") is None
    rope = converter_line("WARNING:hf-to-gguf:Unknown RoPE type: default")
    assert rope.startswith("note: transformers 5 names plain RoPE 'default'") and "'none'" in rope
    dup = converter_line("WARNING:gguf.gguf_writer:Duplicated key name 'tokenizer.ggml.add_bos_token', "
                         "overwriting it with new value False of type BOOL")
    assert dup.startswith("note: the converter set tokenizer.ggml.add_bos_token twice") and "keeps False" in dup
    # anything else is shown as it is, an unknown RoPE type included
    for line in ("WARNING:hf-to-gguf:Unknown RoPE type: mystery", "INFO:hf-to-gguf:Set model tokenizer"):
        assert converter_line(line) == line
