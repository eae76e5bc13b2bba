"""The bench's own measuring parts: the data it trains on, how it counts padding, how it summarises."""

import importlib.util
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
    def run(config, tps, rep):
        return {
            "config": config,
            "rep": rep,
            "tokens_per_s": tps,
            "rss_peak_gib": 1.0,
            "timed": {"padding_waste": 0.1},
            "full_epoch": {"padding_waste": 0.05},
            "estimated_peak_gib": {},
            "settings": {},
        }

    runs = [run("seed", 100, 0), run("default", 300, 0), run("seed", 50, 1), run("default", 200, 1)]
    runs += [run("seed", 100, 2), run("default", 250, 2)]
    s = bench.summarize(runs)
    assert s["tokens_per_s_ratio_pairs"] == [3.0, 4.0, 2.5]
    assert s["tokens_per_s_ratio_default_over_seed"] == 3.0
