"""Showing results the same way in a notebook (HTML table, inline image) and in a script (text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["show_table", "show_image", "in_notebook"]


def in_notebook() -> bool:
    """Return True when running inside a Jupyter/Colab kernel."""
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:
        return False
    return ip is not None and ip.__class__.__name__ != "TerminalInteractiveShell"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\n", " ↵ ")


def show_table(rows: list[dict[str, Any]] | list[tuple], headers: list[str] | None = None, title: str | None = None) -> None:
    """Show rows as a table: HTML in a notebook, aligned text in a script."""
    if rows and isinstance(rows[0], tuple):
        headers = headers or ["", ""]
        rows = [dict(zip(headers, r)) for r in rows]
    if not rows:
        print("(empty)")
        return
    headers = headers or list(rows[0].keys())
    cells = [[_fmt(r.get(h, "")) for h in headers] for r in rows]
    if in_notebook():
        from html import escape

        from IPython.display import HTML, display

        head = "".join(f"<th style='text-align:left'>{escape(h)}</th>" for h in headers)
        body = "".join(
            "<tr>" + "".join(f"<td style='text-align:left'>{escape(c)}</td>" for c in row) + "</tr>" for row in cells
        )
        cap = f"<caption style='text-align:left'><b>{escape(title)}</b></caption>" if title else ""
        display(HTML(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"))
        return
    print("\n".join(text_table(cells, headers, title)))


def text_table(cells: list[list[str]], headers: list[str], title: str | None = None, width: int = 60) -> list[str]:
    """Return a table's text lines: columns up to `width` wide; the last column (advice, answers) wraps, never cut."""
    import textwrap

    widths = [min(max(len(h), *(len(row[i]) for row in cells)), width) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines += ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
              "  ".join("-" * w for w in widths)]
    for row in cells:
        first = [(c if len(c) <= w else c[: w - 1] + "…").ljust(w) for c, w in zip(row[:-1], widths)]
        last = textwrap.wrap(row[-1], widths[-1], break_on_hyphens=False) or [""]
        lines.append("  ".join([*first, last[0]]).rstrip())
        pad = "  ".join(" " * w for w in widths[:-1])
        lines += [f"{pad}  {more}" if pad else more for more in last[1:]]
    return lines


def show_image(path: Path | str) -> None:
    """Show a PNG inline in a notebook; in a script, print where it is."""
    if in_notebook():
        from IPython.display import Image, display

        display(Image(filename=str(path)))
    else:
        print(f"Plot → {path}")


def show_masked_example(row: dict, tokenizer) -> None:
    """Show one processed row with the trained (assistant-mask) tokens marked ⟦like this⟧."""
    parts, current, inside = [], [], False
    for tid, m in zip(row["input_ids"], row["assistant_masks"]):
        if bool(m) != inside and current:
            text = tokenizer.decode(current)
            parts.append(f"⟦{text}⟧" if inside else text)
            current = []
        inside = bool(m)
        current.append(tid)
    if current:
        text = tokenizer.decode(current)
        parts.append(f"⟦{text}⟧" if inside else text)
    print("".join(parts))
    print(f"({sum(row['assistant_masks'])} of {len(row['input_ids'])} tokens carry loss: the ⟦marked⟧ ones)")
