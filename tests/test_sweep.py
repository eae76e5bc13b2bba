"""05_sweep: a search space in the config, one resumable run folder per trial, a comparison and a best config."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from conftest import NOTEBOOKS, run_script
from lab_utils import sweep as sw
from lab_utils.config import DEFAULTS, resolve_config
from lab_utils.errors import LabError

# --- the search space ------------------------------------------------------------------------------


def _spec(**over):
    return {**DEFAULTS["sweep"], **over}


def test_grid_tries_every_combination_in_key_order():
    spec = _spec(space={"train.learning_rate": [2e-4, 1e-3], "lora.r": [8, 16, 32]})
    combos = sw.combinations(spec)
    assert len(combos) == 6
    assert combos[0] == {"train.learning_rate": 2e-4, "lora.r": 8}
    assert combos[1] == {"train.learning_rate": 2e-4, "lora.r": 16}
    assert combos[-1] == {"train.learning_rate": 1e-3, "lora.r": 32}


def test_random_search_draws_the_same_trials_for_the_same_seed_within_the_ranges():
    space = {"train.learning_rate": {"min": 1e-5, "max": 1e-2, "log": True}, "lora.r": {"min": 4, "max": 64}}
    a = sw.combinations(_spec(method="random", trials=6, space=space, seed=1))
    b = sw.combinations(_spec(method="random", trials=6, space=space, seed=1))
    c = sw.combinations(_spec(method="random", trials=6, space=space, seed=2))
    assert a == b and a != c and len(a) == 6
    for draw in a:
        assert 1e-5 <= draw["train.learning_rate"] <= 1e-2
        assert isinstance(draw["lora.r"], int) and 4 <= draw["lora.r"] <= 64
    # log-uniform: over three decades, not all draws land in the top one
    assert min(d["train.learning_rate"] for d in a + c) < 1e-3


def test_random_search_from_lists_never_repeats_a_trial():
    draws = sw.combinations(_spec(method="random", trials=20, space={"lora.r": [8, 16]}))
    assert sorted(d["lora.r"] for d in draws) == [8, 16]


def test_trial_folder_names_read_as_their_settings():
    assert sw.trial_slug({"train.learning_rate": 1e-3, "lora.r": 16}) == "lr1e-3_r16"
    assert sw.trial_slug({"train.learning_rate": 2.5e-4, "lora.lora_dropout": 0.05}) == "lr2.5e-4_dropout0.05"
    assert sw.trial_slug({"lora.target_modules": ["q_proj", "v_proj"]}) == "targetsq_proj+v_proj"
    assert sw.trial_slug({"train.lr_scheduler_type": "cosine with/slash"}) == "schedcosine-with-slash"


# --- the sweep: section of the config ---------------------------------------------------------------


def _config_with(tmp_path, monkeypatch, sweep: dict) -> dict:
    path = tmp_path / "lab.yml"
    path.write_text(yaml.safe_dump({"run_name": "s", "sweep": sweep}))
    monkeypatch.setenv("LAB_CONFIG", str(path))
    return resolve_config()


def test_a_yaml_space_replaces_the_default_space_instead_of_merging(tmp_path, monkeypatch):
    cfg = _config_with(tmp_path, monkeypatch, {"space": {"lora.lora_dropout": [0.0, 0.1]}})
    assert cfg["sweep"]["space"] == {"lora.lora_dropout": [0.0, 0.1]}
    assert cfg["sweep"]["max_steps"] == DEFAULTS["sweep"]["max_steps"]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"methd": "grid"}, "did you mean 'method'"),
        ({"method": "bayes"}, "sweep.method must be 'grid' or 'random'"),
        ({"space": {"model.max_length": [128, 256]}}, "not a train.* or lora.* key"),
        ({"space": {"train.learning_rte": [1e-3]}}, "did you mean 'learning_rate'"),
        ({"space": {"train.max_steps": [10, 20]}}, "use sweep.max_steps"),
        ({"space": {"lora.r": 16}}, "non-empty list"),
        ({"space": {"lora.r": {"min": 4, "max": 64}}}, "non-empty list"),  # ranges are for random search
        ({"method": "random", "space": {"lora.r": {"min": 4}}}, "{min: …, max: …"),
        ({"max_steps": 0}, "sweep.max_steps must be in [1"),
        ({"space": {}}, "sweep.space must map keys"),
    ],
)
def test_a_wrong_sweep_section_is_refused_naming_the_key(tmp_path, monkeypatch, sweep, message):
    with pytest.raises(LabError, match=None) as err:
        _config_with(tmp_path, monkeypatch, sweep)
    assert message in str(err.value)


# --- planning, matching earlier trials, best config (no training) --------------------------------


@pytest.fixture
def prepared_run(lab_root):
    """A run with a (stand-in) data report, enough to plan a sweep without training."""
    from lab_utils.run import start

    run = start("plan", form={"model.max_length": 128}, quiet=True)
    run.data_dir.mkdir(parents=True)
    (run.data_dir / "data_report.json").write_text(json.dumps({"fingerprint": "f1"}))
    return run


def test_planning_needs_the_processed_data(lab_root):
    from lab_utils.run import start

    run = start("nodata", quiet=True)
    with pytest.raises(LabError, match="run 01_data first"):
        sw.plan_sweep(run)


def test_notebook_knobs_set_the_sweep_and_each_trial_gets_the_budget(prepared_run):
    sweep = sw.plan_sweep(prepared_run, {"sweep.space": {"lora.r": [4, 8]}, "sweep.max_steps": 30})
    assert [t.name for t in sweep.trials] == ["trial-001-r4", "trial-002-r8"]
    t = sweep.trials[1]
    assert t.dir == prepared_run.dir / "sweep" / "trial-002-r8"
    assert t.cfg["lora"]["r"] == 8 and t.cfg["train"]["max_steps"] == 30
    assert t.cfg["train"]["save_steps"] == 15  # a checkpoint at least halfway through every trial
    assert t.data_dir == prepared_run.data_dir  # trials read the run's processed data
    assert "sweep" not in t.cfg
    assert yaml.safe_load((sweep.dir / "sweep.yaml").read_text())["space"] == {"lora.r": [4, 8]}


def test_an_unknown_knob_is_refused(prepared_run):
    with pytest.raises(LabError, match="did you mean 'max_steps'"):
        sw.plan_sweep(prepared_run, {"sweep.max_step": 10})


def _finish(trial, **metrics):
    trial.dir.mkdir(parents=True, exist_ok=True)
    sw._write_state(trial, name=trial.name, settings=trial.settings, key=trial.key, status="done",
                    metrics=metrics, train_loss=1.0, seconds=60)


def test_growing_the_space_keeps_finished_trials_and_numbers_new_ones_after_them(prepared_run):
    first = sw.plan_sweep(prepared_run, {"sweep.space": {"lora.r": [4, 16]}})
    for t in first.trials:
        _finish(t, eval_loss=1.0)
    grown = sw.plan_sweep(prepared_run, {"sweep.space": {"lora.r": [2, 4, 16]}})
    names = {t.settings["lora.r"]: t.name for t in grown.trials}
    assert names == {4: "trial-001-r4", 16: "trial-002-r16", 2: "trial-003-r2"}
    assert [row["status"] for row in sw.plan_table(grown)] == ["to run", "done", "done"]


def test_a_changed_budget_is_a_new_trial_not_a_finished_one(prepared_run):
    first = sw.plan_sweep(prepared_run, {"sweep.space": {"lora.r": [4]}, "sweep.max_steps": 10})
    _finish(first.trials[0], eval_loss=1.0)
    longer = sw.plan_sweep(prepared_run, {"sweep.space": {"lora.r": [4]}, "sweep.max_steps": 20})
    assert longer.trials[0].name == "trial-002-r4"


def test_best_trial_is_lowest_loss_or_highest_share_and_ranks_the_table(prepared_run):
    sweep = sw.plan_sweep(prepared_run, {"sweep.space": {"train.learning_rate": [1e-4, 3e-4, 1e-3]}})
    a, b, c = sweep.trials
    _finish(a, eval_loss=2.0, price_parsed=0.9)
    _finish(b, eval_loss=1.5, price_parsed=0.5)
    c.dir.mkdir(parents=True)
    sw._write_state(c, name=c.name, key=c.key, status="failed", error="out of memory")
    assert sw.best_trial(sweep) is b
    rows = {r["trial"]: r for r in sw.sweep_table(sweep)}
    assert rows[b.name]["rank"] == 1 and rows[a.name]["rank"] == 2 and rows[c.name]["rank"] == ""
    assert rows[c.name]["status"] == "failed: out of memory"
    assert rows[a.name]["lr"] == "1e-4" and rows[a.name]["val loss"] == 2.0 and rows[a.name]["minutes"] == 1.0
    sweep.spec["select_by"] = "price_parsed"
    assert sw.best_trial(sweep) is a
    sweep.spec["select_by"] = "exact_match"
    with pytest.raises(LabError, match="not a trial metric"):
        sw.best_trial(sweep)


def test_best_config_is_a_full_config_for_02_train_with_the_best_values(prepared_run, monkeypatch):
    sweep = sw.plan_sweep(prepared_run, {"sweep.space": {"train.learning_rate": [1e-4, 3e-3], "lora.r": [4]}})
    _finish(sweep.trials[0], eval_loss=2.0)
    _finish(sweep.trials[1], eval_loss=1.0)
    path = sw.write_best_config(sweep)
    assert path == sweep.dir / "best_config.yaml"
    monkeypatch.setenv("LAB_CONFIG", str(path))
    cfg = resolve_config()  # usable as LAB_CONFIG as it is
    assert cfg["train"]["learning_rate"] == 3e-3 and cfg["lora"]["r"] == 4
    assert cfg["train"]["max_steps"] == prepared_run.cfg["train"]["max_steps"]  # the full run's length, not the trial's
    assert cfg["model"] == prepared_run.cfg["model"]
    assert cfg["run_name"] == "plan-lr3e-3_r4"


def test_best_config_without_a_finished_trial_says_what_to_do(prepared_run):
    sweep = sw.plan_sweep(prepared_run, {"sweep.space": {"lora.r": [4]}})
    with pytest.raises(LabError, match="no trial finished"):
        sw.write_best_config(sweep)


# --- end to end: real training on the tiny model ---------------------------------------------------

CONFIG = {
    "run_name": "sw",
    "data": {"limit": 400},  # the trials train on 200 of them: 01_data need not prepare all 2000
    "model": {"max_length": 128},
    "train": {"max_steps": 60, "save_steps": 20, "learning_rate": 1e-3},
    "sweep": {
        "space": {"train.learning_rate": [3e-4, 1e-3], "lora.r": [4, 16]},
        "rows": 200,
        "max_steps": 8,
        "val_rows": 16,
    },
}


@pytest.mark.slow
def test_sweep_survives_a_kill_and_finishes_with_table_plots_and_best_config(tmp_path):
    cfg_path = tmp_path / "lab.yml"
    cfg_path.write_text(yaml.safe_dump(CONFIG, sort_keys=False))  # keep the space in order
    env = {"LAB_ROOT": str(tmp_path / "runs"), "LAB_CONFIG": str(cfg_path)}
    for name in ("00_setup", "01_data"):
        proc = run_script(name, env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    sweep_dir = tmp_path / "runs" / "sw" / "sweep"

    # first attempt: killed (SIGKILL, like a Colab disconnect) once trial 2 has a complete checkpoint
    log = open(tmp_path / "first.log", "w")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen([sys.executable, str(NOTEBOOKS / "05_sweep.py")], env=full_env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not list(sweep_dir.glob("trial-002-*/checkpoints/checkpoint-*/lab_manifest.json")):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "trial 2 never wrote a checkpoint"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    second = next(sweep_dir.glob("trial-002-*"))
    assert json.loads((second / "trial.json").read_text())["status"] == "running"

    again = run_script("05_sweep", env)
    out = again.stdout
    assert again.returncode == 0, f"{out[-3000:]}\n{again.stderr[-3000:]}"
    assert "[1/4] trial-001-lr3e-4_r4: finished earlier — skipped" in out
    resumed = out.split("[2/4] trial-002-lr3e-4_r16:", 1)[1].split("[3/4]", 1)[0]
    assert "Resuming from checkpoint-4 (step 4 of 8" in resumed
    states = [json.loads((p / "trial.json").read_text()) for p in sorted(sweep_dir.glob("trial-*"))]
    assert [s["status"] for s in states] == ["done"] * 4
    assert states[1]["resumed_from"] == "checkpoint-4" and states[1]["steps"] == 8
    for s in states:
        m = s["metrics"]
        assert math.isfinite(m["eval_loss"]) and math.isfinite(s["train_loss"])
        assert 0 <= m["price_parsed"] <= 1 and m["price_mae"] >= 0
        assert m["baseline"]["price_mae"] > 0 and "$" in m["baseline"]["answer"]  # the constant guess beside it
    for trial in sorted(sweep_dir.glob("trial-*")):  # each trial folder keeps the run-folder contract
        assert (trial / "config.yaml").is_file() and (trial / "eval" / "metrics.json").is_file()
        assert (trial / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        assert list((trial / "checkpoints").glob("checkpoint-*/lab_manifest.json"))
    # every trial is one tracked run in the parent run's trackio database, grouped under the sweep, with each
    # step once (the killed trial too), and the table's training loss is the tracker's last one
    with sqlite3.connect(tmp_path / "runs" / "sw" / "tracking" / "qlora-lab.db") as conn:
        tracked: dict[str, list[tuple[int, float]]] = {}
        for name, step, metrics in conn.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id"):
            if "train/loss" in (m := json.loads(metrics)):
                tracked.setdefault(name, []).append((step, m["train/loss"]))
        groups = {n: json.loads(c).get("_Group") for n, c in conn.execute("SELECT run_name, config FROM configs")}
    for s in states:
        assert sorted(step for step, _ in tracked[s["name"]]) == list(range(1, 9))
        assert groups[s["name"]] == "sw-sweep"
        assert s["train_loss"] == max(tracked[s["name"]])[1]
    # a higher rate learns more in 8 steps: the grid's ranking must see it
    losses = {s["name"]: s["metrics"]["eval_loss"] for s in states}
    assert losses["trial-003-lr1e-3_r4"] < losses["trial-001-lr3e-4_r4"]

    assert "rank" in out and "price_mae" in out  # the comparison table was printed
    for png in ("loss_curves.png", "val_loss_by_setting.png"):
        assert (sweep_dir / png).stat().st_size > 10_000
    rows = json.loads((sweep_dir / "results.json").read_text())
    assert [r["rank"] for r in rows if r["rank"] == 1]
    best = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    winner = min(states, key=lambda s: s["metrics"]["eval_loss"])
    assert best["train"]["learning_rate"] == winner["settings"]["train.learning_rate"]
    assert best["lora"]["r"] == winner["settings"]["lora.r"]
    assert best["train"]["max_steps"] == 60
    assert f"Saved best config → {sweep_dir / 'best_config.yaml'}" in out


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(lab_root):
    from lab_utils.data import prepare
    from lab_utils.model import load_tokenizer
    from lab_utils.run import start

    run = start("fail", form={"model.max_length": 128, "data.limit": 300}, quiet=True)
    prepare(run, load_tokenizer(run.cfg))
    sweep = sw.plan_sweep(run, {
        "sweep.space": {"lora.target_modules": ["no_such_proj", "all-linear"]},
        "sweep.max_steps": 2,
        "sweep.rows": 64,
        "sweep.val_rows": 8,
    })
    rows = sw.run_sweep(sweep, "plain")
    bad, good = (t.state() for t in sweep.trials)
    assert bad["status"] == "failed" and "no_such_proj" in bad["error"]
    assert good["status"] == "done" and good["steps"] == 2
    assert rows[0]["status"].startswith("failed: ") and rows[1]["rank"] == 1
    assert sw.best_trial(sweep) is sweep.trials[1]
    # a re-run leaves the failed trial alone unless asked
    sw.run_sweep(sweep, "plain")
    assert sweep.trials[0].state()["error"] == bad["error"]
