"""Session-wide test settings: notebooks executed by nbval write their runs to a temporary LAB_ROOT."""

import os
import tempfile

# nbval's kernels inherit this environment: never write test runs into ./runs or a user's Drive.
os.environ["LAB_ROOT"] = tempfile.mkdtemp(prefix="lab-nbval-")
os.environ.pop("LAB_CONFIG", None)
os.environ.pop("LAB_RUN_NAME", None)
os.environ.setdefault("PYTHONUNBUFFERED", "1")
