"""Code style with no formatter: no line over 120 characters and no formatter skip markers in the project's Python."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("convert", "uptrain", "eval", "tests", "benchmarks", ".ci")
MAX_LINE = 120
MARKER = "# fmt: " + "skip"  # split so this file does not carry the marker it forbids


def test_no_long_lines_and_no_formatter_markers():
    files = sorted(path for folder in CODE_DIRS for path in (ROOT / folder).rglob("*.py"))
    assert files, f"no Python files found under {', '.join(CODE_DIRS)}"
    problems = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if len(line) > MAX_LINE:
                problems.append(f"{where}: {len(line)} characters (at most {MAX_LINE})")
            if MARKER in line:
                problems.append(f"{where}: {MARKER!r} marker (no formatter is configured)")
    assert not problems, "\n".join(problems)
