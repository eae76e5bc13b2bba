"""The bench's own measuring parts: the data it trains on, how it counts padding, how it summarises."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_lengths_are_long_tailed_like_finetome_and_capped_at_max_length(bench):
    lengths = bench.row_lengths(4000, 2048)
    median = statistics.median(lengths)
    p95 = sorted(lengths)[int(0.95 * len(lengths))]
    assert 380 <= median <= 460
    assert p95 > 3 * median  # a long tail, not a bell
    assert max(lengths) == 2048 and min(lengths) >= 48
    assert bench.row_lengths(50, 2048) == bench.row_lengths(50, 2048)  # the same data every run


def test_bench_lengths_scale_with_max_length_so_padding_ratios_do_not_change(bench):
    full, quarter = bench.row_lengths(4000, 2048), bench.row_lengths(4000, 512)
    assert max(quarter) == 512
    assert statistics.mean(quarter) / 512 == pytest.approx(statistics.mean(full) / 2048, rel=0.02)


@pytest.mark.slow  # importing trl takes seconds
def test_counting_collator_counts_pad_tokens_of_the_real_collator(bench):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    counter = bench.CountingCollator(DataCollatorForLanguageModeling(pad_token_id=3, pad_to_multiple_of=8))
    batch = counter(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}]
    )
    assert tuple(batch["input_ids"].shape) == (2, 8)
    s = counter.summary()
    assert (s["tokens"], s["real_tokens"], s["pad_tokens"], s["loss_tokens"]) == (16, 8, 8, 6)
    assert s["padding_waste"] == 0.5


def test_summary_reports_the_median_of_interleaved_pair_ratios(bench):
    runs = [_summarized_run("seed", 0, 100, 100, 1), _summarized_run("default", 0, 300, 300, 1)]
    runs += [_summarized_run("seed", 1, 50, 50, 1), _summarized_run("default", 1, 200, 200, 1)]
    runs += [_summarized_run("seed", 2, 100, 100, 1), _summarized_run("default", 2, 250, 250, 1)]
    s = bench.summarize(runs)
    assert s["tokens_per_s_ratio_pairs"] == [3.0, 4.0, 2.5]
    assert s["tokens_per_s_ratio_default_over_seed"] == 3.0


def _summarized_run(config, rep, cpu_tps, wall_tps, peak):
    return {
        "config": config,
        "rep": rep,
        "tokens_per_cpu_s": cpu_tps,
        "tokens_per_s": wall_tps,
        "cpu_seconds": 1000 / cpu_tps,
        "seconds": 1000 / wall_tps,
        "rss_peak_gib": peak,
        "timed": {"padding_waste": 0.1},
        "full_epoch": {"padding_waste": 0.05},
        "estimated_peak_gib": {},
        "settings": {},
    }


def test_summary_names_the_best_trl_setting_and_the_lowest_memory_and_ratios_use_cpu_time(bench):
    runs = []
    for rep, noise in enumerate((1.0, 0.5, 1.0)):  # repeat 1 ran on a busy machine: wall clock halves
        runs += [
            _summarized_run("seed", rep, 100, 100 * noise, 0.7),
            _summarized_run("default", rep, 300, 300 * noise, 1.1),
            _summarized_run("trl-as-is", rep, 150, 150 * noise, 1.0),
            _summarized_run("trl-packing-1x4", rep, 250, 250 * noise, 0.6),
        ]
    s = bench.summarize(runs)
    assert s["best_trl_setting"] == "trl-packing-1x4" and s["lowest_memory"] == "trl-packing-1x4"
    assert s["tokens_per_s_ratio_default_over_seed"] == 3.0
    assert s["tokens_per_s_ratio_default_over_best_trl"] == pytest.approx(1.2)
    assert s["peak_memory_ratio_default_over_lowest"] == pytest.approx(1.1 / 0.6)
    assert s["fastest"] == "default"
    assert s["configs"]["seed"]["tokens_per_s"] == {"min": 50, "median": 100, "max": 100}


@pytest.fixture(scope="module")
def bench_runs(bench, tmp_path_factory):
    """The bench's own path at tiny sizes, in this process: prepare() then one worker per kind of configuration."""
    work = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("LAB_ROOT", "LAB_CONFIG", "LAB_RUN_NAME", "LAB_PROFILE"):
            mp.delenv(var, raising=False)
        mp.setenv("LAB_ROOT", str(work / "runs"))  # restored afterwards (the bench sets it itself)
        report = bench.prepare(work, bench.bench_model(work, 64), rows=60, max_length=64)
        runs = []
        for config in ("seed", "default", "trl-packing-1x4", "trl-padding-free"):
            out = work / f"{config}.json"
            bench.worker(config, work, 12, out, bench.RUN_NAME, "plain", None)
            runs.append({**json.loads(out.read_text()), "rep": 0, "wall_seconds": 1.0})
    return report, runs


@pytest.mark.slow
def test_bench_prepares_its_data_from_a_fresh_folder_and_every_kind_of_run_trains(bench_runs):
    report, runs = bench_runs
    assert report["rows_in"] == 60 and report["length_stats"]["max"] <= 64
    by = {r["config"]: r for r in runs}
    assert by["seed"]["timed"]["padding_waste"] > 0.3  # every row padded to max_length
    assert by["default"]["timed"]["padding_waste"] < by["seed"]["timed"]["padding_waste"]
    for r in runs:
        assert r["optimizer_steps"] >= 1 and r["cpu_seconds"] > 0 and r["rss_peak_gib"] > 0
    assert by["trl-packing-1x4"]["settings"]["packing"] is True
    assert by["trl-packing-1x4"]["timed"]["padding_waste"] == 0  # packed rows carry no padding
    assert by["trl-padding-free"]["settings"]["padding_free"] is True
    assert by["trl-packing-1x4"]["timed"]["real_tokens"] == by["default"]["timed"]["real_tokens"]  # same rows


@pytest.mark.slow
def test_bench_report_of_a_real_run_has_every_configuration_and_the_headline_ratios(bench, bench_runs):
    report, runs = bench_runs
    summary = bench.summarize(runs)
    res = {
        "date": "today", "machine": {"platform": "x", "cpus": 2, "torch": "t", "loadavg_start": [0, 0, 0]},
        "max_length": 64, "threads": 1, "timed_rows": 12, "repeats": 1, "defaults_cli": [],
        "gpu": {"skipped": "no CUDA"}, "data": {"length_stats": report["length_stats"]}, "cpu": summary,
    }
    res["notes"] = bench.notes(res)
    md = bench.markdown(res)
    for name in ("seed", "default", "trl-packing-1x4", "trl-padding-free"):
        assert f"| {name} |" in md or f"| **{name}** |" in md
    assert "over the best TRL setting" in md and "peak memory over the lowest" in md
    for key in ("padding_waste_default", "padding_waste_seed", "tokens_per_s_ratio_default_over_seed",
                "tokens_per_s_ratio_default_over_best_trl", "peak_memory_ratio_default_over_lowest"):
        assert summary[key] is not None and summary[key] >= 0


@pytest.mark.slow
def test_resume_overhead_bench_resumes_from_its_middle_checkpoint(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_resume", BENCH.parent / "resume_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for var in ("LAB_CONFIG", "LAB_RUN_NAME", "LAB_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    assert module.main(["--rows", "40", "--max-length", "64", "--steps", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "resume_overhead.json").read_text())
    assert result["sizes"]["resumed_from_step"] == 2
    assert 0 < result["cold_start_to_first_step_s"] and 0 < result["resume_to_first_new_step_s"]
