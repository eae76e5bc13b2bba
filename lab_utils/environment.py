"""Where the lab runs: Colab or not, Drive, the runs folder, the GPU, secrets.

Every call into Colab's own module (`google.colab.drive`, `google.colab.userdata`,
`google.colab.output`) lives here and nowhere else, so the rest of the package runs unchanged on any
machine. Here too: the one bf16 decision (`bf16_capable`) and importing unsloth before
transformers/trl/peft (`import_unsloth_first`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from .errors import LabError
from .hardware import bf16_capable  # noqa: F401 (re-exported: moved to hardware.py)

__all__ = [
    "in_colab",
    "mount_drive",
    "lab_root",
    "get_secret",
    "training_path",
    "environment_report",
    "free_gib",
    "on_drive",
    "on_drive_path",
    "check_free_space",
    "require_hardware",
    "hub_reachable",
    "hub_offline",
    "check_hub_repo",
    "bf16_capable",
    "import_unsloth_first",
    "enable_colab_widgets",
    "drive_mount",
]

DRIVE_MOUNT = "/content/drive"
DRIVE_ROOT = "/content/drive/MyDrive/qlora-lab"


def drive_mount() -> str:
    """Return where Google Drive is mounted: /content/drive, as on Colab.

    LAB_DRIVE_MOUNT replaces it for a stand-in `google.colab` only (tests/colab_vm.py simulates a Colab
    VM on a machine where /content cannot be written); a real Colab runtime never sets it.
    """
    return os.environ.get("LAB_DRIVE_MOUNT") or DRIVE_MOUNT


def drive_root() -> Path:
    """Return the runs folder on Drive: <mount>/MyDrive/qlora-lab."""
    return Path(drive_mount()) / "MyDrive" / "qlora-lab"


def in_colab() -> bool:
    """Return True inside a Google Colab runtime."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def on_drive_path(path: str | os.PathLike) -> bool:
    """Return True when path (existing or not) lies under Colab's Drive mount point."""
    p = os.path.abspath(os.path.expanduser(str(path)))
    mount = drive_mount()
    return p == mount or p.startswith(mount + os.sep)


def mount_drive() -> bool:
    """Mount Google Drive on Colab and return True; return False elsewhere. LabError if mounting fails."""
    if not in_colab():
        return False
    my_drive = os.path.join(drive_mount(), "MyDrive")
    if os.path.isdir(my_drive):
        return True
    from google.colab import drive  # type: ignore[import-not-found]

    try:
        drive.mount(drive_mount())
    except Exception as e:  # the mount dialog was dismissed, timed out, or Drive is unavailable
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise LabError(
            f"Google Drive did not mount ({reason}) — run this cell again and allow access; or, to keep runs on "
            "this Colab disk, which is wiped at every disconnect, set LAB_ROOT (e.g. /content/runs)"
        ) from None
    if not os.path.isdir(my_drive):
        raise LabError(
            f"Google Drive reported mounted, but {my_drive} is missing — run this cell again (Runtime → "
            "Disconnect and delete runtime if it persists); or set LAB_ROOT to keep runs on this Colab disk, "
            "which is wiped at every disconnect"
        )
    return True


def _ensure_writable(root: Path, origin: str) -> None:
    """LabError naming the folder and the fix when root cannot be created or written."""
    fix = "set LAB_ROOT to a folder you can write to" if origin != "LAB_ROOT" else "point LAB_ROOT at a folder you can write to"
    if root.exists() and not root.is_dir():
        raise LabError(f"the runs folder {str(root)!r} is a file, not a folder — {fix}")
    blocker = next((p for p in [root, *root.parents] if p.exists()), None)
    if blocker is not None and blocker != root and not blocker.is_dir():
        raise LabError(f"cannot create the runs folder {str(root)!r}: {str(blocker)!r} is a file, not a folder — {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"cannot create the runs folder {str(root)!r} ({e.strerror or e}) — {fix}") from None
    probe = root / f".write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise LabError(f"cannot write to the runs folder {str(root)!r} ({e.strerror or e}) — {fix}") from None


def lab_root(mounted: bool | None = None) -> tuple[Path, str]:
    """Return (folder that holds runs, one line saying where that is and why).

    On Colab the runs go to Drive, mounted here; a run lands on the VM's own disk (wiped at every
    disconnect) only when LAB_ROOT says so, and then the line says so too.
    """
    env = os.environ.get("LAB_ROOT")
    colab = in_colab()
    if env:
        # absolute once, here: a relative folder handed to transformers or datasets can read as a Hub id
        root = Path(os.path.abspath(Path(env).expanduser()))
        origin = "LAB_ROOT"
        if colab and on_drive_path(root):
            if mounted is None or not mounted:
                mount_drive()
            why = f"Runs folder: {root} (from LAB_ROOT, on Google Drive: survives disconnects)"
        elif colab:
            why = (
                f"Runs folder: {root} (from LAB_ROOT) — ⚠ not on Google Drive: this Colab disk is wiped at every "
                "disconnect, so copy the results away before closing"
            )
        else:
            why = f"Runs folder: {root} (from LAB_ROOT)"
    elif colab:
        if mounted is None:
            mounted = mount_drive()
        if not mounted:
            raise LabError(
                "Google Drive is not mounted, so checkpoints would vanish with this runtime — "
                "run the setup cell again and allow Drive access, or set LAB_ROOT explicitly"
            )
        root = drive_root()
        origin = "Drive"
        why = f"Runs folder: {root} (Google Drive: survives disconnects)"
    else:
        root = Path("runs").resolve()
        origin = "default"
        why = f"Runs folder: {root} (not on Colab: a local folder; set LAB_ROOT to change it)"
    _ensure_writable(root, origin)
    return root, why


def check_free_space(path: Path, need_gib: float, what: str = "checkpoint.min_free_gib") -> float:
    """Return the free GiB at path; LabError when fewer than need_gib are free (checked before saving)."""
    free = free_gib(path)
    if free < need_gib:
        where = "Google Drive" if on_drive(path) else str(path)
        raise LabError(
            f"only {free:.2f} GiB free on {where} ({what}: {need_gib:g}) — free space (delete old runs or exports, "
            f"then empty Drive's trash) or lower {what}; nothing was written"
        )
    return free


def require_hardware(profile: str, origin: str = "profile") -> None:
    """LabError when a GPU profile (colab-t4, colab-l4, colab-a100) is asked for on a machine without that GPU."""
    from .defaults import PROFILES, hardware_from_name

    spec = PROFILES.get(profile)
    if spec is None or spec["hardware"] == "cpu":
        return
    from .hardware import detect_hardware

    wanted = hardware_from_name(spec["hardware"])
    hw = detect_hardware()
    if hw.kind != "cuda":
        raise LabError(
            f"{origin} {profile} needs a CUDA GPU ({spec['hardware']}), and this machine has none — on Colab pick "
            "Runtime → Change runtime type → T4 GPU; elsewhere set LAB_PROFILE=auto (or cpu-smoke)"
        )
    if hw.memory_gib < 0.95 * wanted.memory_gib:
        raise LabError(
            f"{origin} {profile} is sized for a {spec['hardware']} ({wanted.memory_gib:.0f} GiB), this GPU is a "
            f"{hw.name} with {hw.memory_gib:.1f} GiB — set LAB_PROFILE=auto to size the batch for this GPU"
        )


def hub_reachable(timeout: float = 5.0) -> bool:
    """Return True if the Hugging Face Hub ($HF_ENDPOINT) answers at all (any HTTP status)."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/api/whoami-v2", method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True
    except Exception:
        return False


def check_hub_repo(repo_id: str, *, key: str, repo_type: str = "model", revision: str | None = None) -> None:
    """LabError naming key and the fix when the Hub cannot be reached or has no such repository (seconds, no retries).

    Call it only for ids that are not cached locally; with HF_HUB_OFFLINE set it does nothing.
    """
    what = "model" if repo_type == "model" else "dataset"
    if hub_offline(datasets=repo_type == "dataset"):
        return
    if not hub_reachable():
        raise LabError(
            f"{key} {repo_id!r} is not on this machine and the Hugging Face Hub cannot be reached to fetch the "
            f"{what} — check the internet connection (on Colab: Runtime → Restart session), or download it and "
            "give its local path"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    token = get_secret("HF_TOKEN") or None
    try:
        info = HfApi().model_info if repo_type == "model" else HfApi().dataset_info
        info(repo_id, revision=revision, token=token, timeout=10)
    except GatedRepoError:
        raise LabError(
            f"{key} {repo_id!r} is gated — accept its terms on its Hugging Face page, then add HF_TOKEN in Colab's "
            "secrets (key icon) with notebook access on"
        ) from None
    except RevisionNotFoundError:
        raise LabError(f"model.revision {revision!r} does not exist in {repo_id!r} — use a branch, tag or commit of it") from None
    except RepositoryNotFoundError:
        example = "unsloth/Llama-3.2-1B-Instruct" if repo_type == "model" else "org/name"
        raise LabError(
            f"{key} {repo_id!r} was not found as a {what} on the Hugging Face Hub — check the spelling (owner/name, "
            f"e.g. {example}); a private {what} needs HF_TOKEN in Colab's secrets"
        ) from None
    except Exception:
        return  # the Hub answered oddly: loading it reports that, with the library's own words


def hub_offline(datasets: bool = False) -> bool:
    """Return True when HF_HUB_OFFLINE (or, for datasets, HF_DATASETS_OFFLINE) asks not to use the network.

    The one reading of the flag. Read at each call, not huggingface_hub.constants.HF_HUB_OFFLINE (fixed when
    huggingface_hub is first imported), so a flag set later in the session counts; parsed as huggingface_hub does.
    """
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(n, "").strip().upper() in ("1", "ON", "YES", "TRUE") for n in names)


def on_drive(path: Path) -> bool:
    """Return True when path lies on the mounted Google Drive (deleted files go to its trash)."""
    return str(Path(path).resolve()).startswith(str(Path(drive_mount()).resolve()))


def free_gib(path: Path) -> float:
    """Return the free space in GiB on the filesystem that holds path (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 2**30


def get_secret(name: str) -> str | None:
    """Return a secret from the environment or Colab's secrets panel, or None. Never print it."""
    value = os.environ.get(name)
    if value:
        return value
    if in_colab():
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            return userdata.get(name)
        except Exception:  # secret missing or notebook access not granted
            return None
    return None


def show_port_in_colab(port: int, height: int = 600) -> bool:
    """Show a web server on this VM's port inside the Colab output (private to the notebook); False outside Colab."""
    if not in_colab():
        return False
    from google.colab import output  # type: ignore[import-not-found]

    output.serve_kernel_port_as_iframe(port, height=str(height))
    return True


_PLAIN = "plain transformers + peft + bitsandbytes"
_unsloth_import: dict[str, tuple[bool, str]] = {}  # the outcome of importing unsloth, once per process


def _unsloth_wanted() -> str | None:
    """Return why unsloth is not for this machine (LAB_NO_UNSLOTH, no CUDA GPU, not installed), or None."""
    if os.environ.get("LAB_NO_UNSLOTH"):
        return "LAB_NO_UNSLOTH is set"
    from .hardware import cuda_available

    if not cuda_available():
        return "no CUDA GPU; unsloth needs one"
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed"
    return None


def import_unsloth_first() -> tuple[bool, str]:
    """Return (True, why) once unsloth is imported, before transformers/trl/peft where possible; (False, why) for the plain path.

    start() calls it first: unsloth patches transformers, trl and peft only when it is imported before
    them (it warns otherwise). An import that fails (any error: a torch it does not support, a missing
    kernel) means the plain path, said in one line.
    """
    not_for_us = _unsloth_wanted()
    if not_for_us:
        return False, f"{_PLAIN} ({not_for_us})"
    if "result" not in _unsloth_import:
        late = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
        try:
            importlib.import_module("unsloth")
        except Exception as e:  # any failure means the plain path, never a crash
            text = " ".join(str(e).split())[:160] or type(e).__name__
            print(f"⚠ unsloth could not be imported ({type(e).__name__}: {text}) — training takes the plain path")
            _unsloth_import["result"] = (False, f"{_PLAIN} (unsloth failed to import: {type(e).__name__}: {text})")
        else:
            note = (
                f"; imported after {', '.join(late)}: restart the session and run all cells for its full speed"
                if late
                else ""
            )
            _unsloth_import["result"] = (True, f"unsloth fast path (CUDA GPU and unsloth installed{note})")
    return _unsloth_import["result"]


def training_path() -> tuple[str, str]:
    """Return ("unsloth" | "plain", one-line reason) for the training path this machine takes."""
    ok, why = import_unsloth_first()
    return ("unsloth" if ok else "plain"), why


def enable_colab_widgets() -> bool:
    """Return True after letting Colab render ipywidgets 8 (its built-in manager renders 7 only); False off Colab."""
    if not in_colab():
        return False
    try:
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()
    except Exception:  # an older Colab without it: the widget may still render through the built-in manager
        return False
    return True


def environment_report(root: Path | None = None) -> list[tuple[str, str]]:
    """Return rows (what, value) describing GPU, VRAM, bf16, Drive space, torch and training path."""
    import torch

    from .hardware import detect_hardware

    rows: list[tuple[str, str]] = [("Colab", "yes" if in_colab() else "no")]
    hw = detect_hardware()
    if hw.kind == "cuda" and hw.capability is not None:
        rows += [
            ("GPU", hw.name),
            ("GPU memory", f"{hw.memory_gib:.1f} GiB"),
            ("compute capability", f"{hw.capability[0]}.{hw.capability[1]}"),
            ("bf16", "yes" if hw.bf16 else "no (fp16 will be used)"),
        ]
    else:
        rows += [("GPU", "none — CPU only: the embedded demo trains in minutes; a real model takes seconds to minutes "
                         "per step (02_train prints the expected time after its first steps) — use a GPU for real runs")]
    rows.append(("torch", torch.__version__))
    major_minor = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if major_minor < (2, 10):
        rows.append(("warning", f"torch {torch.__version__} has known CVEs; use ≥ 2.10"))
    rows.append(("training path", training_path()[1]))
    if root is not None:
        rows.append(("free space at runs folder", f"{free_gib(root):.1f} GiB"))
    return rows


def pid_alive(pid: object) -> bool:
    """Return True if a process with this pid exists on this machine."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True
