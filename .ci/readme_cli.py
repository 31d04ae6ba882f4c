"""Regenerate (default) or verify (--check) the README's CLI reference from the commands' real --help."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from click.testing import CliRunner

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
COMMANDS = [
    ("convert", ["mha-to-gqa"]),
    ("convert", ["mha-to-mqa"]),
    ("convert", ["mha-to-mla"]),
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


def readme_with_reference(text: str) -> str:
    block = f"{START}\n{reference()}\n{END}"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    return pattern.sub(lambda _: block, text)


if __name__ == "__main__":
    current = README.read_text()
    updated = readme_with_reference(current)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if updated == current else "README.md's CLI reference is stale: run `make readme`")
    README.write_text(updated)
