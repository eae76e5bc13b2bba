"""One-line errors for people who run cells top to bottom.

A `LabError` says what is wrong, what was found and the fix, in one line. `install_handler()`
makes both a plain script run (`python notebooks/02_train.py`) and a notebook show that line
instead of a traceback; scripts exit with status 2.
"""

from __future__ import annotations

import sys

__all__ = ["LabError", "install_handler"]


class LabError(Exception):
    """A user-facing error: the message is one line naming the key, path or row and the fix."""

    exit_code = 2


def _script_hook(exc_type, exc, tb, _previous=sys.excepthook):
    if issubclass(exc_type, LabError):
        print(f"✗ {exc}", file=sys.stderr)
        sys.stderr.flush()
        return
    if issubclass(exc_type, KeyboardInterrupt):
        print("✗ Stopped by the user.", file=sys.stderr)
        return
    _previous(exc_type, exc, tb)


def install_handler() -> None:
    """Show LabError as one line (no traceback) in scripts and notebooks; scripts exit with status 2."""
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:
        ip = None
    if ip is not None:

        def _custom(shell, etype, evalue, tb, tb_offset=None):
            # An error output of one line: the cell still fails (Run all stops, nbval reports it),
            # but the person sees the message and the fix instead of a traceback.
            stb = [f"✗ {evalue}"]
            shell._showtraceback(etype, evalue, stb)
            return stb

        ip.set_custom_exc((LabError,), _custom)
        return
    if getattr(sys, "_lab_hook_installed", False):
        return
    sys._lab_hook_installed = True  # type: ignore[attr-defined]

    def hook(exc_type, exc, tb):
        _script_hook(exc_type, exc, tb)
        if issubclass(exc_type, (LabError, KeyboardInterrupt)):
            sys.stdout.flush()
            import os

            os._exit(LabError.exit_code if issubclass(exc_type, LabError) else 130)

    sys.excepthook = hook
