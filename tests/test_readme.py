"""Every ```python snippet of the README runs as written, on its own (a fresh namespace each)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_snippets() -> None:
    assert SNIPPETS, "no ```python block found in README.md"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_on_its_own(index: int, capsys) -> None:
    code = compile(SNIPPETS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": f"readme_snippet_{index + 1}"})  # noqa: S102 - the README's own code
