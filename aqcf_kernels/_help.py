"""Docstrings as command-line help: the console scripts (``aqcf-train``, ``aqcf-bench``) use their modules'
docstrings as ``--help`` descriptions, which are reStructuredText for the API docs."""

from __future__ import annotations

import re


def plain_text(rst: str) -> str:
    """reStructuredText of a docstring as ``--help`` shows it: ````x```` -> ``x``, ``:func:`~a.b``` -> ``b``,
    ``:mod:`a.b``` -> ``a.b``, ``**x**`` -> ``x``."""
    text = re.sub(r":[a-z]+:`~[\w.]*?\.?(\w+)`", r"\1", rst)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
