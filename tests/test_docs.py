"""Every ```python block of README.md and docs/*.md runs as written on a CPU-only machine.

A file's blocks run in order in one fresh namespace (a reader pastes them into one session), in a temporary working
directory. A block is left out only where the line just above it in the document says `(not run by the tests:
REASON)`; the reason then shows in pytest's warnings summary.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"\(not run by the tests: ([^)]+)\)")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(first code line number, code, reason not to run it or None) of each ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            above = next((line for line in reversed(lines[:i]) if line.strip()), "")
            skip = NOT_RUN.search(above)
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"```python block at line {i + 1} is never closed")
            blocks.append((i + 2, "\n".join(lines[i + 1:end]) + "\n", skip.group(1) if skip else None))
            i = end
        i += 1
    return blocks


def test_block_extraction_keeps_line_numbers_and_skip_reasons():
    text = "intro\n```python\nx = 1\n```\n(not run by the tests: needs a GPU)\n```python\ny = 2\n```\n```bash\nz\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", None), (7, "y = 2\n", "needs a GPU")]
    with pytest.raises(ValueError, match="line 2 is never closed"):
        python_blocks("a\n```python\nx = 1\n")


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d.read_text())], ids=lambda d: d.name)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write run directories
    namespace = {"__name__": "__main__"}
    skipped = []
    for line, code, reason in python_blocks(doc.read_text()):
        if reason:
            skipped.append(f"line {line}: {reason}")
            continue
        # Padding keeps the document's line numbers in tracebacks.
        exec(compile("\n" * (line - 1) + code, str(doc), "exec"), namespace)
    if skipped:  # shown in pytest's warnings summary, never silent
        warnings.warn(f"{doc.name}: blocks not run: {'; '.join(skipped)}", UserWarning)
