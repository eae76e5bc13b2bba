"""Data preparation's two cheap wins: workers from free cores, and a map cache key that skips hashing the tokenizer."""

from __future__ import annotations

import pytest

from lab_utils import data


@pytest.mark.parametrize(
    "cores, load, rows, expected",
    [
        (2, 1.0, 50_000, 2),  # quiet 2-core machine: our own process is the 1.0
        (2, 6.0, 50_000, None),  # busy 2-core machine: a second worker only competes
        (2, 2.2, 50_000, None),
        (8, 3.0, 50_000, 4),  # 6 free, at most 4
        (8, 0.2, 1_000, None),  # small data: worker start-up costs more than it saves
    ],
)
def test_auto_num_proc_counts_free_cores_not_all_cores(monkeypatch, cores, load, rows, expected):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(data.os, "getloadavg", lambda: (load, load, load))
    assert data._auto_num_proc(rows) == expected


def test_map_is_given_its_cache_key_from_the_data_fingerprint(lab_root, monkeypatch):
    import datasets

    import lab_utils as lab

    keys = []
    real_map = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        keys.append(kwargs.get("new_fingerprint"))
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    for name, length in (("a", 64), ("b", 64), ("c", 96)):
        run = lab.start(name, form={"data.limit": 40, "model.max_length": length}, quiet=True)
        lab.prepare_data(run, lab.load_tokenizer(run.cfg))
    assert keys and all(keys)  # datasets never falls back to hashing fn_kwargs (the tokenizer)
    a, b, c = keys[: len(keys) // 3], keys[len(keys) // 3 : 2 * len(keys) // 3], keys[2 * len(keys) // 3 :]
    assert a == b  # same inputs, same key: the datasets cache is reused
    assert not set(a) & set(c)  # another max_length: another key
