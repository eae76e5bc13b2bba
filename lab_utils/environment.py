"""Where the lab runs: Colab or not, Drive, the runs folder, the GPU, secrets.

Every call into Colab's own module (`google.colab.drive`, `google.colab.userdata`) lives here and
nowhere else, so the rest of the package runs unchanged on any machine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from .errors import LabError

__all__ = [
    "in_colab",
    "mount_drive",
    "lab_root",
    "get_secret",
    "training_path",
    "environment_report",
    "free_gib",
    "on_drive",
]

DRIVE_MOUNT = "/content/drive"
DRIVE_ROOT = "/content/drive/MyDrive/qlora-lab"


def in_colab() -> bool:
    """Return True inside a Google Colab runtime."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def mount_drive() -> bool:
    """Mount Google Drive on Colab and return True; return False elsewhere. LabError if mounting fails."""
    if not in_colab():
        return False
    if os.path.isdir(os.path.join(DRIVE_MOUNT, "MyDrive")):
        return True
    from google.colab import drive  # type: ignore[import-not-found]

    try:
        drive.mount(DRIVE_MOUNT)
    except Exception as e:  # the mount dialog was dismissed, timed out, or Drive is unavailable
        raise LabError(
            f"Google Drive did not mount ({str(e).splitlines()[0] if str(e) else type(e).__name__}) — "
            "run this cell again and allow access, or set LAB_ROOT to a folder to keep runs elsewhere "
            "(the Colab disk is wiped at every disconnect)"
        ) from None
    return True


def lab_root(mounted: bool | None = None) -> tuple[Path, str]:
    """Return (folder that holds runs, one line saying where that is and why)."""
    env = os.environ.get("LAB_ROOT")
    if env:
        root = Path(env).expanduser()
        why = f"Runs folder: {root} (from LAB_ROOT)"
    elif in_colab():
        if mounted is None:
            mounted = mount_drive()
        if not mounted:
            raise LabError(
                "Google Drive is not mounted, so checkpoints would vanish with this runtime — "
                "run the setup cell again and allow Drive access, or set LAB_ROOT explicitly"
            )
        root = Path(DRIVE_ROOT)
        why = f"Runs folder: {root} (Google Drive: survives disconnects)"
    else:
        root = Path("runs").resolve()
        why = f"Runs folder: {root} (not on Colab: a local folder; set LAB_ROOT to change it)"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise LabError(
            f"cannot write to the runs folder {str(root)!r} ({e.strerror or e}) — set LAB_ROOT to a writable folder"
        ) from None
    return root, why


def on_drive(path: Path) -> bool:
    """Return True when path lies on the mounted Google Drive (deleted files go to its trash)."""
    return str(Path(path).resolve()).startswith(DRIVE_MOUNT)


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


def training_path() -> tuple[str, str]:
    """Return ("unsloth" | "plain", one-line reason) for the training path this machine takes."""
    import torch

    if os.environ.get("LAB_NO_UNSLOTH"):
        return "plain", "plain transformers + peft + bitsandbytes (LAB_NO_UNSLOTH is set)"
    if not torch.cuda.is_available():
        return "plain", "plain transformers + peft + bitsandbytes (no CUDA GPU; unsloth needs one)"
    if importlib.util.find_spec("unsloth") is None:
        return "plain", "plain transformers + peft + bitsandbytes (unsloth is not installed)"
    return "unsloth", "unsloth fast path (CUDA GPU and unsloth installed)"


def environment_report(root: Path | None = None) -> list[tuple[str, str]]:
    """Return rows (what, value) describing GPU, VRAM, bf16, Drive space, torch and training path."""
    import torch

    rows: list[tuple[str, str]] = [("Colab", "yes" if in_colab() else "no")]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows += [
            ("GPU", props.name),
            ("GPU memory", f"{props.total_memory / 2**30:.1f} GiB"),
            ("compute capability", f"{props.major}.{props.minor}"),
            ("bf16", "yes" if torch.cuda.is_bf16_supported() else "no (fp16 will be used)"),
        ]
    else:
        rows += [("GPU", "none (CPU only: fine for the embedded demo, slow for real models)")]
    rows.append(("torch", torch.__version__))
    major_minor = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if major_minor < (2, 10):
        rows.append(("warning", f"torch {torch.__version__} has known CVEs; use ≥ 2.10"))
    rows.append(("training path", training_path()[1]))
    if root is not None:
        rows.append(("free space at runs folder", f"{free_gib(root):.1f} GiB"))
    return rows
