"""Session-wide test settings: notebooks executed by nbval write their runs to a temporary LAB_ROOT."""

import os
import tempfile

# nbval's kernels inherit this environment: never write test runs into ./runs or a user's Drive.
os.environ["LAB_ROOT"] = tempfile.mkdtemp(prefix="lab-nbval-")
os.environ.pop("LAB_CONFIG", None)
os.environ.pop("LAB_RUN_NAME", None)
os.environ.setdefault("PYTHONUNBUFFERED", "1")
# Headless kernels have no one watching: the live training view prints lines there instead of updating a display.
os.environ.setdefault("LAB_LIVE", "lines")
