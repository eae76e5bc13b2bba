"""Every wrong input and fault gets one clear line, a non-zero exit (or a reported continue), and
nothing already saved changes. The cases live in tests/error_cases.py; this file runs each one
through the notebooks as scripts, plus fast checks of the pieces behind them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from error_cases import (
    CASES,
    DOC,
    FAKE_SECRETS,
    TRAINED,
    TRAINED_DATA,
    Case,
    config_text,
    pattern,
    render_doc,
)

from conftest import REPO, run_script

# ----------------------------------------------------------------------------------------- helpers


def _snapshot(root: Path) -> dict[str, str]:
    """Return {relative path: sha256 (or 'dir')} of everything under root."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _model_without_chat_template(dest: Path) -> None:
    """Copy the embedded tiny Llama to dest with its chat template removed (a base model's tokenizer)."""
    from lab_utils.embedded import EMBEDDED_MODEL, resolve_model

    shutil.copytree(resolve_model(EMBEDDED_MODEL), dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))


_COLAB_STUBS = {
    # The only thing faked anywhere: Colab's own module, here as files a script can import.
    "mount-fails": "def mount(path, **kw):\n    raise ValueError('credential propagation was unsuccessful')\n",
    "mount-empty": "def mount(path, **kw):\n    return None  # says nothing, mounts nothing\n",
}


def _colab_stub(folder: Path, kind: str) -> Path:
    """Write a stand-in google.colab package (drive + userdata) under folder; return the path to put first."""
    pkg = folder / "colab_stub" / "google" / "colab"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "drive.py").write_text(_COLAB_STUBS[kind])
    (pkg / "userdata.py").write_text("def get(name):\n    raise KeyError(name)\n")
    return folder / "colab_stub"


def _write_files(case: Case, folder: Path) -> dict[Path, bytes | None]:
    """Write the case's files under folder; return what they replaced (None: nothing) to restore later."""
    replaced: dict[Path, bytes | None] = {}
    for rel, content in case.files.items():
        path = folder / rel
        if content == "@tiny-llama-without-chat-template":
            if not path.exists():
                _model_without_chat_template(path)
            continue
        replaced[path] = path.read_bytes() if path.is_file() else None
        if content.startswith("@truncate:"):  # an existing file cut short, as a disconnect mid-copy leaves it
            path.write_bytes(replaced[path][: int(content.split(":", 1)[1])])
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        text = content.replace("{dir}", str(folder)).replace("{now}", str(time.time() + 600))
        path.write_bytes(text.encode("utf-8", "surrogateescape"))  # "\udcff" writes the byte 0xff
    return replaced


def _env(case: Case, folder: Path, base: dict | None = None) -> dict[str, str]:
    env = {"LAB_ROOT": str(folder / "runs"), **FAKE_SECRETS}
    text = config_text(case, str(folder), base)
    if text is not None:
        path = folder / (f"case-{case.id}.yml" if base else "lab.yml")
        path.write_text(text)
        env["LAB_CONFIG"] = str(path)
    env.update({k: v.replace("{dir}", str(folder)) for k, v in case.env.items()})
    if case.colab:
        stub = _colab_stub(folder, case.colab)
        env["PYTHONPATH"] = f"{stub}:{REPO}"
    return env


def _start_only(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Create the run as every notebook's first cell does (lab.start()), without the rest of 00_setup."""
    full = {**os.environ, **env}
    for var in ("LAB_CONFIG", "LAB_RUN_NAME"):
        if var not in env:
            full.pop(var, None)
    return subprocess.run(
        [sys.executable, "-c", "import lab_utils as lab; lab.start(quiet=True)"],
        env=full, capture_output=True, text=True, timeout=300,
    )


def _no_secret_in(text: str, where: str) -> None:
    for name, value in FAKE_SECRETS.items():
        assert value not in text, f"{name} appears in {where}"


# ------------------------------------------------------------------------- running the cases


@dataclass
class Outcome:
    """One case's run: the finished process and the runs folder before and after it."""

    folder: Path
    proc: subprocess.CompletedProcess | None = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    error: BaseException | None = None
    seconds: float = 0.0


def _run_case(case: Case, folder: Path, base: dict | None = None) -> Outcome:
    """Set the case up in folder, run its notebook as a script, snapshot the runs folder around it."""
    out = Outcome(folder)
    t0 = time.monotonic()
    replaced = _write_files(case, folder)
    try:
        env = _env(case, folder, base)
        for step in case.before:
            proc = _start_only(env) if step == "start" else run_script(step, env)
            assert proc.returncode == 0, f"{step} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        root = Path(env["LAB_ROOT"]) if env["LAB_ROOT"] else folder / "runs"
        if not root.is_relative_to(folder):  # /proc and the like: nothing of ours to compare
            root = folder / "runs"
        out.before = _snapshot(root)
        out.proc = run_script(case.script, env)
        out.after = _snapshot(root)
        out.seconds = time.monotonic() - t0
    finally:
        for path, old in replaced.items():
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old)
    return out


def _train(folder: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run 00→04 once on a four-step config with fake HF/W&B tokens set; return each notebook's process."""
    (folder / "rows.jsonl").write_text(TRAINED_DATA)
    cfg = json.loads(json.dumps(TRAINED).replace("{dir}", str(folder)))
    (folder / "trained.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {
        "LAB_ROOT": str(folder / "runs"),
        "LAB_CONFIG": str(folder / "trained.yml"),
        "HF_HUB_OFFLINE": "1",  # the push is a dry run here and in CI alike (the token is fake)
        **FAKE_SECRETS,
    }
    outputs = {}
    for name in ("00_setup", "01_data", "02_train", "03_evaluate", "04_export"):
        proc = run_script(name, env)
        outputs[name] = proc
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return outputs


_NEEDS_TRAINED = {"test_pipeline_never_prints_or_stores_the_hf_and_wandb_tokens",
                  "test_trust_remote_code_stays_off_unless_the_config_turns_it_on"}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict:
    """Run every selected case, several at a time (LAB_TEST_JOBS, default: one per CPU); return {id: Outcome}.

    The "Runs" cases share one trained run: it is trained once, then they run one after another
    on it (each must leave it unchanged). Everything else runs in its own folder, in parallel.
    """
    selected = {it.callspec.params["case"].id for it in request.session.items
                if hasattr(it, "callspec") and isinstance(it.callspec.params.get("case"), Case)}
    wanted = [c for c in CASES if c.id in selected and not (c.cpu_only and _cuda())]
    need_trained = any(c.trained for c in wanted) or any(
        getattr(it, "originalname", it.name) in _NEEDS_TRAINED for it in request.session.items)
    results: dict = {}

    # folders made here, before any thread starts: tmp_path_factory is not thread-safe
    folders = {c.id: tmp_path_factory.mktemp(c.id) for c in wanted if not c.trained}
    trained_folder = tmp_path_factory.mktemp("trained") if need_trained else None

    def independent(case: Case) -> None:
        try:
            results[case.id] = _run_case(case, folders[case.id])
        except BaseException as e:  # noqa: BLE001 — reported by the case's own test
            results[case.id] = Outcome(Path(), error=e)

    def trained_chain() -> None:
        folder = trained_folder
        t0 = time.monotonic()
        try:
            results["__trained__"] = (folder, _train(folder))
            results["__train_seconds__"] = Outcome(folder, seconds=time.monotonic() - t0)
        except BaseException as e:  # noqa: BLE001
            results["__trained__"] = e
            for c in wanted:
                if c.trained:
                    results[c.id] = Outcome(folder, error=e)
            return
        for c in wanted:
            if c.trained:
                try:
                    results[c.id] = _run_case(c, folder, TRAINED)
                except BaseException as e:  # noqa: BLE001
                    results[c.id] = Outcome(folder, error=e)

    jobs = int(os.environ.get("LAB_TEST_JOBS") or os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(trained_chain)] if need_trained else []
        futures += [pool.submit(independent, c) for c in wanted if not c.trained]
        for f in futures:
            f.result()
    times = {k: round(v.seconds, 1) for k, v in results.items() if isinstance(v, Outcome)}
    (tmp_path_factory.getbasetemp() / "case-seconds.json").write_text(json.dumps(times, indent=1))
    return results


@pytest.fixture(scope="module")
def trained(outcomes):
    """(folder, {notebook: process}) of the shared run trained with fake tokens set."""
    value = outcomes["__trained__"]
    if isinstance(value, BaseException):
        raise value
    return value


@pytest.mark.slow
def test_pipeline_never_prints_or_stores_the_hf_and_wandb_tokens(trained):
    folder, outputs = trained
    for name, proc in outputs.items():
        _no_secret_in(proc.stdout + proc.stderr, f"{name}'s output")
    assert "dry run" in outputs["04_export"].stdout  # the token was read for the push, and not shown
    files = [p for p in (folder / "runs").rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        for name, value in FAKE_SECRETS.items():
            assert value.encode() not in data, f"{name} stored in {path}"


@pytest.mark.slow
def test_trust_remote_code_stays_off_unless_the_config_turns_it_on(trained):
    folder, outputs = trained
    saved = yaml.safe_load((folder / "runs" / "trained" / "config.yaml").read_text())
    assert saved["model"]["trust_remote_code"] is False
    assert not any("trust_remote_code is true" in p.stdout for p in outputs.values())


def test_no_code_path_turns_remote_code_on_by_itself():
    for path in (REPO / "lab_utils").glob("*.py"):
        text = path.read_text()
        assert "trust_remote_code=True" not in text.replace(" ", ""), path.name


# ------------------------------------------------------------------------------------- the table


def _case_params():
    for case in CASES:
        marks = [pytest.mark.slow]
        if case.owner:
            marks.append(pytest.mark.xfail(strict=True, reason=f"needs fix in {case.owner}"))
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", list(_case_params()))
def test_wrong_input_gets_one_line_and_leaves_saved_files_alone(case: Case, outcomes):
    if case.cpu_only and _cuda():
        pytest.skip("this case is about a machine without a CUDA GPU")
    out = outcomes[case.id]
    if out.error is not None:
        raise out.error
    proc, before, after = out.proc, out.before, out.after
    _no_secret_in(proc.stdout + proc.stderr, "the output")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rx = pattern(case.message, str(out.folder))
    if case.exit:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        assert proc.returncode == case.exit, f"exit {proc.returncode}; stderr ends: {last}\n{proc.stdout[-1500:]}"
        assert last.startswith("✗ "), f"last line of stderr: {last!r}"
        assert rx.fullmatch(last[2:]), f"\n got: {last[2:]}\nwant: {case.message}"
        changed = [k for k, v in before.items() if after.get(k) != v]
        assert not changed, f"files that existed before changed: {changed}"
        if case.group != "Data":  # refused before anything was written; 01_data may leave its report
            assert after == before, f"a refused start wrote {sorted(set(after) - set(before))}"
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line.strip() for line in proc.stdout.splitlines()]
        assert any(rx.fullmatch(line) for line in lines), f"no stdout line matches {case.message!r}"
        changed = [k for k, v in before.items() if after.get(k) != v]
        assert not changed, f"files that existed before changed: {changed}"
        if case.trained:  # a finished run run again: not one file added or removed either
            assert after == before, f"added {sorted(set(after) - set(before))}, removed {sorted(set(before) - set(after))}"


def test_troubleshooting_doc_is_generated_from_the_table():
    assert DOC.read_text() == render_doc(), "run `python tests/error_cases.py` to regenerate docs/troubleshooting.md"


def test_every_case_has_a_unique_id_and_a_known_notebook():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for c in CASES:
        assert (REPO / "notebooks" / f"{c.script}.py").exists(), c.id
        assert c.exit in (0, 2)


# --------------------------------------------------------------------- the handler, in a script


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_lab_error_in_a_script_is_one_line_and_exit_status_2():
    proc = _run_python("""
        from lab_utils.errors import LabError, install_handler
        install_handler()
        raise LabError("train.learning_rate must be a number, got 'fast' — e.g. 2e-4")
    """)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["✗ train.learning_rate must be a number, got 'fast' — e.g. 2e-4"]


def test_full_disk_in_a_script_is_one_line_naming_the_file():
    proc = _run_python(f"""
        from lab_utils.errors import install_handler
        install_handler()
        raise OSError({errno.ENOSPC}, "No space left on device", "/content/drive/MyDrive/qlora-lab/r/adapter")
    """)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("✗ the disk is full while writing /content/drive/MyDrive/qlora-lab/r/adapter — free space")


def test_unexpected_error_keeps_its_traceback_but_ends_with_one_line():
    proc = _run_python("""
        from lab_utils.errors import install_handler
        install_handler()
        raise RuntimeError("boom")
    """)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr  # a bug report needs it
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("✗ unexpected error RuntimeError: boom — the traceback above shows where")


# ------------------------------------------------------------------ config checks, every field


def _lib_fields(section: str):
    from lab_utils.config import _RESERVED, _library_schema

    for name, spec in sorted(_library_schema(section).items()):
        if f"{section}.{name}" in _RESERVED or "any" in spec["kinds"]:
            continue
        yield name, set(spec["kinds"]), spec


def _refused(section: str, key: str, value) -> str:
    from lab_utils.config import DEFAULTS, validate
    from lab_utils.errors import LabError

    cfg = json.loads(json.dumps(DEFAULTS))
    cfg[section][key] = value
    with pytest.raises(LabError) as e:
        validate(cfg)
    return str(e.value)


def test_every_numeric_library_field_refuses_text_lists_and_negatives():
    checked = 0
    for section in ("train", "lora"):
        for name, kinds, spec in _lib_fields(section):
            if not kinds & {"int", "float"} or "str" in kinds:
                continue
            key = f"{section}.{name}"
            assert key in _refused(section, name, "fast"), key
            if "list" not in kinds:
                assert "takes one value" in _refused(section, name, [1, 2]), key
            if not (isinstance(spec["default"], (int, float)) and spec["default"] < 0):
                assert key in _refused(section, name, -3), key
            checked += 1
    assert checked > 30  # SFTConfig alone has dozens of numeric fields


def test_every_boolean_library_field_refuses_text():
    checked = 0
    for section in ("train", "lora"):
        for name, kinds, _ in _lib_fields(section):
            if kinds - {"bool", "null"}:
                continue
            msg = _refused(section, name, "true")
            assert f"{section}.{name} must be true or false, got the text 'true'" in msg
            checked += 1
    assert checked > 30


def test_numbers_written_as_text_are_read_as_numbers():
    from lab_utils.config import DEFAULTS, validate

    cfg = json.loads(json.dumps(DEFAULTS))
    cfg["train"].update({"learning_rate": "2e-4", "max_steps": "1e3", "warmup_steps": "0.1"})
    out = validate(cfg)["train"]
    assert (out["learning_rate"], out["max_steps"], out["warmup_steps"]) == (2e-4, 1000, 0.1)


def test_secret_values_are_refused_without_being_echoed():
    value = FAKE_SECRETS["HF_TOKEN"]
    for section, key in (("train", "hub_token"), ("data", "system_prompt"), ("export", "push_repo")):
        msg = _refused(section, key, value)
        assert value not in msg and "token" in msg


def test_trust_remote_code_is_off_by_default_and_must_be_a_real_boolean():
    from lab_utils.config import DEFAULTS

    assert DEFAULTS["model"]["trust_remote_code"] is False
    assert "got the text 'True'" in _refused("model", "trust_remote_code", "True")


# ------------------------------------------------------------------ Drive and the runs folder (fake Colab)


def test_drive_that_does_not_mount_stops_with_the_fix(fake_colab, monkeypatch):
    from lab_utils.environment import lab_root
    from lab_utils.errors import LabError

    monkeypatch.delenv("LAB_ROOT", raising=False)
    fake_colab["fail"] = "mount timed out"
    with pytest.raises(LabError, match=r"Google Drive did not mount \(mount timed out\) — run this cell again"):
        lab_root()


def test_drive_that_mounts_nothing_never_falls_back_to_the_vm_disk(fake_colab, monkeypatch):
    from lab_utils.environment import lab_root
    from lab_utils.errors import LabError

    monkeypatch.delenv("LAB_ROOT", raising=False)
    with pytest.raises(LabError, match="MyDrive is missing"):
        lab_root()
    assert fake_colab["mounted"] == ["/content/drive"]


def test_lab_root_on_the_vm_disk_is_allowed_explicitly_and_said_plainly(fake_colab, lab_root, monkeypatch):
    from lab_utils.environment import lab_root as find_root

    root, why = find_root()
    assert root == lab_root and root.is_dir()
    assert fake_colab["mounted"] == []  # LAB_ROOT off Drive needs no Drive
    assert "not on Google Drive" in why and "wiped" in why


def test_lab_root_on_drive_mounts_drive_first(fake_colab, monkeypatch):
    from lab_utils.environment import lab_root
    from lab_utils.errors import LabError

    monkeypatch.setenv("LAB_ROOT", "/content/drive/MyDrive/elsewhere")
    fake_colab["fail"] = "no access"
    with pytest.raises(LabError, match="Google Drive did not mount"):
        lab_root()


def test_secrets_come_from_the_environment_or_colab_secrets_only(fake_colab, monkeypatch):
    from lab_utils.environment import get_secret

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert get_secret("HF_TOKEN") is None
    fake_colab["secrets"]["HF_TOKEN"] = "from-colab"
    assert get_secret("HF_TOKEN") == "from-colab"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert get_secret("HF_TOKEN") == "from-env"


def test_start_refuses_before_writing_when_the_config_is_wrong(lab_root, monkeypatch, tmp_path):
    from lab_utils.errors import LabError
    from lab_utils.run import start

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # start() installs the script handler
    monkeypatch.setattr(sys, "_lab_hook_installed", True, raising=False)
    bad = tmp_path / "bad.yml"
    bad.write_text("train: {learning_rate: fast}\n")
    monkeypatch.setenv("LAB_CONFIG", str(bad))
    with pytest.raises(LabError, match="train.learning_rate must be a number"):
        start(quiet=True)
    assert not lab_root.exists()  # not even the runs folder


def test_every_lab_key_refuses_a_value_of_the_wrong_kind():
    from lab_utils.config import _OWN_TYPES

    for dotted, (kinds, _) in _OWN_TYPES.items():
        if "." not in dotted:
            continue
        section, key = dotted.split(".", 1)
        wrong = {"k": "v"} if "dict" not in kinds else "text"
        assert dotted in _refused(section, key, wrong), dotted


def test_notebook_form_fields_get_the_same_checks_as_the_yaml(lab_root):
    from lab_utils.config import resolve_config
    from lab_utils.errors import LabError

    with pytest.raises(LabError, match=r"^train.learning_rate must be a number, got 'fast'"):
        resolve_config(form={"train.learning_rate": "fast"})
    with pytest.raises(LabError, match=r"^unknown key lora.rank .*"):
        resolve_config(form={"lora.rank": 8})


# ------------------------------------------------------------------ issue 14: no raw traceback, no secret written


@pytest.mark.parametrize("writer", [
    # the libraries' own exception types with the text their Rust io::Error carries (not OSError)
    "from safetensors import SafetensorError; raise SafetensorError('Error while serializing: IoError(Os { code: 28, "
    "kind: StorageFull, message: \"No space left on device\" })')",
    "raise Exception('No space left on device (os error 28)')  # tokenizers' save()",
    "import pyarrow as pa; raise pa.lib.ArrowIOError('IOError: [Errno 28] No space left on device')",
])
def test_disk_full_raised_by_rust_libraries_is_one_line(writer):
    proc = _run_python(f"""
        from lab_utils.errors import install_handler
        install_handler()
        {writer}
    """)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("✗ the disk is full — free space")


def test_a_folder_the_lab_may_not_write_is_one_line_naming_it():
    proc = _run_python(f"""
        from lab_utils.errors import install_handler
        install_handler()
        raise PermissionError({errno.EACCES}, "Permission denied", "/content/drive/MyDrive/qlora-lab/r/trainer.lock")
    """)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "✗ /content/drive/MyDrive/qlora-lab/r/trainer.lock cannot be written or read (permission denied) — check that "
        "you can edit that folder (on Drive: your own folder, not a shared view), or use a new run_name / LAB_ROOT; "
        "files saved before this point are intact"]


def test_lock_in_a_read_only_run_folder_is_one_line_naming_the_folder():
    from lab_utils.checkpoints import RunLock
    from lab_utils.errors import LabError

    with pytest.raises(LabError, match=r"^cannot write to the run folder /proc/self \(.*\) — it is read-only here"):
        RunLock(Path("/proc/self")).acquire()  # not writable even for root


@pytest.mark.parametrize("value", [
    "hf_abcdefghijklmnopqrstuvwxyz0123",
    "0123456789abcdef0123456789abcdef01234567",  # W&B: 40 hex
    "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    "see hf_abcdefghijklmnopqrstuvwxyz0123 here",
    "WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567",
])
def test_every_common_token_shape_is_a_secret_in_config_and_card(value):
    from lab_utils.config import is_secret, looks_like_secret
    from lab_utils.export import _is_secret

    assert looks_like_secret(value) and is_secret("data.system_prompt", value) and _is_secret("train.run_name", value)
    assert value not in _refused("data", "system_prompt", value)


@pytest.mark.parametrize("value", [
    "pricer-demo", "embedded:tiny-llama", "unsloth/Llama-3.2-1B-Instruct", "0123456789abcdef",
    "a" * 64, "sha256:" + "0" * 64, "You are a pricing assistant.",
    "/root/.cache/huggingface/hub/models--org--m/snapshots/0123456789abcdef0123456789abcdef01234567",
])
def test_ordinary_values_are_not_secrets(value):
    from lab_utils.config import looks_like_secret

    assert not looks_like_secret(value)


def test_a_git_commit_as_model_revision_is_not_a_wandb_key():
    from lab_utils.config import DEFAULTS, validate

    cfg = json.loads(json.dumps(DEFAULTS))
    cfg["model"]["revision"] = "0123456789abcdef0123456789abcdef01234567"
    assert validate(cfg)["model"]["revision"] == cfg["model"]["revision"]


def test_lab_profile_for_one_session_is_not_written_into_the_saved_config(lab_root, monkeypatch):
    from lab_utils.run import start

    monkeypatch.setattr(sys, "_lab_hook_installed", True, raising=False)
    run = start("profiled", quiet=True)
    before = run.config_path.read_bytes()
    monkeypatch.setenv("LAB_PROFILE", "cpu-smoke")
    run = start("profiled", quiet=True)
    assert run.config_path.read_bytes() == before
    assert yaml.safe_load(before)["profile"] == "auto"


@pytest.mark.slow
def test_adapter_config_lists_target_modules_in_one_order(trained):
    folder, _ = trained
    run = folder / "runs" / "trained"
    for cfg in [run / "adapter" / "adapter_config.json", *run.glob("checkpoints/checkpoint-*/adapter_config.json")]:
        modules = json.loads(cfg.read_text())["target_modules"]
        assert modules == sorted(modules), cfg


def test_jsonl_lines_are_bounded_before_any_parser_sees_them(tmp_path):
    from lab_utils.data import MAX_JSON_DEPTH, _scan_json_lines

    rows = tmp_path / "rows.jsonl"
    ok = json.dumps({"messages": [{"role": "user", "content": "[[[{{{ brackets in text are fine ]]]"}]})
    rows.write_bytes(b"\n".join([
        ok.encode(),
        b"[" * 100_000 + b"]" * 100_000,  # would exhaust any recursive parser
        b'{"a": "caf\xe9"}',  # Latin-1, not UTF-8
        ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode(),  # at the bound: parsed (a list, not an object)
        ok.encode(),
    ]) + b"\n")
    bad = {n: problem for n, problem, _ in _scan_json_lines(str(rows))}
    assert bad == {2: f"nested deeper than {MAX_JSON_DEPTH} levels",
                   3: "not valid UTF-8 text (byte 0xe9 at column 11)",
                   4: "a JSON list, not an object"}


def test_a_json_array_file_too_deep_or_not_utf8_is_one_line_naming_it(tmp_path):
    from lab_utils.data import _check_json_array
    from lab_utils.errors import LabError

    deep = tmp_path / "deep.json"
    deep.write_text("[" + "[" * 50_000 + "]" * 50_000 + "]")
    with pytest.raises(LabError, match=r"deep.json' nests deeper than 100 levels"):
        _check_json_array(str(deep))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[\n{"a": 1},\n{"b": "caf\xe9"}\n]')
    with pytest.raises(LabError, match=r"latin.json' is not UTF-8 text \(byte 0xe9 at line 3\)"):
        _check_json_array(str(latin))
