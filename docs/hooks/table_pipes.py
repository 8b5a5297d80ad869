"""MkDocs hook: show `\\|` in code spans of table cells as `|`.

GitHub needs a pipe inside a code span of a table cell escaped as `\\|` (the tables in
examples/README.md and benchmarks/RESULTS.md are read there too); Python-Markdown's tables
extension already skips pipes inside backticks and prints the backslash as written.
"""

import re

_CELL_CODE = re.compile(r"(<t[dh][^>]*>)(.*?)(</t[dh]>)", re.DOTALL)
_CODE = re.compile(r"(<code[^>]*>)(.*?)(</code>)", re.DOTALL)


def _unescape_code(match: re.Match[str]) -> str:
    return match[1] + match[2].replace("\\|", "|") + match[3]


def _unescape_cell(match: re.Match[str]) -> str:
    return match[1] + _CODE.sub(_unescape_code, match[2]) + match[3]


def on_page_content(html: str, **kwargs: object) -> str:
    return _CELL_CODE.sub(_unescape_cell, html)
