"""Evaluation: task metrics on known answers, which adapter ships, the chat widget, and (slow) a trained run
evaluated twice — checkpoint losses, the best checkpoint, and parts reused instead of recomputed."""

from __future__ import annotations

import copy
import json
import math

import pytest

from lab_utils.config import DEFAULTS
from lab_utils.errors import LabError
from lab_utils.evaluation import (
    TRAINING_STATE_FILES,
    adapter_hash,
    eval_sample,
    export_adapter_source,
    lower_is_better,
    metric_kind,
    metrics_table,
    normalize_answer,
    parse_number,
    task_metrics,
    verdict,
)
from lab_utils.run import Run

# ---------------------------------------------------------------------------------------------- task metrics


def test_price_metric_is_mean_absolute_error_with_unparsed_answers_counted_as_zero():
    preds = ["Price is $100", "Price is $50.50", "I don't know"]
    refs = ["Price is $120", "Price is $50.50", "Price is $30"]
    m = task_metrics(preds, refs, "price")
    assert m["price_mae"] == pytest.approx((20 + 0 + 30) / 3)
    assert m["price_parsed"] == pytest.approx(2 / 3)


def test_price_metric_skips_references_without_a_price():
    m = task_metrics(["Price is $10", "Price is $5"], ["Price is $12", "no price here"], "price")
    assert m == {"price_mae": 2.0, "price_parsed": 1.0}


def test_number_metric_reads_the_first_number_with_thousands_separators():
    m = task_metrics(["about 1,200 units", "no idea", "-3.5"], ["1000", "7", "-4"], "number")
    assert m["number_mae"] == pytest.approx((200 + 7 + 0.5) / 3)
    assert m["number_parsed"] == pytest.approx(2 / 3)


def test_number_metric_reads_the_pattern_group_when_a_pattern_is_set():
    preds = ["Step 1 gives 10. Answer: 42", "Answer: none"]
    refs = ["Answer: 40", "Answer: 3"]
    m = task_metrics(preds, refs, "number", r"Answer:\s*(\S+)")
    assert m["number_mae"] == pytest.approx((2 + 3) / 2)  # "Step 1" and "10" are not read
    assert m["number_parsed"] == 0.5
    assert parse_number("Answer: 1,234.5 dollars", r"Answer: ([\d,.]+)") == 1234.5
    assert parse_number("nothing") is None


def test_exact_match_ignores_case_repeated_spaces_and_a_final_period():
    preds = ["Paris.", "  the  BLUE whale", "Lyon"]
    refs = ["paris", "The blue whale!", "Paris"]
    assert task_metrics(preds, refs, "exact_match") == {"exact_match": pytest.approx(2 / 3)}
    assert normalize_answer("  A  b. ") == "a b"


def test_regex_metric_compares_group_one_and_counts_where_the_pattern_is_found():
    preds = ["Answer: B because", "Answer: C", "I think A"]
    refs = ["Answer: B", "Answer: D", "Answer: A"]
    m = task_metrics(preds, refs, "regex", r"Answer: (\w)")
    assert m == {"regex_match": pytest.approx(1 / 3), "regex_found": pytest.approx(2 / 3)}


def test_regex_metric_without_a_pattern_is_a_one_line_error_naming_the_key():
    with pytest.raises(LabError, match="eval.metric_pattern is empty"):
        task_metrics(["a"], ["a"], "regex")
    with pytest.raises(LabError, match="not a valid regular expression"):
        task_metrics(["a"], ["a"], "regex", "(unclosed")


def test_unknown_metric_kind_lists_the_valid_ones():
    with pytest.raises(LabError, match="eval.metric must be one of auto|price"):
        metric_kind({"eval": {"metric": "bleu"}}, ["x"])
    with pytest.raises(LabError, match="exact_match"):
        task_metrics(["a"], ["a"], "bleu")


def test_auto_metric_picks_price_then_number_then_exact_match():
    assert metric_kind({"eval": {"metric": "auto"}}, ["Price is $3", "$4"]) == "price"
    assert metric_kind({"eval": {"metric": "auto"}}, ["42", " -1.5 "]) == "number"
    assert metric_kind({"eval": {"metric": "auto"}}, ["42", "Paris"]) == "exact_match"
    assert metric_kind({"eval": {"metric": "regex"}}, ["Price is $3"]) == "regex"


def test_lower_is_better_only_for_losses_and_errors():
    assert all(lower_is_better(k) for k in ("loss", "perplexity", "price_mae", "number_mae", "my_error"))
    assert not any(lower_is_better(k) for k in ("price_parsed", "exact_match", "regex_match"))


def _metrics(base_loss=3.0, tuned_loss=1.0, base_mae=80.0, tuned_mae=5.0, tuned_parsed=1.0):
    side = lambda loss, mae, parsed: {"loss": loss, "perplexity": math.exp(loss),  # noqa: E731
                                      "price_mae": mae, "price_parsed": parsed}
    return {"base": side(base_loss, base_mae, 0.0), "tuned": side(tuned_loss, tuned_mae, tuned_parsed),
            "best_checkpoint": "checkpoint-40", "rows": 10,
            "checkpoints": [{"name": "checkpoint-20", "step": 20, "loss": 1.4},
                            {"name": "checkpoint-40", "step": 40, "loss": 1.0}]}


def test_verdict_says_it_worked_only_when_every_measure_improves():
    assert verdict(_metrics()).startswith("It worked")
    assert "0.33× the base" in verdict(_metrics())
    assert "checkpoint-40" in verdict(_metrics())
    assert verdict(_metrics(tuned_mae=90.0)).startswith("Mixed result")
    assert verdict(_metrics(tuned_loss=3.5, tuned_mae=90.0, tuned_parsed=0.0)).startswith("It did not work")


def test_metrics_table_marks_the_winner_by_each_metrics_direction():
    rows = {r["metric"].split()[0]: r for r in metrics_table(_metrics(tuned_mae=90.0))}
    assert rows["loss"]["tuned better?"] == "yes"
    assert rows["price_mae"]["tuned better?"] == "no"  # 90 > 80: worse, as lower is better
    assert rows["price_parsed"]["tuned better?"] == "yes"
    assert set(rows) == {"loss", "perplexity", "price_mae", "price_parsed"}


def test_evaluation_sample_is_seeded_sorted_and_the_whole_split_when_small():
    assert eval_sample(10, 200, seed=1) == list(range(10))
    a, b = eval_sample(1000, 50, seed=42), eval_sample(1000, 50, seed=42)
    assert a == b and a == sorted(a) and len(set(a)) == 50
    assert eval_sample(1000, 50, seed=43) != a


def test_plots_are_written_to_the_eval_folder(tmp_path):
    from lab_utils.plots import plot_loss_curve, plot_task_metric

    run = Run(name="r", dir=tmp_path, cfg=copy.deepcopy(DEFAULTS))
    (tmp_path / "log_history.json").write_text(json.dumps([{"step": 10, "loss": 3.0}, {"step": 20, "loss": 1.5},
                                                           {"step": 20, "eval_loss": 1.6}]))
    for path in (plot_loss_curve(run, _metrics()), plot_task_metric(run, _metrics())):
        assert path.parent == run.eval_dir and path.suffix == ".png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- which adapter ships


def _fake_adapter(folder, weights: bytes, training_state: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "tokenizer_config.json").write_text("{}")
    if training_state:
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "lab_manifest.json"):
            (folder / name).write_bytes(b"state")


@pytest.fixture
def adapters(tmp_path):
    """A run folder with a final adapter and two checkpoints (files only), eval says checkpoint-20 is best."""
    cfg = copy.deepcopy(DEFAULTS)
    run = Run(name="r", dir=tmp_path, cfg=cfg)
    _fake_adapter(run.adapter_dir, b"final")
    _fake_adapter(run.checkpoints_dir / "checkpoint-20", b"early", training_state=True)
    _fake_adapter(run.checkpoints_dir / "checkpoint-40", b"final", training_state=True)
    run.eval_dir.mkdir()
    (run.eval_dir / "metrics.json").write_text(json.dumps(
        {"best_checkpoint": "checkpoint-20", "tuned_adapter_hash": adapter_hash(run.adapter_dir)}))
    return run


def test_export_takes_the_best_checkpoint_by_default(adapters):
    src, why = export_adapter_source(adapters)
    assert src == adapters.checkpoints_dir / "checkpoint-20"
    assert "best checkpoint" in why


def test_export_takes_the_final_adapter_when_told_last(adapters):
    adapters.cfg["export"]["adapter"] = "last"
    assert export_adapter_source(adapters)[0] == adapters.adapter_dir
    adapters.cfg["export"]["adapter"] = "newest"
    with pytest.raises(LabError, match="export.adapter must be 'best' or 'last'"):
        export_adapter_source(adapters)


def test_export_falls_back_to_the_final_adapter_when_the_evaluation_is_stale_or_missing(adapters):
    (adapters.adapter_dir / "adapter_model.safetensors").write_bytes(b"trained further")
    src, why = export_adapter_source(adapters)
    assert src == adapters.adapter_dir and "run 03_evaluate again" in why
    (adapters.eval_dir / "metrics.json").unlink()
    assert export_adapter_source(adapters)[0] == adapters.adapter_dir


def test_export_names_the_final_adapter_when_it_is_the_best_checkpoint(adapters):
    metrics = json.loads((adapters.eval_dir / "metrics.json").read_text())
    metrics["best_checkpoint"] = "checkpoint-40"  # same weights as adapter/
    (adapters.eval_dir / "metrics.json").write_text(json.dumps(metrics))
    src, why = export_adapter_source(adapters)
    assert src == adapters.adapter_dir and "checkpoint-40" in why


def test_exported_best_checkpoint_holds_the_adapter_without_training_state(adapters):
    from lab_utils.export import export_adapter

    dest = export_adapter(adapters)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"early"
    assert (dest / "tokenizer_config.json").is_file()
    assert not [p.name for p in dest.iterdir() if p.name in TRAINING_STATE_FILES]


def test_export_default_is_registered_in_the_config():
    assert DEFAULTS["export"]["adapter"] == "best"


# ---------------------------------------------------------------------------------------------- chat widget


@pytest.fixture(scope="module")
def tiny_model():
    """The embedded tiny Llama in 4 bits with a fresh LoRA adapter, and its tokenizer."""
    from lab_utils.model import add_lora, load_base_model, load_tokenizer

    cfg = copy.deepcopy(DEFAULTS)
    tok = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg), cfg)
    model.eval()
    return model, tok


def test_chat_widget_is_built_without_waiting_for_input(tiny_model):
    import ipywidgets as w

    from lab_utils.chatui import ChatUI

    model, tok = tiny_model
    ui = ChatUI(model, tok, system="You are a pricing assistant.", max_new_tokens=4)
    assert isinstance(ui.widget, w.VBox)
    buttons = [c for c in ui.widget.children[2].children if isinstance(c, w.Button)]
    assert [b.description for b in buttons] == ["Send", "Reset"]
    assert "no messages yet" in ui.transcript.value
    assert ui.conversation() == [{"role": "system", "content": "You are a pricing assistant."}]


def test_chat_streams_a_reply_through_the_chat_template_and_reset_clears_it(tiny_model):
    from lab_utils.chatui import ChatUI

    model, tok = tiny_model
    ui = ChatUI(model, tok, max_new_tokens=4)
    pieces = list(ui.stream("How much is a <b>Pro</b> webcam?"))
    assert pieces, "the streamer yielded nothing"
    assert [m["role"] for m in ui.messages] == ["user", "assistant"]
    assert ui.messages[1]["content"] == "".join(pieces).strip()
    assert "&lt;b&gt;Pro&lt;/b&gt;" in ui.transcript.value  # escaped, never rendered as HTML
    ui.box.value = "and a monitor?"
    ui._on_send()  # what the Send button does
    assert len(ui.messages) == 4 and ui.box.value == "" and not ui.send_button.disabled
    ui.reset()
    assert ui.messages == [] and "no messages yet" in ui.transcript.value


# ---------------------------------------------------------------------------------------------- a trained run (slow)

@pytest.fixture(scope="module")
def trained(trained_run):
    """The shared run (checkpoints 20 and 40, evaluated by the 03 script): (env, run folder, 03's output)."""
    return trained_run.env, trained_run.dir, trained_run.outputs["03_evaluate"].stdout


def _start(env, monkeypatch):
    from lab_utils.run import start

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return start(quiet=True)


@pytest.mark.slow
def test_evaluate_script_leaves_metrics_plots_and_generations_in_eval(trained):
    _, run_dir, out = trained
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for side in ("base", "tuned"):
        assert {"loss", "perplexity", "price_mae", "price_parsed"} <= set(m[side])
        assert m[side]["perplexity"] == pytest.approx(math.exp(m[side]["loss"]))
    assert m["tuned"]["loss"] < m["base"]["loss"]
    assert [c["name"] for c in m["checkpoints"]] == ["checkpoint-20", "checkpoint-40"]
    for name in ("loss_curve.png", "task_metric.png", "generations.jsonl"):
        assert (run_dir / "eval" / name).stat().st_size > 0
    gens = [json.loads(x) for x in (run_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == m["rows"] and {"prompt", "reference", "base", "tuned"} <= set(gens[0])
    assert "interactive in Colab" in out  # the chat cell built its widget and did not wait
    # the naive baseline: the training split's median price, scored on the same rows, in the table and the verdict
    import datasets

    from lab_utils.embedded import parse_price

    train = sorted(parse_price(x[-1]["content"]) for x in datasets.load_from_disk(str(run_dir / "data" / "dataset"))["train"]["messages"])
    b = m["baseline"]
    assert parse_price(b["answer"]) == train[(len(train) - 1) // 2] and b["price_parsed"] == 1.0
    refs = [g["reference"] for g in gens]
    assert b["price_mae"] == pytest.approx(sum(abs(parse_price(b["answer"]) - parse_price(r)) for r in refs) / len(refs))
    assert b["margin"]["tuned"]["price_mae"] > 0
    assert "constant guess" in out and "always answering" in out


@pytest.mark.slow
def test_best_checkpoint_has_the_lowest_loss_and_each_loss_is_that_adapter_alone(trained, monkeypatch):
    from peft import PeftModel

    from lab_utils.data import load_prepared
    from lab_utils.evaluation import assistant_loss, eval_sample
    from lab_utils.model import load_base_model, load_tokenizer

    env, run_dir, _ = trained
    run = _start(env, monkeypatch)
    m = json.loads((run.eval_dir / "metrics.json").read_text())
    losses = {c["name"]: c["loss"] for c in m["checkpoints"]}
    assert m["best_checkpoint"] == min(losses, key=losses.get)
    val = load_prepared(run)["validation"]
    ds = val.select(eval_sample(len(val), m["rows"], run.cfg["data"]["seed"]))
    tok = load_tokenizer(run.cfg)
    # checkpoint-20 loaded the ordinary way, on a fresh base: the switched-in adapter must give the same loss
    # (up to rounding: bitsandbytes' CPU 4-bit kernel computes in bf16, so a recomputation agrees to ~1e-4..1e-3)
    alone = PeftModel.from_pretrained(load_base_model(run.cfg), str(run.checkpoints_dir / "checkpoint-20")).eval()
    assert assistant_loss(alone, ds, pad_id=tok.pad_token_id) == pytest.approx(losses["checkpoint-20"], rel=2e-3)
    # a wrong adapter would show: the two losses differ by well over the 2e-3 the match above allows
    assert losses["checkpoint-20"] != pytest.approx(losses["checkpoint-40"], rel=1e-2)


@pytest.mark.slow
def test_second_evaluation_reuses_every_finished_part_without_loading_a_model(trained, monkeypatch, capsys):
    from lab_utils.evaluation import evaluate_run

    env, run_dir, _ = trained
    run = _start(env, monkeypatch)
    first = json.loads((run.eval_dir / "metrics.json").read_text())
    again = evaluate_run(run)
    out = capsys.readouterr().out
    assert "Reusing 5 of 5 finished parts" in out
    assert again["parts"]["computed"] == []
    for side in ("base", "tuned"):
        assert again[side] == first[side]
    assert again["checkpoints"] == first["checkpoints"]


@pytest.mark.slow
def test_evaluation_cut_off_midway_recomputes_only_the_missing_part(trained, monkeypatch, capsys):
    from lab_utils.evaluation import evaluate_run

    env, run_dir, _ = trained
    run = _start(env, monkeypatch)
    first = json.loads((run.eval_dir / "metrics.json").read_text())
    cache = run.eval_dir / "cache"
    lost = [p for p in cache.glob("loss-*.json") if json.loads(p.read_text())["label"] == "checkpoint-20 loss"]
    assert len(lost) == 1
    lost[0].unlink()
    again = evaluate_run(run)
    assert "Reusing 4 of 5 finished parts" in capsys.readouterr().out
    assert again["parts"]["computed"] == ["checkpoint-20 loss"]
    assert again["checkpoints"][0]["loss"] == pytest.approx(first["checkpoints"][0]["loss"], rel=2e-3)  # bf16 CPU kernel


@pytest.fixture(scope="module")
def best_elsewhere(trained, tmp_path_factory):
    """A copy of the trained run whose final adapter is its worse checkpoint, evaluated; return (run, metrics, first, copy)."""
    import shutil

    from lab_utils.evaluation import evaluate_run

    env, run_dir, _ = trained
    first = json.loads((run_dir / "eval" / "metrics.json").read_text())
    worse = max(first["checkpoints"], key=lambda c: c["loss"])["name"]
    root = tmp_path_factory.mktemp("bestcopy")
    copy_dir = root / "runs" / run_dir.name
    shutil.copytree(run_dir, copy_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the final adapter = the worse checkpoint
        shutil.copy2(copy_dir / "checkpoints" / worse / name, copy_dir / "adapter" / name)
    with pytest.MonkeyPatch.context() as mp:
        run = _start({**env, "LAB_ROOT": str(root / "runs")}, mp)
        m = evaluate_run(run)
    return run, m, first, worse


@pytest.mark.slow
def test_a_best_checkpoint_other_than_the_final_adapter_is_scored_and_exported(best_elsewhere):
    run, m, first, worse = best_elsewhere
    assert m["best_checkpoint"] == first["best_checkpoint"] != worse
    assert m["best"]["loss"] == pytest.approx(min(c["loss"] for c in first["checkpoints"]))
    assert m["tuned"]["loss"] == pytest.approx(max(c["loss"] for c in first["checkpoints"]))
    # the first evaluation already scored the best checkpoint either as its final adapter or as "best" beside it
    was_final = "best" not in first
    assert m["best"]["price_mae"] == (first["tuned"] if was_final else first["best"])["price_mae"]
    # everything else was cached under the same adapter hashes (the worse one's answers too when it was final)
    assert m["parts"]["computed"] == (["tuned answers"] if was_final else [])
    gens = [json.loads(x) for x in (run.eval_dir / "generations.jsonl").read_text().splitlines()]
    assert "best" in gens[0]
    assert export_adapter_source(run)[0] == run.checkpoints_dir / first["best_checkpoint"]
    assert "04_export ships it" in verdict(m)


@pytest.mark.slow
def test_chat_widget_on_a_run_prints_one_line_in_a_script_and_returns(trained, monkeypatch, capsys):
    from lab_utils.chatui import ChatUI, chat_widget

    env, run_dir, _ = trained
    run = _start(env, monkeypatch)
    ui = chat_widget(run, max_new_tokens=4)
    out = capsys.readouterr().out.strip().splitlines()
    assert isinstance(ui, ChatUI)
    assert out[-1].startswith("Chat widget ready") and "interactive in Colab" in out[-1]
    assert ui.system and "pricing" in ui.system.lower()  # the training rows' system prompt


@pytest.mark.slow
def test_eval_knobs_from_the_config_bound_the_work_and_the_cost_is_printed(trained, tmp_path, monkeypatch, capsys):
    """eval.checkpoints: none skips the checkpoints' loss passes; eval.rows picks the rows; each part's seconds printed."""
    import shutil

    import yaml

    from lab_utils.evaluation import evaluate_run

    env, run_dir, out03 = trained
    assert "Evaluation took " in out03 and "Work: " in out03  # the 03 script said what it would do and what it cost
    # 03's own line (the fixture's first evaluation, nothing cached yet): later tests in this session re-run
    # evaluate_run on the same run and rewrite metrics.json with only the parts they did not find cached
    took = next(line for line in out03.splitlines() if line.startswith("Evaluation took "))
    assert all(part in took for part in ("base loss", "tuned loss", "base answers", "tuned answers")), took
    names = [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    final = max(names, key=lambda n: int(n.split("-")[1]))
    copy_dir = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy_dir)
    cfg = yaml.safe_load((copy_dir / "config.yaml").read_text())
    cfg["eval"].update(checkpoints="none", rows=5)
    (copy_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.delenv("LAB_CONFIG", raising=False)
    env = {**{k: v for k, v in env.items() if k != "LAB_CONFIG"}, "LAB_ROOT": str(tmp_path / "runs"),
           "LAB_RUN_NAME": run_dir.name}
    run = _start(env, monkeypatch)
    m = evaluate_run(run)
    out = capsys.readouterr().out
    assert m["rows"] == 5 and "Work: 2 loss passes and 2 generation passes" in out
    assert [c["name"] for c in m["checkpoints"]] == [final]  # the final only
    assert "checkpoint-20 loss" not in m["seconds"] and "Evaluation took " in out
