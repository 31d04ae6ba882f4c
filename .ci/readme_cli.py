"""Regenerate (default) or verify (--check) the README's CLI reference from the commands' real --help, and its
family support matrix from the specs in convert/families/."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from click.testing import CliRunner

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
MATRIX_START, MATRIX_END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
COMMANDS = [
    ("convert", []),
    ("convert", ["mha-to-gqa"]),
    ("convert", ["mha-to-mqa"]),
    ("convert", ["mha-to-mla"]),
    ("convert", ["add-linear-attention"]),
    ("kvshrink", ["example", "smollm2"]),
    ("uptrain", []),
    ("kvshrink", ["eval", "run"]),
    ("kvshrink", ["eval", "compare"]),
    ("kvshrink", ["eval", "kv"]),
    ("kvshrink", ["pipeline"]),
]


def _entry_point(name: str):
    from kvshrink.convert.cli import convert_cli, kvshrink_cli
    from kvshrink.uptrain.cli import uptrain_cli

    return {"convert": convert_cli, "kvshrink": kvshrink_cli, "uptrain": uptrain_cli}[name]


def reference() -> str:
    sections = []
    for program, words in COMMANDS:
        result = CliRunner().invoke(_entry_point(program), [*words, "--help"], prog_name=program, terminal_width=100)
        if result.exit_code != 0:
            raise SystemExit(f"{program} {' '.join(words)} --help failed:\n{result.output}")
        sections.append(f"### `{' '.join([program, *words])}`\n\n```text\n{result.output.rstrip()}\n```")
    return "\n\n".join(sections)


def _replace_between(text: str, start: str, end: str, content: str) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the markers {start} ... {end}")
    return pattern.sub(lambda _: f"{start}\n{content}\n{end}", text)


def readme_with_reference(text: str) -> str:
    """The README with its CLI reference and its family support matrix regenerated."""
    from kvshrink.convert.families import support_matrix

    text = _replace_between(text, MATRIX_START, MATRIX_END, support_matrix())
    return _replace_between(text, START, END, reference())


if __name__ == "__main__":
    current = README.read_text()
    updated = readme_with_reference(current)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if updated == current else "README.md's CLI reference is stale: run `make readme`")
    README.write_text(updated)
