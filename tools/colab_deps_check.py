"""`make colab-deps-check`: would the notebooks' install cell change Colab's torch, torchvision or numpy?

Builds a throwaway virtual environment holding what a Colab GPU VM ships (torch 2.13, its matching
torchvision, numpy), takes the pip commands from the notebooks' setup cell itself (its
`install_commands`, run in that environment so the constraints are built from what is installed
there), and asks pip's resolver for each (`pip install --dry-run --report`). It fails when any of
the preinstalled packages would be installed, replaced or removed. Needs the package index.

Only difference from Colab: the lab is resolved from this checkout, not from its git URL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A Colab-like preinstalled set: torch 2.13 with the torchvision built against it (0.28; 0.29 needs
# torch 2.14) and numpy 2.0.2. The index has no torchaudio for torch 2.13 (its last is 2.11.1), so
# this VM has none; the cell pins whatever of KEEP is installed.
PREINSTALLED = ["torch==2.13.0", "torchvision==0.28.0", "numpy==2.0.2"]
VENV = Path(os.environ.get("COLAB_CHECK_VENV", REPO / ".venv-colab-check"))


def setup_cell() -> str:
    """Return the source of the setup cell shared by every notebook (the one naming REPO_URL)."""
    text = (REPO / "notebooks" / "00_setup.py").read_text()
    cells = text.split("\n# %%")
    return next(c.split("\n", 1)[1] for c in cells if "REPO_URL =" in c and "def install_commands" in c)


def cell_commands(gpu: bool) -> list[list[str]]:
    """Return the setup cell's pip commands as this interpreter (the simulated VM) would run them."""
    ns: dict = {"__name__": "setup_cell"}
    sys.modules.setdefault("lab_utils", types.ModuleType("lab_utils"))  # the cell's last line imports the lab
    exec(compile(setup_cell(), "setup cell", "exec"), ns)
    return ns["install_commands"](gpu=gpu, lab=str(REPO))


def _venv_python() -> Path:
    py = VENV / "bin" / "python"
    stamp = VENV / ".preinstalled"
    if not stamp.exists() or stamp.read_text() != " ".join(PREINSTALLED):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PREINSTALLED], check=True)
        stamp.write_text(" ".join(PREINSTALLED))
    return py


def check(py: Path) -> int:
    """Run the cell's commands as dry runs in the simulated VM; return 0 when torch & co. stay, 1 otherwise."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import colab_deps_check as c; "
        "print(json.dumps(c.cell_commands(gpu=True)))"
    )
    out = subprocess.run([str(py), "-c", code, str(REPO / "tools")], check=True, capture_output=True, text=True)
    commands = json.loads(out.stdout)
    keep = {n.split("==")[0] for n in PREINSTALLED} | {"torchaudio"}
    failed = 0
    for i, cmd in enumerate(commands, 1):
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            at = cmd.index("install") + 1
            dry = cmd[:at] + ["--dry-run", "--report", str(report)] + cmd[at:]
            print(f"[{i}/{len(commands)}] {' '.join(cmd[3:])}", flush=True)
            proc = subprocess.run(dry, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"✗ pip's resolver failed:\n{proc.stderr[-3000:]}")
                failed += 1
                continue
            body = json.loads(report.read_text())
        installs = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in body["install"]}
        touched = sorted(n for n in installs if n in keep)
        print(f"    would install {len(installs)}: {', '.join(f'{n} {v}' for n, v in sorted(installs.items()))}")
        if touched:
            print(f"✗ would change the VM's {', '.join(f'{n} → {installs[n]}' for n in touched)}")
            failed += 1
    if not failed:
        print(f"✓ {' '.join(PREINSTALLED)} stay as they are; the cell installs only what is listed above")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(check(_venv_python()))
