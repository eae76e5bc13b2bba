"""Benchmark: rows per second of `lab_utils.data.prepare` on a FineTome-sized synthetic ShareGPT file.

    python bench/bench_data.py                 # 100k conversations, num_proc auto (all cores ≤ 4)
    python bench/bench_data.py --rows 20000 --num-proc 1 2   # compare worker counts

The file imitates mlabonne/FineTome-100k (100,000 rows, ~240 MB as Arrow, ~2.4 kB per row, columns
`conversations` [{from, value}], `source`, `score`): 1 exchange in 75% of rows, 2 in 12%, 3 in 7%,
4-6 in 6%; a system turn in 10%; human turns ~220 characters (median, log-normal σ=1.0), answers
~1000 (σ=0.7) with paragraphs and the odd code block, every row capped at 20k characters. Text is
English-like words (Zipf-weighted), so the embedded tokenizer (512 pieces, trained on the Pricer
data) needs roughly twice the tokens a real 32k-150k vocabulary would: the rates here are a
pessimistic bound per token and realistic per row. model.max_length is 4096, so few rows are long.

Timings on a shared machine are inflated by whatever else runs there; each number comes from
one run, and a ratio between runs taken back to back is more trustworthy than an absolute rate.
The generated file lives in a temporary folder and is deleted afterwards (never commit it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = (
    "the of and to a in is that for it as with was on be by this are or from at an which but not have has "
    "can will more about data model function value when use each other time number way people water "
    "first called system process result example energy because between important different following "
    "students history equation python variable list return class string program algorithm cells light "
    "temperature pressure population government economic language writing answer question explain "
    "therefore however specifically generally calculate determine consider describe include provide"
).split()
CODE = "```python\ndef solve(values):\n    total = 0\n    for v in values:\n        total += v * v\n    return total\n```"


def _text(rng: random.Random, median_chars: float, sigma: float) -> str:
    target = min(20_000, max(20, int(rng.lognormvariate(0, sigma) * median_chars)))
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    out, size = [], 0
    while size < target:
        sentence = " ".join(rng.choices(WORDS, weights, k=rng.randint(6, 22)))
        sentence = sentence[0].upper() + sentence[1:] + rng.choice((".", ".", ".", "?", ":"))
        if rng.random() < 0.12:
            sentence += "\n\n"
        if rng.random() < 0.01:
            sentence += "\n" + CODE + "\n"
        out.append(sentence)
        size += len(sentence) + 1
    return " ".join(out)


def synthetic_row(rng: random.Random) -> dict:
    """Return one FineTome-like ShareGPT row."""
    pairs = rng.choices((1, 2, 3, 4, 5, 6), (75, 12, 7, 3, 2, 1))[0]
    turns = []
    if rng.random() < 0.10:
        turns.append({"from": "system", "value": _text(rng, 120, 0.5)})
    for _ in range(pairs):
        turns.append({"from": "human", "value": _text(rng, 220, 1.0)})
        turns.append({"from": "gpt", "value": _text(rng, 1000, 0.7)})
    return {
        "conversations": turns,
        "source": rng.choice(("infini-instruct", "webinstruct", "magpie")),
        "score": 4.5,
    }


def write_file(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps(synthetic_row(rng)) + "\n")


def bench(path: Path, num_proc: int | None, root: Path, tokenizer) -> dict:
    """Return timing and report numbers of one fresh `prepare` of `path`."""
    import datasets

    from lab_utils.config import resolve_config
    from lab_utils.data import prepare
    from lab_utils.run import Run

    name = f"bench-np{num_proc}"
    cfg = resolve_config(form={"run_name": name, "data.path": str(path), "model.max_length": 4096})
    run = Run(name=name, dir=root / name, cfg=cfg)
    datasets.disable_caching()  # measure the work, not a reused datasets.map cache
    t0 = time.perf_counter()
    prepare(run, tokenizer, num_proc=num_proc)
    seconds = time.perf_counter() - t0
    report = json.loads((run.data_dir / "data_report.json").read_text())
    shutil.rmtree(run.dir, ignore_errors=True)
    return {"seconds": seconds, "rows_per_s": report["rows_in"] / seconds, "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, nargs="*", default=[0], help="worker counts to compare; 0 = auto")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from lab_utils.embedded import tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        path = tmp / "finetome-like.jsonl"
        t0 = time.perf_counter()
        write_file(path, args.rows)
        print(
            f"Wrote {args.rows} rows, {path.stat().st_size / 1e6:.0f} MB, in {time.perf_counter() - t0:.0f} s"
        )
        print(
            f"cores available: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
        )
        results = []
        for n in args.num_proc:
            r = bench(path, n or None, tmp, tokenizer)
            results.append((n, r))
            stats = r["report"]["length_stats_before_limit"]
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
            print(
                f"num_proc={'auto' if n == 0 else n}: {r['seconds']:.1f} s, {r['rows_per_s']:.0f} rows/s, "
                f"peak memory of this process so far {rss:.0f} MB "
                f"(tokens per row p50 {stats['p50']}, p95 {stats['p95']}, max {stats['max']}; "
                f"kept {r['report']['rows_kept']}, dropped {r['report']['dropped_by_reason']})"
            )
        if len(results) > 1:
            best: dict[int, float] = {}
            for n, r in results:
                best[n] = min(best.get(n, float("inf")), r["seconds"])
            base = best[results[0][0]]
            for n, seconds in best.items():
                label = "auto" if n == 0 else n
                print(
                    f"  num_proc={label}: best of its runs {seconds:.1f} s, {base / seconds:.2f}x the first setting"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
