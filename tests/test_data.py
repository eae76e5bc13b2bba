"""Data preparation as a specification: every format in, every bad row counted, masks exact, cache honest.

Small files are written per test and prepared with the embedded tokenizer (no model weights anywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from lab_utils.config import resolve_config
from lab_utils.data import _is_hub_id, _split_of, load_prepared, prepare, report_examples, report_table
from lab_utils.embedded import tokenizer_dir
from lab_utils.errors import LabError
from lab_utils.run import Run


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SentencePiece tokenizer with its ChatML template (shared: prepare never changes it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def make_run(root: Path, path: Path | str, max_length: int = 128, name: str = "t", **data) -> Run:
    """Return a Run in root/<name> whose config reads `path` with the given data.* settings."""
    form = {"run_name": name, "data.path": str(path), "model.max_length": max_length}
    form.update({f"data.{k}": v for k, v in data.items()})
    return Run(name=name, dir=root / name, cfg=resolve_config(form=form))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(i: int, answer: str | None = None) -> dict:
    """Return a distinct, valid OpenAI-messages row."""
    return {
        "messages": [
            {"role": "user", "content": f"What is {i} plus one?"},
            {"role": "assistant", "content": answer or f"It is {i + 1}."},
        ]
    }


def masked_text(row: dict, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m])


def report_of(run: Run) -> dict:
    return json.loads((run.data_dir / "data_report.json").read_text())


# ------------------------------------------------------------------------------------------- formats


def _write_format(fmt: str, tmp: Path) -> Path:
    n = 20
    if fmt == "sharegpt":
        rows = [
            {"conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": f"Name number {i}."},
                {"from": "gpt", "value": f"Number {i}."},
            ]}
            for i in range(n)
        ]  # fmt: skip
        return write_jsonl(tmp / "data.jsonl", rows)
    if fmt == "messages":  # a JSON array file, not JSON lines
        path = tmp / "data.json"
        path.write_text(json.dumps([chat(i) for i in range(n)]))
        return path
    if fmt == "alpaca":
        path = tmp / "data.csv"
        lines = ["instruction,input,output"] + [f'Add one.,"{i}",{i + 1}' for i in range(n)]
        path.write_text("\n".join(lines) + "\n")
        return path
    if fmt == "prompt_completion":
        import pandas as pd

        path = tmp / "data.parquet"
        pd.DataFrame(
            {"prompt": [f"Count to {i}:" for i in range(n)], "completion": [f" {i}" for i in range(n)]}
        ).to_parquet(path)
        return path
    return write_jsonl(tmp / "data.jsonl", [{"text": f"Line number {i} of plain text."} for i in range(n)])


@pytest.mark.parametrize(
    "fmt, answer_of_row0",
    [
        ("sharegpt", "Number 0."),
        ("messages", "It is 1."),
        ("alpaca", "1"),
        ("prompt_completion", " 0"),
        ("text", None),
    ],
)
def test_each_format_is_detected_and_prepared_with_assistant_only_masks(
    fmt, answer_of_row0, tokenizer, tmp_path, lab_root, capsys
):
    run = make_run(lab_root, _write_format(fmt, tmp_path))
    ds = prepare(run, tokenizer)
    out = capsys.readouterr().out
    assert f"Format: {fmt} (" in out  # one line: what and why
    assert set(ds) == {"train", "validation"}
    assert set(ds["train"].column_names) == {"input_ids", "assistant_masks", "messages"}
    assert len(ds["train"]) + len(ds["validation"]) == 20 and len(ds["validation"]) == 1
    row = ds["train"][0]
    assert len(row["input_ids"]) == len(row["assistant_masks"]) > 0
    if fmt == "text":
        assert all(row["assistant_masks"]) and row["messages"][0]["role"] == "text"
        return
    # the model learns the answer and its end-of-turn marker, nothing of the prompt
    first = next(r for split in ds.values() for r in split if r["messages"][-1]["content"] == answer_of_row0)
    assert masked_text(first, tokenizer).strip() == answer_of_row0.strip() + tokenizer.eos_token
    assert first["messages"][-1]["role"] == "assistant"
    user = next(m["content"] for m in first["messages"] if m["role"] == "user")
    assert user not in masked_text(first, tokenizer)


def test_forced_format_wins_over_detection_and_says_so(tokenizer, tmp_path, lab_root, capsys):
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}", "text": f"plain {i}"} for i in range(10)]
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", rows), format="text")
    ds = prepare(run, tokenizer)
    assert "Format: text (set by data.format)" in capsys.readouterr().out
    assert ds["train"][0]["messages"][0]["role"] == "text"


def test_forced_format_without_its_columns_is_a_one_line_error(tokenizer, tmp_path, lab_root):
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(5)]), format="alpaca")
    with pytest.raises(LabError) as err:
        prepare(run, tokenizer)
    assert (
        "'instruction'" in str(err.value) and "data.format" in str(err.value) and "\n" not in str(err.value)
    )


def test_undetectable_columns_name_the_columns_and_the_fix(tokenizer, tmp_path, lab_root):
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(LabError, match=r"\['question', 'answer'\].*data\.format"):
        prepare(run, tokenizer)


def test_csv_conversations_written_as_json_text_are_decoded(tokenizer, tmp_path, lab_root, capsys):
    import csv

    path = tmp_path / "chats.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["conversations", "source"])
        for i in range(10):
            turns = [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]
            w.writerow([json.dumps(turns), "export"])
        w.writerow(['[{"from": "human", "value": "broken', "export"])
    ds = prepare(make_run(lab_root, path), tokenizer)
    assert "Format: sharegpt (" in capsys.readouterr().out
    assert ds["train"][0]["messages"][-1]["role"] == "assistant"
    report = report_of(make_run(lab_root, path))
    assert report["dropped_by_reason"] == {"malformed_json": 1}
    assert report["examples"]["malformed_json"][0]["row"] == 11


def test_csv_cells_are_read_as_text_exactly_as_written(tokenizer, tmp_path, lab_root):
    path = tmp_path / "prices.csv"
    path.write_text("instruction,output\n" + "".join(f"Code {i}?,00{i}\n" for i in range(5)))
    ds = prepare(make_run(lab_root, path), tokenizer)
    answers = sorted(r["messages"][-1]["content"] for s in ds.values() for r in s)
    assert answers == ["000", "001", "002", "003", "004"]  # not the integers 0..4


def test_role_map_extends_roles_and_system_prompt_is_added(tokenizer, tmp_path, lab_root):
    rows = [{"conversations": [{"from": "Customer", "value": f"hi {i}"}, {"from": "Agent", "value": f"yo {i}"}]}
            for i in range(10)]  # fmt: skip
    run = make_run(
        lab_root,
        write_jsonl(tmp_path / "d.jsonl", rows),
        role_map={"customer": "user", "agent": "assistant"},
        system_prompt="Be kind.",
    )
    ds = prepare(run, tokenizer)
    assert [m["role"] for m in ds["train"][0]["messages"]] == ["system", "user", "assistant"]
    assert ds["train"][0]["messages"][0]["content"] == "Be kind."


def test_role_map_to_an_unknown_role_is_a_config_error(tokenizer, tmp_path, lab_root):
    with pytest.raises(LabError, match="role_map"):  # caught when the config is checked, before any data is read
        run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", [chat(1)]), role_map={"x": "narrator"})
        prepare(run, tokenizer)


# ---------------------------------------------------------------------------------------- validation

BAD_ROWS = {  # reason → a row that must be dropped for it
    "empty": {"messages": []},
    "missing_field": {"messages": [{"content": "who says this?"}, {"role": "assistant", "content": "me"}]},
    "non_string_content": {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "five"}]},
    "unknown_role": {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "anyone?"}]},
    "ends_on_user": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "and then?"}]},
    "empty_content": {"messages": [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": " "}]},
    "too_long": chat(999, answer="word " * 300),
    "malformed_json": '{"messages": [{"role": "user", "content": "cut off',
    "duplicate": chat(0),  # row 1 again
}  # fmt: skip


def _file_with_every_bad_row(tmp: Path, good: int = 30) -> tuple[Path, dict[str, int]]:
    """Write `good` valid rows then one row per reason; return the file and each reason's 1-based row."""
    rows: list = [chat(i) for i in range(good)]
    where = {}
    for reason, row in BAD_ROWS.items():
        rows.append(row)
        where[reason] = len(rows)
    return write_jsonl(tmp / "mixed.jsonl", rows), where


def test_every_validation_reason_is_counted_with_row_number_and_excerpt(
    tokenizer, tmp_path, lab_root, capsys
):
    path, where = _file_with_every_bad_row(tmp_path)
    run = make_run(lab_root, path)
    ds = prepare(run, tokenizer)
    out = capsys.readouterr().out
    report = report_of(run)
    assert report["dropped_by_reason"] == {reason: 1 for reason in BAD_ROWS}
    assert report["rows_in"] == 30 + len(BAD_ROWS) and report["rows_kept"] == 30
    assert len(ds["train"]) + len(ds["validation"]) == 30
    for reason, row in where.items():
        (ex,) = report["examples"][reason]
        assert ex["row"] == row, reason
        assert ex["detail"] and ex["excerpt"], reason
    assert "line 39" in report["examples"]["malformed_json"][0]["detail"]  # the file's line number
    assert "Kept 30 of 40 rows; dropped 10 (" in out
    table = report_table(report)
    assert table[0] == {"what": "kept", "rows": 30, "share": "75.0%", "first example": ""}
    assert {r["what"] for r in table[1:]} == {f"dropped: {r}" for r in BAD_ROWS}
    assert len(report_examples(report)) == len(BAD_ROWS)


def test_examples_are_capped_at_three_per_reason(tokenizer, tmp_path, lab_root):
    rows = [chat(i) for i in range(20)] + [{"messages": []}] * 5
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", rows))
    prepare(run, tokenizer)
    report = report_of(run)
    assert report["dropped_by_reason"] == {"empty": 5}
    assert [e["row"] for e in report["examples"]["empty"]] == [21, 22, 23]


def test_duplicates_across_train_and_validation_files_are_dropped(tokenizer, tmp_path, lab_root):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [chat(i) for i in range(10)])
    write_jsonl(folder / "validation.jsonl", [chat(3), chat(100)])
    run = make_run(lab_root, folder)
    ds = prepare(run, tokenizer)
    report = report_of(run)
    assert report["dropped_by_reason"] == {"duplicate": 1}
    assert report["examples"]["duplicate"][0] | {"excerpt": ""} == {
        "split": "validation", "row": 1, "detail": "same messages as an earlier row", "excerpt": "",
    }  # fmt: skip
    assert (len(ds["train"]), len(ds["validation"])) == (10, 1)
    assert report["validation_from"] == "the source's own split"


def test_too_long_rows_are_dropped_by_default(tokenizer, tmp_path, lab_root):
    rows = [chat(i) for i in range(10)] + [chat(50 + i, answer="many words " * 40) for i in range(2)]
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", rows), max_length=64)
    ds = prepare(run, tokenizer)
    report = report_of(run)
    assert report["dropped_by_reason"] == {"too_long": 2} and report["on_too_long"] == "drop"
    assert "> model.max_length 64" in report["examples"]["too_long"][0]["detail"]
    assert max(len(r["input_ids"]) for s in ds.values() for r in s) <= 64
    assert report["truncated"]["rows"] == 0
    assert report["length_stats_before_limit"]["max"] > 64 >= report["length_stats"]["max"]


def test_truncate_keeps_long_rows_cut_to_max_length_and_reports_them(tokenizer, tmp_path, lab_root, capsys):
    rows = [chat(i) for i in range(10)] + [chat(50 + i, answer="many words " * 40) for i in range(2)]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "long question " * 40},
                {"role": "assistant", "content": "ok"},
            ]
        }
    )
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", rows), max_length=64, on_too_long="truncate")
    ds = prepare(run, tokenizer)
    out = capsys.readouterr().out
    report = report_of(run)
    assert report["on_too_long"] == "truncate"
    assert report["truncated"]["rows"] == 2 and report["truncated"]["examples"][0]["row"] == 11
    assert "cut to 64" in report["truncated"]["examples"][0]["detail"]
    # a row whose answer lies wholly past the cut has nothing left to learn: dropped, with that reason
    assert report["dropped_by_reason"] == {"too_long": 1}
    assert "no assistant token is left" in report["examples"]["too_long"][0]["detail"]
    cut = [r for s in ds.values() for r in s if r["messages"][-1]["content"].startswith("many")]
    assert len(cut) == 2 and all(len(r["input_ids"]) == 64 and r["assistant_masks"][-1] == 1 for r in cut)
    assert "2 rows were cut to model.max_length=64" in out
    assert any(r["what"] == "kept but cut to max_length" and r["rows"] == 2 for r in report_table(report))


# ------------------------------------------------------------------------------------------- stopping


def test_more_drops_than_max_drop_fraction_stop_with_the_report_kept(tokenizer, tmp_path, lab_root):
    path, _ = _file_with_every_bad_row(tmp_path, good=30)
    run = make_run(lab_root, path)
    prepare(run, tokenizer)  # 25% dropped: fine at the default 0.5
    assert (run.data_dir / "dataset").exists()
    strict = make_run(lab_root, path, max_drop_fraction=0.2)
    with pytest.raises(LabError) as err:
        prepare(strict, tokenizer)
    message = str(err.value)
    assert (
        "10 of 40 rows (25%)" in message and "data.max_drop_fraction=0.2" in message and "\n" not in message
    )
    assert "data_report.json" in message
    report = report_of(strict)
    assert report["stopped"] == message.split(" (examples in")[0] and report["fingerprint"] is None
    assert report["dropped_by_reason"]["malformed_json"] == 1
    assert not (run.data_dir / "dataset").exists()  # the old data no longer matches the settings
    with pytest.raises(LabError, match="run 01_data first"):
        load_prepared(strict)


def test_no_usable_row_stops_with_the_top_reason_and_its_fix(tokenizer, tmp_path, lab_root):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(5)]
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", rows), max_drop_fraction=1.0)
    with pytest.raises(LabError) as err:
        prepare(run, tokenizer)
    assert "no usable rows left" in str(err.value) and "all 5 dropped (no_assistant_turn (5))" in str(
        err.value
    )
    assert "data.role_map" in str(err.value)


def test_a_file_that_is_not_json_lines_is_named_as_such(tokenizer, tmp_path, lab_root):
    path = tmp_path / "really.jsonl"
    path.write_text("instruction,output\nAdd one,2\nAdd two,3\n")  # a CSV with the wrong name
    with pytest.raises(LabError) as err:
        prepare(make_run(lab_root, path), tokenizer)
    assert "is not JSON lines: no line is a JSON object (line 1:" in str(err.value) and "\n" not in str(
        err.value
    )


def test_mostly_malformed_lines_stop_with_the_jsonl_fix(tokenizer, tmp_path, lab_root, capsys):
    rows = [chat(1)] + ["{not json"] * 3
    with pytest.raises(LabError) as err:
        prepare(make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer)
    assert "3 of 4 rows (75%)" in str(err.value) and "one JSON object per line" in str(err.value)
    assert "3 line(s) are not valid JSON objects (first: d.jsonl line 2" in capsys.readouterr().out


def test_json_array_file_that_is_broken_names_the_line(tokenizer, tmp_path, lab_root):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a"},\n{"text": "b"\n]\n')
    with pytest.raises(LabError) as err:
        prepare(make_run(lab_root, path), tokenizer)
    assert "line 4" in str(err.value) and "JSONL" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------- sources & splits


def test_missing_local_path_is_a_one_line_error(tokenizer, tmp_path, lab_root):
    with pytest.raises(LabError, match="does not exist"):
        prepare(make_run(lab_root, tmp_path / "nope.jsonl"), tokenizer)


def test_hub_id_without_network_is_a_one_line_error_within_seconds(tmp_path):
    """A hub id with the hub unreachable (HF_ENDPOINT on a closed local port) fails in one line, no retries."""
    code = (
        "from lab_utils.data import load_source\n"
        "from lab_utils.errors import LabError\n"
        "try:\n    load_source({'data': {'path': 'someorg/some-dataset', 'name': 'en', 'split': None}})\n"
        "except LabError as e:\n    print('LABERROR', e)\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "PYTHONPATH": str(REPO),
        "LAB_ROOT": str(tmp_path),
    }
    env.pop("LAB_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LABERROR")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert "'someorg/some-dataset'" in lines[0] and "hub cannot be reached" in lines[0].lower()  # start()'s own message
    assert "Retrying" not in proc.stderr


@pytest.mark.parametrize(
    "spec, hub",
    [
        ("mlabonne/FineTome-100k", True),
        ("imdb", True),
        ("data/train.jsonl", False),
        ("./x", False),
        ("a/b/c", False),
    ],
)
def test_only_names_shaped_like_hub_ids_go_to_the_hub(spec, hub):
    assert _is_hub_id(spec) is hub


@pytest.mark.parametrize(
    "name, split",
    [("train.jsonl", "train"), ("validation.jsonl", "validation"), ("dev-00000.parquet", "validation"),
     ("test/part-0.csv", "test"), ("data-latest.jsonl", "train"), ("interval.jsonl", "train")],
)  # fmt: skip
def test_file_names_decide_a_folders_splits(name, split):
    assert _split_of(name) == split


def test_data_split_picks_one_split_of_a_folder_and_splits_validation_off_it(tokenizer, tmp_path, lab_root):
    folder = tmp_path / "data"
    (folder / "test").mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", [chat(i) for i in range(10)])
    write_jsonl(folder / "test" / "part-0.jsonl", [chat(100 + i) for i in range(20)])
    run = make_run(lab_root, folder, split="test")
    ds = prepare(run, tokenizer)
    assert len(ds["train"]) + len(ds["validation"]) == 20
    assert "split off" in report_of(run)["validation_from"]
    with pytest.raises(LabError, match=r"data.split 'dev' names no files .* \['test', 'train'\]"):
        prepare(make_run(lab_root, folder, name="u", split="dev"), tokenizer)


def test_validation_is_split_off_with_the_seed_when_the_source_has_none(tokenizer, tmp_path, lab_root):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(40)])
    a = prepare(make_run(lab_root, path, name="a", val_fraction=0.1), tokenizer)
    b = prepare(make_run(lab_root, path, name="b", val_fraction=0.1), tokenizer)
    c = prepare(make_run(lab_root, path, name="c", val_fraction=0.1, seed=7), tokenizer)
    assert len(a["validation"]) == 4 and len(a["train"]) == 36
    assert a["validation"]["messages"] == b["validation"]["messages"]
    assert a["validation"]["messages"] != c["validation"]["messages"]
    assert "data.val_fraction=0.1" in report_of(make_run(lab_root, path, name="a"))["validation_from"]


# ------------------------------------------------------------------------------------- lengths & cache


def test_length_statistics_histogram_and_suggestion(tokenizer, tmp_path, lab_root, capsys):
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(20)]), max_length=2048)
    prepare(run, tokenizer)
    report = report_of(run)
    stats = report["length_stats"]
    assert set(stats) == {"rows", "p50", "p95", "p99", "max", "mean"} and all(v > 0 for v in stats.values())
    assert stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"] < 64
    assert report["fits_max_length"] == 1.0
    assert (run.data_dir / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert "model.max_length=64 fits every row" in report["suggestion"]
    assert "Suggestion:" in capsys.readouterr().out


def test_rerun_reuses_the_processed_data_and_any_change_processes_again(
    tokenizer, tmp_path, lab_root, capsys
):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(10)])
    run = make_run(lab_root, path)
    prepare(run, tokenizer)
    capsys.readouterr()
    again = prepare(make_run(lab_root, path), tokenizer)
    assert "Processed data is up to date" in capsys.readouterr().out
    assert len(again["train"]) + len(again["validation"]) == 10

    write_jsonl(path, [chat(i) for i in range(12)])  # the source changed
    changed = prepare(make_run(lab_root, path), tokenizer)
    assert "processing again" in capsys.readouterr().out
    assert len(changed["train"]) + len(changed["validation"]) == 12

    prepare(make_run(lab_root, path, system_prompt="Be kind."), tokenizer)  # a setting changed
    assert "processing again" in capsys.readouterr().out
    assert report_of(run)["rows_kept"] == 12
    # 02_train's check: the saved data must match the settings it is given
    with pytest.raises(LabError, match="run 01_data again"):
        load_prepared(make_run(lab_root, path), tokenizer)


def _with_length(row: dict) -> dict:
    return {"n": len(row["input_ids"])}


def test_a_cut_off_map_cache_beside_the_data_is_removed_and_made_again(tokenizer, tmp_path, lab_root, capsys):
    """TRL maps the saved data into cache-*.arrow beside it; one cut short (disconnect, Drive sync) ended training."""
    import datasets

    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(40)]))
    prepare(run, tokenizer)
    want = list(load_prepared(run, tokenizer)["train"].map(_with_length)["n"])
    caches = sorted((run.data_dir / "dataset" / "train").glob("cache-*.arrow"))
    assert len(caches) == 1
    cut = caches[0].read_bytes()[: caches[0].stat().st_size // 2]
    caches[0].unlink()  # a new file, as a sync writes it (the old one may still be memory-mapped)
    caches[0].write_bytes(cut)
    with pytest.raises(Exception, match="Expected to"):  # what datasets alone does with it
        datasets.load_from_disk(str(run.data_dir / "dataset"))["train"].map(_with_length)
    capsys.readouterr()
    again = list(load_prepared(run, tokenizer)["train"].map(_with_length)["n"])
    assert again == want
    assert "Removed 1 damaged cache file(s) beside the processed data (train/cache-" in capsys.readouterr().out
    load_prepared(run, tokenizer)  # the remade cache is intact: nothing more to remove
    assert "Removed" not in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- tokenizer


def test_a_folder_with_only_tokenizer_files_is_enough(tmp_path, lab_root, capsys):
    from lab_utils.model import load_tokenizer

    tok_dir = tmp_path / "tokenizer-only"
    shutil.copytree(tokenizer_dir(), tok_dir)
    assert not [
        p for p in tok_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") or p.name == "config.json"
    ]
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(10)]))
    run.cfg["model"].update(name="no-such-org/no-such-model", tokenizer=str(tok_dir))
    tok = load_tokenizer(run.cfg)
    ds = prepare(run, tok)
    assert masked_text(ds["train"][0], tok).endswith(tok.eos_token)


def test_a_tokenizer_without_chat_template_gets_the_default_and_says_so(tmp_path, lab_root, capsys):
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "plain-tokenizer"
    shutil.copytree(tokenizer_dir(), tok_dir)
    (tok_dir / "chat_template.jinja").unlink()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert not tok.chat_template
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(10)]))
    ds = prepare(run, tok)
    assert "no chat template: using the lab's default ChatML template" in capsys.readouterr().out
    row = next(r for s in ds.values() for r in s if r["messages"][-1]["content"] == "It is 1.")
    assert masked_text(row, tok) == "It is 1." + tok.eos_token


def test_too_many_unknown_roles_stop_naming_each_role_to_map(tokenizer, tmp_path, lab_root):
    rows = [chat(i) for i in range(4)]
    rows += [{"messages": [{"role": role, "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
             for i, role in enumerate(["narrator", "narrator", "critic", "narrator", "critic", "bot2"])]
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(LabError) as err:
        prepare(run, tokenizer)
    message = str(err.value)
    assert "(unknown_role (6))" in message
    assert "map the role names 'narrator', 'critic', 'bot2' with data.role_map, e.g. data.role_map: " \
           "{'narrator': assistant}" in message


def test_a_tiny_validation_split_is_warned_about(tokenizer, tmp_path, lab_root, capsys):
    run = make_run(lab_root, write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(30)]), val_fraction=0.02)
    ds = prepare(run, tokenizer)
    assert len(ds["validation"]) == 1
    assert "⚠ only 1 validation row(s): validation loss and 03's scores will swing" in capsys.readouterr().out
