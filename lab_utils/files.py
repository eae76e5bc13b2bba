"""Write-then-rename: the one way the lab writes a file that must never be seen half-written.

A runtime can die between any two bytes (Colab disconnects, a full Drive, the stop button). Every
file another cell or a resumed run reads back is written to a unique temporary sibling first and
renamed over the target in one step, so a reader finds either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["tmp_path", "write_text", "write_bytes", "write_json"]


def tmp_path(path: Path) -> Path:
    """Return a temporary sibling name for path, unique to this process (pid + random), for write-then-rename."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write data to path atomically (temporary sibling, then rename); the temporary file never stays behind.

    fsync: flush the bytes to the disk before the rename (a manifest that vouches for other files).
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str, *, fsync: bool = False) -> Path:
    """Write text (UTF-8) to path atomically."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: Path, obj: Any, *, fsync: bool = False, **kwargs: Any) -> Path:
    """Write obj as JSON to path atomically; kwargs go to json.dumps (e.g. indent=2, sort_keys=True)."""
    return write_text(path, json.dumps(obj, **kwargs), fsync=fsync)
