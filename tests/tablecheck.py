"""Shared check for every Rich table the tool prints: readable at 80 columns, no cell cut.

Rich falls back to 80 columns without a terminal (CI logs, pipes). A cell that does not fit is cut
with "…" (overflow="ellipsis", the default), silently cropped (overflow="crop") or folded mid-word
(overflow="fold"). Folding is fine for names (site names may wrap), never for numbers.

Use it in any test that builds a table:

    from tests.tablecheck import assert_no_cut
    assert_no_cut(stats_table(result))            # returns the rendered text for further checks

`assert_no_cut` renders the table with Console(width=80, record=True) and asserts that
- no "…" appears anywhere (cells, headers, title, caption);
- every word of every header and cell appears intact in the output, except words of a column with
  overflow="fold" that are not numbers (long names may be folded over lines; numbers may not).
"""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

WIDTH = 80
# a number as a table shows it: 1,234.5  -0.25  1.92e4  +3.1%  (x%)  inf  nan
NUMBER = re.compile(r"^[(\[]?[+\-−]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:e[+\-]?\d+)?%?[)\]]?$|^[+\-]?(?:inf|nan)$", re.I)


def plain(cell: Any) -> str:
    """The text a cell shows: markup parsed, styles dropped."""
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    return str(cell)


def render(table: Table, width: int = WIDTH) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None, file=_Null())
    console.print(table)
    return console.export_text()


def cut_words(table: Table, text: str) -> list[str]:
    """Words of headers and cells that do not appear intact in `text` (folded names excepted)."""
    lines = text.splitlines()
    missing = []
    for column in table.columns:
        folds = column.overflow == "fold"
        heads = (column.header,) if table.show_header else ()
        for cell in (*heads, *column._cells):  # noqa: SLF001 - Rich keeps cells per column
            for word in plain(cell).split():
                if folds and not NUMBER.match(word):
                    continue
                if not any(word in line for line in lines):
                    missing.append(f"{column.header!s:.20}: {word!r}")
    return missing


def assert_no_cut(table: Table, width: int = WIDTH) -> str:
    """Render `table` at `width` columns; fail if any cell, header or number is cut. Returns the text."""
    text = render(table, width)
    assert "…" not in text, f"a cell is cut at {width} columns:\n{text}"
    missing = cut_words(table, text)
    assert not missing, f"cut at {width} columns: {missing[:8]}\n{text}"
    assert max((len(line) for line in text.splitlines()), default=0) <= width, text
    return text


class _Null:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
