"""A simulated Colab VM for end-to-end stories: what a student's runtime is, minus the GPU.

Each `ColabVM` is one runtime: a fresh HOME and caches (the same path on every VM, as Colab's
/root, but emptied at each connect), an environment built from nothing (no LAB_* variable survives a
reconnect), and a stand-in `google.colab` package on PYTHONPATH whose
`drive.mount(path)` makes `path/MyDrive`, as Colab's does. Drive itself is a folder that outlives
every VM. On a machine where /content cannot be written, the mount point is that folder, named by
LAB_DRIVE_MOUNT (read by lab_utils.environment.drive_mount; a real Colab never sets it).

A GPU VM simulates its GPU at the hardware boundary only: a `sitecustomize` that answers
torch.cuda's questions as a T4 or A100 does (`is_bf16_supported()` says True on a T4, as torch 2.13
does) and a stand-in `unsloth` that records when it was imported. Nothing else is replaced.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"

GPUS = {  # what torch.cuda reports on Colab's GPUs
    "T4": {"name": "Tesla T4", "capability": (7, 5), "memory": 15_828_320_256},
    "A100": {"name": "NVIDIA A100-SXM4-40GB", "capability": (8, 0), "memory": 42_474_471_424},
}

_COLAB = {
    "__init__.py": "from . import drive, output, userdata  # noqa: F401\n",
    "drive.py": (
        "import os\n\n\n"
        "def mount(mountpoint, force_remount=False, **kwargs):\n"
        "    os.makedirs(os.path.join(mountpoint, 'MyDrive'), exist_ok=True)\n"
        "    print(f'Mounted at {mountpoint}')\n"
    ),
    "userdata.py": (
        "class SecretNotFoundError(Exception):\n    pass\n\n\n"
        "def get(name):\n    raise SecretNotFoundError(name)\n"
    ),
    "output.py": (
        "import json, os\n\n\n"
        "def enable_custom_widget_manager():\n"
        "    with open(os.environ['COLAB_VM_LOG'], 'a') as f:\n"
        "        f.write(json.dumps({'event': 'enable_custom_widget_manager'}) + '\\n')\n"
    ),
}

_UNSLOTH = """import json, os, sys

with open(os.environ["COLAB_VM_LOG"], "a") as f:
    f.write(json.dumps({"event": "import unsloth",
                        "already_imported": [m for m in ("transformers", "trl", "peft") if m in sys.modules]}) + "\\n")


class FastLanguageModel:
    @staticmethod
    def from_pretrained(**kwargs):
        raise RuntimeError("the stand-in unsloth loads no model")
"""

_SITECUSTOMIZE = """import types

import torch

_gpu = {gpu!r}
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_capability = lambda device=None: _gpu["capability"]
torch.cuda.get_device_name = lambda device=None: _gpu["name"]
torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
    name=_gpu["name"], total_memory=_gpu["memory"], major=_gpu["capability"][0], minor=_gpu["capability"][1]
)
torch.cuda.is_bf16_supported = lambda including_emulation=True: True  # torch 2.13 on a T4 says so too
"""


class ColabVM:
    """One Colab runtime: run notebooks as scripts in it; its disk goes with it, Drive stays."""

    def __init__(self, folder: Path, drive: Path, gpu: str | None = None, root: Path | None = None):
        self.dir, self.drive, self.gpu = folder, drive, gpu
        self.root = root or folder / "root"  # the VM's disk: HOME, caches, /tmp, /content
        self.log = folder / "vm-log.jsonl"
        stub = folder / "site"
        for name, text in _COLAB.items():
            (stub / "google" / "colab").mkdir(parents=True, exist_ok=True)
            (stub / "google" / "colab" / name).write_text(text)
        if gpu:
            (stub / "unsloth").mkdir(exist_ok=True)
            (stub / "unsloth" / "__init__.py").write_text(_UNSLOTH)
            (stub / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(gpu=GPUS[gpu]))
        for sub in ("home", "tmp", "content"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.log.touch()

    @property
    def runs(self) -> Path:
        """The runs folder on Drive, where lab_utils puts it on Colab."""
        return self.drive / "MyDrive" / "qlora-lab"

    def env(self) -> dict[str, str]:
        """Return the VM's environment, built from nothing: no variable of an earlier VM or of the test."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.root / "home"),
            "TMPDIR": str(self.root / "tmp"),
            "PYTHONPATH": str(self.dir / "site"),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",  # no hub here; the embedded model takes the hub path's code
            "LAB_DRIVE_MOUNT": str(self.drive),
            "COLAB_VM_LOG": str(self.log),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        }

    def script(self, name: str, knobs: dict[str, object] | None = None) -> Path:
        """Return notebooks/<name>.py, or a copy in the VM with knob lines (`NAME = …`) set as a user would."""
        path = NOTEBOOKS / f"{name}.py"
        if not knobs:
            return path
        lines = path.read_text().splitlines()
        for knob, value in knobs.items():
            first = next((i for i, ln in enumerate(lines) if ln.startswith(f"{knob} = ")), None)
            assert first is not None, f"{name} has no knob {knob}"
            last = first  # a knob may span lines (a dict): up to where the assignment parses
            while True:
                try:
                    ast.parse("\n".join(lines[first : last + 1]))
                    break
                except SyntaxError:
                    last += 1
            lines[first : last + 1] = [f"{knob} = {value!r}  # edited"]
        text = "\n".join(lines) + "\n"
        edited = self.root / "content" / f"{name}.py"
        edited.write_text(text)
        return edited

    def run(self, name: str, knobs: dict[str, object] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
        """Run a notebook top to bottom as a script in this VM; return the finished process."""
        return subprocess.run(
            [sys.executable, str(self.script(name, knobs))], env=self.env(), cwd=self.root / "content",
            capture_output=True, text=True, timeout=timeout,
        )

    def python(self, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
        """Run `python -c code` in this VM (a notebook cell on its own)."""
        return subprocess.run(
            [sys.executable, "-c", code], env=self.env(), cwd=self.root / "content",
            capture_output=True, text=True, timeout=timeout,
        )

    def kill_when(self, name: str, ready, timeout: float = 900) -> None:
        """Run a notebook and SIGKILL it (a disconnect) as soon as ready() is true; AssertionError if it never is."""
        proc = subprocess.Popen(
            [sys.executable, str(self.script(name))], env=self.env(), cwd=self.root / "content",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        fired = ready()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert fired, f"{name} ended (exit {proc.returncode}) before the moment to disconnect came"

    def events(self) -> list[dict]:
        """Return what the stand-ins recorded in this VM (imports of unsloth, widget manager calls)."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


class Colab:
    """A Google account: one Drive, and a new VM at every (re)connect."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.drive = folder / "drive"
        self.drive.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def connect(self, gpu: str | None = None) -> ColabVM:
        """Return a fresh VM (emptied disk, HOME and caches, a new environment) attached to the same Drive."""
        self.count += 1
        root = self.folder / "vm-disk"
        shutil.rmtree(root, ignore_errors=True)  # the previous VM is gone, and its disk with it
        return ColabVM(self.folder / f"vm{self.count}", self.drive, gpu, root)
