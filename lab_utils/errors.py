"""One-line errors for people who run cells top to bottom.

A `LabError` says what is wrong, what was found and the fix, in one line. `install_handler()`
makes both a plain script run (`python notebooks/02_train.py`) and a notebook show that line
instead of a traceback; scripts exit with status 2. A full disk gets the same treatment, whichever
library raised it (OSError, safetensors' SafetensorError, a tokenizers Exception: they say "os error
28"), and so does a file the lab may not write (read-only folder). In a
script any other exception keeps its traceback (it is a bug report), followed by one "✗" line
saying so: the last thing a user reads is never a bare traceback. (In a notebook other errors
keep IPython's usual display: a cell may hold the user's own code.)
"""

from __future__ import annotations

import errno
import re
import sys

__all__ = ["LabError", "problem", "install_handler", "user_message", "on_error_exit"]

_CLEANUPS: list = []  # run before a script exits on an error (os._exit skips atexit): e.g. release a run lock


def on_error_exit(fn) -> None:
    """Register fn to run before a script ends on an error or the stop button (it must be safe to call twice)."""
    _CLEANUPS.append(fn)


def _run_cleanups() -> None:
    while _CLEANUPS:
        try:
            _CLEANUPS.pop()()
        except Exception:  # noqa: BLE001 — a cleanup must never hide the error line
            pass

# OSError numbers that mean "the disk (or the Drive quota) is full", not a bug.
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# What Rust and C++ libraries (safetensors, tokenizers, pyarrow) put in their own exception types' text.
_FULL_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|os error (%s)\b|\[Errno (%s)\]|StorageFull|QuotaExceeded" % (("|".join(map(str, sorted(_FULL))),) * 2)
)
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


class LabError(Exception):
    """A user-facing error: the message is one line naming the key, path or row and the fix."""

    exit_code = 2


def _chain(exc: BaseException) -> list[BaseException]:
    """Return exc and the exceptions it was raised from or during (at most 8: a cycle cannot hang)."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(out) < 8 and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_disk_full(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if not (isinstance(e, OSError) and e.errno) and _FULL_TEXT.search(str(e)[:2000]):
            return True
    return False


def _filename(exc: BaseException) -> str | None:
    return next((str(e.filename) for e in _chain(exc) if isinstance(e, OSError) and getattr(e, "filename", None)), None)


def user_message(exc: BaseException) -> str | None:
    """Return the one line a user should see for exc (LabError, disk full), or None for a bug."""
    if isinstance(exc, LabError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _is_disk_full(exc):
        name = _filename(exc)
        where = f" while writing {name}" if name else ""
        return (
            f"the disk is full{where} — free space (on Drive: delete old runs or exports, then empty Drive's "
            "trash) and run this notebook again; files saved before this point are intact"
        )
    if isinstance(exc, OSError) and exc.errno in _READ_ONLY and getattr(exc, "filename", None):
        what = "is on a read-only disk" if exc.errno == errno.EROFS else "cannot be written or read (permission denied)"
        return (
            f"{exc.filename} {what} — check that you can edit that folder (on Drive: your own folder, not a "
            "shared view), or use a new run_name / LAB_ROOT; files saved before this point are intact"
        )
    return None


def _unexpected(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return (
        f"unexpected error {type(exc).__name__}{': ' + first if first else ''} — the traceback above shows "
        "where; files saved before this point are intact; please report it with that traceback"
    )


def install_handler() -> None:
    """Show LabError as one line (no traceback) in scripts and notebooks; scripts exit with status 2."""
    ip = None
    if "IPython" in sys.modules:  # a notebook kernel has imported it already; a plain script has not
        try:
            from IPython import get_ipython

            ip = get_ipython()
        except ImportError:
            ip = None
    if ip is not None:

        def _custom(shell, etype, evalue, tb, tb_offset=None):
            line = user_message(evalue)
            if line is None:  # a bug or the user's own code: the usual traceback
                shell.showtraceback((etype, evalue, tb), tb_offset=tb_offset)
                return None
            # An error output of one line: the cell still fails (Run all stops, nbval reports it),
            # but the person sees the message and the fix instead of a traceback.
            stb = [f"✗ {line}"]
            shell._showtraceback(etype, evalue, stb)
            return stb

        # Every exception passes here; only the ones with a user line lose their traceback.
        ip.set_custom_exc((Exception,), _custom)
        return
    if getattr(sys, "_lab_hook_installed", False):
        return
    sys._lab_hook_installed = True  # type: ignore[attr-defined]
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        import os

        _run_cleanups()
        sys.stdout.flush()
        if issubclass(exc_type, KeyboardInterrupt):
            print("✗ Stopped by the user.", file=sys.stderr)
            sys.stderr.flush()
            os._exit(130)
        line = user_message(exc)
        if line is not None:
            print(f"✗ {line}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(LabError.exit_code)
        previous(exc_type, exc, tb)
        print(f"✗ {_unexpected(exc)}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


def problem(what: str, got: object = None, fix: str = "", *, kind: type[Exception] = LabError) -> Exception:
    """Return the one-line LabError in the lab's one style: "what, got X — fix" (got and fix optional).

    ``got`` is shown as written when it is a string (quote it yourself), else as its repr. Raise it:
    ``raise problem("train.learning_rate must be a number", got="'fast'", fix="e.g. 2e-4")``.
    kind: another exception type for a library function whose callers catch it (e.g. ValueError).
    """
    line = what
    if got is not None:
        line += f", got {got!r}" if not isinstance(got, str) or got == "" else f", got {got}"
    if fix:
        line += f" — {fix}"
    return kind(line)
